"""`packager build PACKS.toml --out RUN_DIR`: the whole chain for several language packs.

calibrate (once over every direction of every pack, in shards merged exactly) -> for each pack x drop ratio x
variant: plan -> prune -> export -> verify -> bundle; the parent is exported and verified
once per variant (same format and quantization, for the ratios); then the report.

Resumable: each step has a key, the sha256 of its settings, of its inputs' keys (input
files are hashed once, by content) and of the source files of the code that computes it
(packager.core.code_version: the stage's module and every project module it imports). A step whose
record in RUN_DIR/.steps/ carries the same key and whose outputs exist is skipped; anything
else is (re)done, and so is every step downstream of it. Stop it at any point and run the same
command again; after a code change, only what that code computes is done again.

PACKS.toml (paths are relative to the TOML file):

    parent = "../models/default"          # Hugging Face MoE checkpoint (the embedded default),
                                          # or a GGUF file: parent = "model.Q8_0.gguf" (see below)
    drop_ratios = [0.25, 0.5]
    ranker = "routing-mass"               # default for every variant
    threads = 2                           # runtime / quantizer threads
    archive = false                       # also write BUNDLE.tar
    profiles = ["pi4-2gb", "phone-3gb"]   # optional: RUN/fit.json names the best bundle per direction
                                          # that fits each device profile (packager fit)

    [calibration]
    data = ["../data/harvest/dev.jsonl"]
    max_sentences = 100                   # per direction
    teacher_forced = false
    max_new_tokens = 64
    shard_by = "direction"                # a calibration shard per direction (default), or "none": one run
    slices = 1                            # ... each shard cut into this many slices of its sentences
    # a parent larger than RAM (Hugging Face parents): execution = "streamed", dtype = "bfloat16",
    # generator = "parent.Q8_0.gguf" (translates for generate mode), spill_dir, expert_group_mb

    [verify]
    test = "../data/harvest/test.jsonl"
    limit = 100                           # segments per direction
    max_new_tokens = 128

    [[variant]]                           # one exported model per (format, quantization)
    format = "gguf"
    allocation = "uniform"                # stock llama.cpp loads only one expert count
    quant = ["F16", "Q8_0"]

    [[variant]]
    format = "onnx"
    allocation = "dynamic"
    quant = ["fp32"]

    [[pack]]
    name = "en-de"
    directions = "en->de"

Budgets in place of (or besides) drop ratios: `budgets = [{max_file_mb = 12, format = "gguf",
quant = "Q8_0"}, {max_loss = 1.0}]` at the top or in a [[pack]], with a `[search]` table (`dev`
required): each budget is one plan step that runs `packager plan search` on the dev split
(packager.pack_budgets), shared by the pack's variants.

A GGUF parent (`parent = "path/model.gguf"`) builds with no Hugging Face weights and neither
torch nor transformers (the `gguf` extra): calibrate in llama.cpp (packager.calibrate_gguf) ->
plan -> prune-gguf -> quantize (when asked) -> verify -> bundle -> report. Its variants are
GGUF only (ONNX export and distillation need the safetensors weights); `quant` defaults to the
parent's own type (the pruned file as prune-gguf writes it) and may add llama.cpp types to
quantize to when the parent is F32/F16/BF16 (llama.cpp does not re-quantize a quantized file).

With `--ray [ADDRESS]` the same step graph runs as Ray tasks (packager.build.ray_tasks); the
sequential build and the Ray build run the same steps with the same keys and write the same files.

Modules: config (the packs file), graph (the steps, their keys and dependencies), runners (what
each step runs), steps (the step cache, running one step, the run-directory lock), driver (the
sequential run and the build record), ray_tasks (the Ray executor).
"""
from __future__ import annotations

from packager.build.config import BuildConfig, BuildError, PackSpec, Variant, load_build_config
from packager.build.driver import build
from packager.build.steps import Step, StepStore, TransientStepError, run_dir_lock

__all__ = ["BuildConfig", "BuildError", "PackSpec", "Step", "StepStore", "TransientStepError", "Variant", "build",
           "load_build_config", "run_dir_lock"]
