"""The settings of a distillation run and the names of its files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from packager.core.errors import PackagerError

PROVENANCE_NAME = "distillation.json"
TARGETS = ("parent", "references")
DTYPES = ("float32", "bfloat16", "float16")


class DistillError(PackagerError):
    """Distillation inputs (models, data, settings) that cannot be used."""


@dataclass(frozen=True)
class DistillSettings:
    pairs: tuple[str, ...]                 # direction slugs, e.g. ("en-de", "en-fr")
    targets: str = "parent"                # "parent" (distillation) | "references" (SFT control)
    sentences: int = 2000                  # source sentences per direction (before the dev split)
    max_steps: int | None = None           # optimizer steps (total, across resumes)
    minutes: float | None = None           # training wall time (total, across resumes)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    batch_tokens: int = 4096               # padded tokens per batch
    max_tokens: int = 256                  # longer examples (prompt + target) are dropped
    dev_fraction: float = 0.05
    dev_max: int = 400
    eval_every: int = 100                  # steps between dev-loss evaluations
    patience: int = 3                      # evaluations without improvement before stopping
    seed: int = 0
    max_new_tokens: int = 128              # parent decoding bound
    keep_unfinished: bool = False          # train on parent outputs cut by the bound (default: drop them)
    drop_flagged: bool = True              # drop parent outputs the generation-error detectors flag
    num_beams: int = 1
    gen_batch_size: int = 32
    prompt_template: str = "{source}"
    text_lang: str | None = None
    checkpoint_minutes: float = 5.0
    device: str = "cpu"
    dtype: str = "float32"                 # weights of the parent and of the trained model

    def check(self) -> None:
        if not self.pairs:
            raise DistillError("--pairs: give at least one direction, e.g. en-de")
        if self.targets not in TARGETS:
            raise DistillError(f"--targets {self.targets!r}: use one of {', '.join(TARGETS)}")
        if self.sentences < 2:
            raise DistillError(f"--sentences {self.sentences}: need at least 2 (some are held out as the dev set)")
        if self.max_steps is None and self.minutes is None:
            raise DistillError("bound the training: give --max-steps N or --minutes M")
        if self.max_steps is not None and self.max_steps < 1:
            raise DistillError(f"--max-steps {self.max_steps}: must be at least 1")
        if self.minutes is not None and not self.minutes > 0:
            raise DistillError(f"--minutes {self.minutes}: must be positive")
        if not self.lr > 0:
            raise DistillError(f"--lr {self.lr}: must be positive")
        for name in ("batch_tokens", "max_tokens", "eval_every", "patience", "max_new_tokens", "num_beams", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise DistillError(f"{name.replace('_', '-')} must be at least 1")
        if self.dtype not in DTYPES:
            raise DistillError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not 0 < self.dev_fraction < 1:
            raise DistillError(f"dev fraction {self.dev_fraction}: must be in (0, 1)")


@dataclass
class DistillResult:
    out_dir: Path
    provenance: dict = field(default_factory=dict)

