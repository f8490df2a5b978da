"""The small interface every runtime backend implements (llama.cpp, ONNX Runtime).

A backend implements the model-specific primitives (`tokenize`, `detokenize`, `logits`,
`_start`, `_step`, `close`); this base class builds generation (greedy or sampling, stop
tokens), translation through the model's chat template, and timing counters on top, so
every backend decodes and samples the same way.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np

from runtime.errors import BackendError
from runtime.languages import Language
from runtime.prompt import PromptRenderer
from runtime.schema import ExportConfig

logger = logging.getLogger(__name__)


@dataclass
class Timings:
    """Counters since load (or the last `reset`). Prefill = prompt tokens, decode = generated."""

    load_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def reset(self) -> None:
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0

    def as_dict(self) -> dict[str, float]:
        data = asdict(self)
        data["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        data["decode_tokens_per_second"] = self.decode_tokens_per_second
        return data


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax, ties to the lowest id). top_k 0 / top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise BackendError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


GREEDY = Sampling()


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scores.size:
        cutoff = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        masked = np.zeros_like(probs)
        masked[keep] = probs[keep]
        probs = masked / masked.sum()
    return int(rng.choice(probs.size, p=probs))


class Backend(abc.ABC):
    """A loaded model. Use `Backend.load(...)` or `runtime.backends.open_backend(path)`."""

    format: ClassVar[str]

    def __init__(self, config: ExportConfig, n_threads: int | None = None):
        self.config = config
        self.n_threads = n_threads
        self.timings = Timings()
        self.prompt = PromptRenderer(
            config.prompt_template,
            source=f"{self.format} export config",
            special_tokens={f"{k}_token": v for k, v in config.special_tokens.items()},
        )
        self._stop_ids: set[int] | None = None

    @classmethod
    def load(cls, model_path: str | Path, config: ExportConfig, n_threads: int | None = None, **options) -> "Backend":
        """Load `model_path` (a model file) described by `config`; records load time."""
        started = time.perf_counter()
        backend = cls(Path(model_path), config, n_threads=n_threads, **options)
        backend.timings.load_seconds = time.perf_counter() - started
        return backend

    # -- primitives every backend implements --------------------------------------------------
    @property
    @abc.abstractmethod
    def n_ctx(self) -> int:
        """Maximum sequence length (prompt + generated tokens)."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS/EOS. `special=True` parses special-token text
        such as `<|bos|>` into their ids (used for rendered prompts)."""

    @abc.abstractmethod
    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens omitted)."""

    @abc.abstractmethod
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: logits at every position of a fresh sequence."""

    @abc.abstractmethod
    def _start(self, token_ids: Sequence[int]) -> np.ndarray:
        """Forget earlier state, run the prompt, return the logits of its last position."""

    @abc.abstractmethod
    def _step(self, token_id: int) -> np.ndarray:
        """Append one token to the running sequence, return the next logits."""

    def close(self) -> None:
        """Free native resources (idempotent)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared behaviour ------------------------------------------------------------------------
    def token_id(self, token_text: str) -> int | None:
        """Id of a special token given as text, or None when the vocabulary lacks it."""
        ids = self.tokenize(token_text, special=True)
        return ids[0] if len(ids) == 1 else None

    @property
    def stop_ids(self) -> set[int]:
        if self._stop_ids is None:
            ids = {self.token_id(text) for text in self.config.stop_tokens}
            missing = [text for text in self.config.stop_tokens if self.token_id(text) is None]
            if missing:
                raise BackendError(f"stop token(s) {missing} of the export config are not in the model's vocabulary")
            self._stop_ids = {i for i in ids if i is not None}
        return self._stop_ids

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 256,
        sampling: Sampling = GREEDY,
        stop_ids: set[int] | None = None,
    ) -> Iterator[int]:
        """Yield generated ids one by one; stops at a stop id (not yielded), at
        `max_new_tokens`, or when the context is full."""
        if not prompt_ids:
            raise BackendError("cannot generate from an empty prompt")
        if len(prompt_ids) >= self.n_ctx:
            raise BackendError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.n_ctx} tokens")
        stop = self.stop_ids if stop_ids is None else stop_ids
        rng = np.random.default_rng(sampling.seed)
        budget = min(max_new_tokens, self.n_ctx - len(prompt_ids))

        started = time.perf_counter()
        logits = self._start(prompt_ids)
        self.timings.prefill_seconds += time.perf_counter() - started
        self.timings.prefill_tokens += len(prompt_ids)
        for produced in range(budget):
            token = choose_token(logits, sampling, rng)
            if token in stop:
                return
            yield token
            if produced + 1 == budget:
                return
            started = time.perf_counter()
            logits = self._step(token)
            self.timings.decode_seconds += time.perf_counter() - started
            self.timings.decode_tokens += 1

    #: how many sequences `generate_batch` decodes together (1 = one after the other)
    max_batch: int = 1

    def generate_batch(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                       sampling: Sampling = GREEDY) -> list[list[int]]:
        """Generated ids of several prompts (each up to its budget). This default runs them one
        after the other; a backend that can decode sequences together overrides it."""
        return [list(self.generate_ids(prompt, budget, sampling)) for prompt, budget in zip(prompts, budgets)]

    def _group_start(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                     sampling: Sampling) -> tuple[list[int], list, list[list[int]]]:
        """Where a batched group of `generate_batch` starts: per prompt its token limit (the budget,
        within the context `self._n_ctx`), its own random stream (seeded as `generate_ids` seeds
        one) and an empty output. An empty prompt or one that fills the context is refused."""
        for prompt in prompts:
            if not prompt:
                raise BackendError("cannot generate from an empty prompt")
            if len(prompt) >= self._n_ctx:
                raise BackendError(f"prompt of {len(prompt)} tokens does not fit the context of {self._n_ctx} tokens")
        limits = [min(budget, self._n_ctx - len(prompt)) for prompt, budget in zip(prompts, budgets)]
        rngs = [np.random.default_rng(sampling.seed) for _ in prompts]
        return limits, rngs, [[] for _ in prompts]

    @staticmethod
    def _group_step(logits, live: list[int], sampling: Sampling, rngs: list, stop: set[int],
                    outputs: list[list[int]], limits: list[int]) -> list[int]:
        """One step of a batched group: row r of `logits` picks the next token of sequence `live[r]`
        (appended to its output unless it is a stop token). Returns the rows that go on: no stop
        token and still under their limit."""
        going = []
        for row, seq in enumerate(live):
            token = choose_token(logits[row], sampling, rngs[seq])
            if token in stop:
                continue
            outputs[seq].append(token)
            if len(outputs[seq]) < limits[seq]:
                going.append(row)
        return going

    def prompt_ids(self, text: str, src: str | Language, tgt: str | Language) -> list[int]:
        return self.tokenize(self.prompt.render(text, src, tgt), special=True)

    def translate_stream(
        self,
        text: str,
        src: str | Language,
        tgt: str | Language,
        max_new_tokens: int = 256,
        sampling: Sampling = GREEDY,
    ) -> Iterator[str]:
        """Yield the translation as text pieces as soon as they form complete characters."""
        generated: list[int] = []
        emitted = ""
        for token in self.generate_ids(self.prompt_ids(text, src, tgt), max_new_tokens, sampling):
            generated.append(token)
            current = self.detokenize(generated)
            # a byte-level token may end inside a UTF-8 character: wait for the rest
            if current.endswith("\ufffd"):
                continue
            if current.startswith(emitted):
                piece, emitted = current[len(emitted):], current
                if piece:
                    yield piece
        final = self.detokenize(generated)
        if final != emitted and final.startswith(emitted):
            yield final[len(emitted):]

    def translate(
        self,
        text: str,
        src: str | Language,
        tgt: str | Language,
        max_new_tokens: int = 256,
        sampling: Sampling = GREEDY,
    ) -> str:
        return "".join(self.translate_stream(text, src, tgt, max_new_tokens, sampling))
