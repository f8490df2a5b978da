"""Recovery by sequence-level distillation (step 4 of the pipeline).

The pruned model is fine-tuned on its parent's translations of sampled source sentences, or, as the
control, on the reference translations (`targets="references"`, supervised fine-tuning). In order:

1. `lineage`: the pruned checkpoint must come from the parent (architecture, tokenizer files and
   router rows are compared).
2. `targets`: the source sentences and the parent's translations of them, cached on disk; outputs
   that hit the length bound without an end token (usually loops), are empty, or that the
   reference-free generation-error detectors of `packager.quality` flag (loops, wrong script or
   language, length outliers, lost placeholders) are dropped and counted: a weak parent's mistakes
   are not worth teaching (`keep_unfinished`, `drop_flagged=False` keep them).
3. `trainer`: a resumable full fine-tune, with a seeded held-out dev set; the weights with the best
   dev loss are kept.
4. `writer`: a normal pruned checkpoint plus `distillation.json`, written atomically.
`run.distill` drives them; `settings` holds the settings and the error type.

On the embedded default (15M parameters) on 2 CPU cores: a few thousand parent translations
take a minute or two. With 3 minutes of training (docs/results.md, en->de,fr,es), distillation
recovered -8% of the chrF++ lost at 50% dropped (38.3 -> 38.1; generation errors 6% -> 3%),
56% at 75% and 63% at 87.5%. For a 20-30B parent (Qwen3-30B-A3B, GPT-OSS-20B) on one GPU a user would
set: `--device cuda --dtype bfloat16` (float32 does not fit), `--sentences` so that about
10k sentences are translated in total (the paper's figure), `--gen-batch-size 64` or more,
`--lr 1e-5` (a full fine-tune of a large model wants a far smaller rate than our 3e-4),
`--batch-tokens 32768`, `--eval-every 200`, `--minutes 60`-`120`. Memory: AdamW keeps two
moments per parameter, so bf16 weights + gradients + moments take about 8 bytes per
parameter: one 80 GB GPU holds a pruned model of up to roughly 8B parameters (GPT-OSS-20B at
75% dropped is 6.6B); larger ones need an 8-bit optimizer, gradient checkpointing or
sharding, which this command does not provide. The GPU path is written but has not been run
here (no GPU on the build machines).
"""
from __future__ import annotations

from packager.distill.lineage import Lineage, check_lineage
from packager.distill.run import default_cache_dir, default_work_dir, distill
from packager.distill.settings import PROVENANCE_NAME, TARGETS, DistillError, DistillResult, DistillSettings
from packager.distill.targets import Sample, flagged_outputs, greedy_generate

__all__ = ["PROVENANCE_NAME", "TARGETS", "DistillError", "DistillResult", "DistillSettings", "Lineage", "Sample",
           "check_lineage", "default_cache_dir", "default_work_dir", "distill", "flagged_outputs", "greedy_generate"]
