"""Export to device formats: GGUF (llama.cpp) and ONNX (ONNX Runtime)."""
