"""Settings of `make experiments`: the grid, the samples, the recovery budget (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from packager.core.errors import PackagerError

RESULTS_SCHEMA = "packager.experiments/1"
ENGLISH = "en"


class ExperimentError(PackagerError):
    """Inputs of the experiment run (model, data, settings) that cannot be used."""


@dataclass(frozen=True)
class ExperimentConfig:
    packs: tuple[tuple[str, ...], ...] = (("de",), ("fr",), ("de", "fr", "es"))   # en->X languages per pack
    rankers: tuple[str, ...] = ("routing-mass", "frequency", "reap", "random", "inverted")
    allocations: tuple[str, ...] = ("uniform", "dynamic", "inverted-dynamic")
    drops: tuple[float, ...] = (0.25, 0.5, 0.625, 0.75, 0.875)
    calib_sentences: int = 100          # per calibrated direction (dev split)
    sample: int = 100                   # test sentences per direction (single-language packs)
    sample_multi: int = 50              # per direction in multilingual packs (the first ones of the same sample)
    noise_samples: int = 3              # disjoint test samples for the sample-noise setting
    noise_seeds: int = 3                # random-ranker seeds for the seed-noise setting
    noise_drop: float = 0.5
    bootstrap: int = 200                # chrF++ bootstrap resamples per cell (0 = none)
    recovery_pack: int = -1             # index into packs
    recovery_drops: tuple[float, ...] = (0.5, 0.75, 0.875)
    best_drops: tuple[float, ...] = (0.5, 0.625, 0.75)  # the best plan maximises mean chrF++ here
    distill_sentences: int = 3000       # per direction (train split)
    distill_minutes: float | None = 3.0
    distill_max_steps: int | None = None
    distill_eval_every: int = 50
    distill_lr: float = 3e-4
    distill_batch_tokens: int = 4096
    distill_keep_unfinished: bool = False   # a random tiny parent never ends its outputs: --quick keeps them
    distill_drop_flagged: bool = True       # ... and every output of it is flagged: --quick keeps those too
    distill_noise_seeds: tuple[int, ...] = (1,)   # extra distillation seeds at distill_noise_drop
    distill_noise_drop: float = 0.75
    overlap_drops: tuple[float, ...] = (0.75, 0.875)
    overlap_langs: tuple[str, ...] = ("de", "fr", "es")
    # merge vs drop and top-k reduction (packager.experiments.reduce), on the first pack
    reduce_drops: tuple[float, ...] = (0.5, 0.75, 0.875)
    reduce_ranker: str = "routing-mass"
    reduce_allocation: str = "uniform"      # uniform: every reduced model also loads in llama.cpp
    reduce_merge_records: int = 256         # train records the merge partners are chosen on
    reduce_merge_aligns: tuple[str, ...] = ("activations", "weights")   # merge columns with neurons aligned first
    reduce_speed_prompts: int = 40          # llama.cpp decode-speed prompts (0: no speed measurement)
    reduce_speed_repeats: int = 5           # passes per model, interleaved with the other k
    split: str = "test"                     # the split cells are scored on; "dev" calibrates on train
    batch_size: int = 32
    max_new_tokens: int = 256
    seed: int = 0
    # one torch thread: with two, any other process on a 2-core machine made OpenMP spin and a
    # cell took 25-110 s instead of 3-4 s (measured); one thread ran at a steady 3-4 s per cell
    threads: int = 1

    def pack_name(self, langs: Sequence[str]) -> str:
        return f"{ENGLISH}->{','.join(langs)}"


QUICK = ExperimentConfig(
    packs=(("de",), ("de", "fr")), drops=(0.5, 0.75), calib_sentences=16, sample=8, noise_samples=2, noise_seeds=2,
    bootstrap=0, recovery_drops=(0.5, 0.75), best_drops=(0.5, 0.75), distill_sentences=20, distill_minutes=None,
    distill_max_steps=3, distill_eval_every=2, distill_batch_tokens=1024, distill_keep_unfinished=True,
    distill_drop_flagged=False,
    distill_noise_seeds=(), overlap_drops=(0.5, 0.75),
    overlap_langs=("de", "fr"), batch_size=16, max_new_tokens=16, reduce_drops=(0.5, 0.75), reduce_merge_records=16,
    reduce_speed_prompts=2, reduce_speed_repeats=1,
)


@dataclass
class Segment:
    src: str
    ref: str
