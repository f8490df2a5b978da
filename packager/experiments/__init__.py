"""`make experiments`: the method's findings reproduced on the embedded default model.

    python -m packager.experiments --out runs/experiments [--model models/default] [--data data/harvest]

What runs (every number comes from this command; docs/results.md is generated from it):
1. Calibration, teacher-forced (reference translations, one forward pass per batch), on a
   seeded sample of the harvested dev split, en->X and X->en for every pack language (X->en
   gives the English-as-output reference of the dynamic allocation's JSD), REAP included.
2. Sweep in mask mode (packager.masking: the dropped experts' router logits are -inf; no file
   is written): packs x rankers x allocations x drop ratios, each scored on a seeded sample of
   the test split per direction (greedy, batched): chrF++, BLEU (sacrebleu, with signatures
   and a bootstrap 95% interval for chrF++) and the generation-error rate (packager.quality
   detectors: empty, repetition, length ratio, wrong script/language, lost placeholder).
3. Noise: the same setting on disjoint test samples, the random ranker with several seeds,
   bootstrap intervals in every cell, and a second distillation seed.
4. Recovery: for the best (ranker, allocation) of the distillation pack, the plan is pruned
   to files at each recovery drop ratio and fine-tuned by sequence-level distillation on the
   parent's translations and, as the control, by SFT on the references (packager.distill,
   same sentences, same budget), then scored like the sweep.
5. Mask overlap: global IoU of the per-language masks next to random masks of the same
   per-layer sizes (packager.planning.compare_keeps).
Every scored cell is cached under `OUT/cells/` by a key of model fingerprint, kept experts,
direction, sample, decoding settings and the code that computes it (packager.experiment_cells:
an edit to the scorer or the generator computes the cells again), and every pruned/distilled model under
`OUT/models/`, so an interrupted run continues where it stopped and a re-run only rebuilds
the report. Results: `OUT/results.json`, `OUT/plots/*.png`, and the Markdown page.
Modules: `config` (settings), `runner` (the stages and the cell bookkeeping; one cell and its
cache are packager.experiment_cells), `reduce` (merge vs drop, top-k reduction), `outputs`
(results.json, the report metrics), `plots`, `page` (the Markdown page), `cli` (the command).
"""
from packager.experiments.config import QUICK, RESULTS_SCHEMA, ExperimentConfig, ExperimentError
from packager.experiments.runner import Experiment

__all__ = ["QUICK", "RESULTS_SCHEMA", "Experiment", "ExperimentConfig", "ExperimentError"]
