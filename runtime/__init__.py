"""Device side: load a bundle, translate, measure. Installs and runs without torch/transformers."""
