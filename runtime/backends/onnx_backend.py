"""ONNX Runtime backend: the decoder graph written by `packager export onnx`, run with a KV
cache. No torch, no transformers: `tokenizers` for text, numpy for the cache.

This module is also the one place for the graph's input/output names; the exporter imports
them from here, so both sides always agree.

`max_batch=N` lets `generate_batch` decode up to N sequences together: the graph takes a batch
dimension, an attention mask over past + new positions (0 = padding) and explicit position ids,
so each prompt is run alone (its logits as one at a time), the caches are left-padded to the
longest with mask 0 and stacked, and each step feeds one token per live sequence (positions
from 0 per row); a finished sequence's rows leave the KV cache. Greedy output is the same as one
at a time up to float rounding (padded attention rows and batched matrix shapes sum in another
order), so a near-tie between the top two tokens can flip.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from runtime.backends.base import GREEDY, Backend, Sampling
from runtime.errors import BackendError
from runtime.schema import ExportConfig

logger = logging.getLogger(__name__)

# -- graph signature (shared with converters/onnx) ------------------------------------------------
INPUT_IDS = "input_ids"            # int64 [batch, seq]
ATTENTION_MASK = "attention_mask"  # int64 [batch, past + seq], 1 = attend, 0 = padding
POSITION_IDS = "position_ids"      # int64 [batch, seq]
LOGITS = "logits"                  # float32 [batch, seq, vocab]
_PAST = "past_key_values.{layer_idx}.{kind}"   # float32 [batch, kv_heads, past, head_dim]
_PRESENT = "present.{layer_idx}.{kind}"        # float32 [batch, kv_heads, past + seq, head_dim]
KV_KINDS = ("key", "value")
CONTRIB_OPS_NOTE = ("uses com.microsoft contrib operators (MoE/QMoE/MatMulNBits): needs a full ONNX Runtime "
                    "build (1.23+); reduced or mobile builds may not include them")


def past_names(n_layers: int) -> list[str]:
    return [_PAST.format(layer_idx=i, kind=kind) for i in range(n_layers) for kind in KV_KINDS]


def present_names(n_layers: int) -> list[str]:
    return [_PRESENT.format(layer_idx=i, kind=kind) for i in range(n_layers) for kind in KV_KINDS]


def graph_input_names(n_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)]


def graph_output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - base dependency
        raise BackendError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def _bundle_root(model_path: Path, config: ExportConfig) -> Path:
    """Directory the config's relative paths start from (the model file may sit in a subfolder)."""
    root = model_path.parent
    for _ in PurePosixPath(config.model_files[0]).parts[:-1]:
        root = root.parent
    return root


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


class OnnxBackend(Backend):
    format = "onnx"

    def __init__(self, model_path: Path, config: ExportConfig, n_threads: int | None = None, *,
                 n_ctx: int | None = None, optimization: str = "all", max_batch: int = 1):
        super().__init__(config, n_threads=n_threads or max(1, os.cpu_count() or 1))
        self.path = Path(model_path)
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        extra = config.extra
        try:
            self.n_layers = int(extra["n_layers"])
            self._max_positions = int(extra["max_position_embeddings"])
        except (KeyError, TypeError, ValueError):
            raise BackendError(f"{self.path}: the export config lacks extra.n_layers / extra.max_position_embeddings; "
                               f"re-export it with `packager export onnx`") from None
        self._n_ctx = min(n_ctx, self._max_positions) if n_ctx else self._max_positions
        self.tokenizer = self._load_tokenizer(_bundle_root(self.path, config))
        self.session = self._load_session(optimization)
        self._check_signature()
        self._output_names = graph_output_names(self.n_layers)
        self._past: list[np.ndarray] | None = None
        self._n_past = 0

    # -- loading ---------------------------------------------------------------------------------
    def _load_tokenizer(self, root: Path):
        from tokenizers import Tokenizer

        if not self.config.tokenizer:
            raise BackendError(f"{self.path}: the export config names no tokenizer; re-export with `packager export onnx`")
        path = root / self.config.tokenizer
        try:
            return Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise BackendError(f"{path}: tokenizer file not found beside the model; copy the export directory whole") from None
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise BackendError(f"{path}: not a valid tokenizers JSON file ({_first_line(exc)}); re-export the model") from None

    def _load_session(self, optimization: str):
        ort = _ort()
        if not self.path.is_file():
            raise BackendError(f"{self.path}: model file not found")
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise BackendError(f"optimization {optimization!r} unknown; choose one of {', '.join(levels)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.n_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = levels[optimization]
        options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
        try:
            return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's pybind exceptions share no public base class
            message = _first_line(exc)
            if "external" in message.lower() or "data file" in message.lower() or "No such file" in message:
                hint = "its external-data file is missing or truncated; copy the export directory whole"
            elif "contrib" in message.lower() or "com.microsoft" in message:
                hint = "this ONNX Runtime build lacks the com.microsoft operators; use a full build or the GGUF export"
            else:
                hint = "the file is corrupt or truncated, or not an ONNX model; re-export it with `packager export onnx`"
            raise BackendError(f"{self.path}: ONNX Runtime cannot load the model: {hint} ({message})") from None

    def _check_signature(self) -> None:
        inputs = {item.name: item for item in self.session.get_inputs()}
        outputs = {item.name: item for item in self.session.get_outputs()}
        want_in, want_out = graph_input_names(self.n_layers), graph_output_names(self.n_layers)
        missing = [name for name in want_in if name not in inputs]
        unexpected = [name for name in inputs if name not in want_in]
        if missing or unexpected:
            raise BackendError(
                f"{self.path}: graph inputs do not match the export config ({self.n_layers} layers): "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}; this is not a graph written by `packager export onnx`"
            )
        missing_out = [name for name in want_out if name not in outputs]
        if missing_out:
            raise BackendError(f"{self.path}: graph outputs {missing_out[:4]} are missing; re-export with `packager export onnx`")
        past = inputs[past_names(self.n_layers)[0]].shape
        if not (isinstance(past[1], int) and isinstance(past[3], int)):
            raise BackendError(f"{self.path}: the KV cache input {past_names(1)[0]} needs static head dimensions, got {past}")
        self.n_kv_heads, self.head_dim = past[1], past[3]
        vocab = outputs[LOGITS].shape[-1]
        if not isinstance(vocab, int):
            raise BackendError(f"{self.path}: the logits output has no static vocabulary size ({outputs[LOGITS].shape})")
        self._n_vocab = vocab
        tokens = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if tokens > vocab:
            raise BackendError(
                f"{self.path}: the tokenizer has {tokens} tokens but the model's vocabulary has {vocab}: "
                f"tokenizer and model do not belong together; use the tokenizer.json exported with this model"
            )

    # -- primitives --------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        # special=False: text such as "<|eos|>" inside a user's sentence stays text
        self.tokenizer.encode_special_tokens = not special
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        finally:
            self.tokenizer.encode_special_tokens = False

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)

    def _empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layers)]

    def _run(self, token_ids: Sequence[int], past: list[np.ndarray], n_past: int) -> tuple[np.ndarray, list[np.ndarray]]:
        n_new = len(token_ids)
        if n_past + n_new > self._n_ctx:
            raise BackendError(f"sequence of {n_past + n_new} tokens exceeds the context of {self._n_ctx}")
        logits, present = self._run_batch(np.asarray([token_ids], dtype=np.int64), np.ones((1, n_past + n_new), dtype=np.int64),
                                          np.arange(n_past, n_past + n_new, dtype=np.int64)[None], past)
        return logits[0], present

    def _run_batch(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                   past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph run: ids/positions [B, S], mask [B, P+S]; logits [B, S, V] and the new cache."""
        bad = [int(t) for t in ids.ravel() if not 0 <= int(t) < self._n_vocab]
        if bad:
            raise BackendError(f"token id(s) {bad[:5]} outside the vocabulary of {self._n_vocab}")
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions}
        feeds.update(zip(past_names(self.n_layers), past))
        outputs = self.session.run(self._output_names, feeds)
        return outputs[0], outputs[1:]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("logits of an empty sequence")
        logits, _ = self._run(list(token_ids), self._empty_past(), 0)
        return np.ascontiguousarray(logits, dtype=np.float32)

    def _start(self, token_ids: Sequence[int]) -> np.ndarray:
        logits, self._past = self._run(list(token_ids), self._empty_past(), 0)
        self._n_past = len(token_ids)
        return logits[-1]

    def _step(self, token_id: int) -> np.ndarray:
        if self._past is None:
            raise BackendError("decode step before a prompt: call generate_ids first")
        logits, self._past = self._run([token_id], self._past, self._n_past)
        self._n_past += 1
        return logits[-1]

    def generate_batch(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                       sampling: Sampling = GREEDY) -> list[list[int]]:
        """Up to `max_batch` prompts decoded together (see the module doc), in groups."""
        if self.max_batch == 1 or len(prompts) <= 1:
            return super().generate_batch(prompts, budgets, sampling)
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):
            end = start + self.max_batch
            out += self._generate_group(prompts[start:end], budgets[start:end], sampling)
        return out

    def _generate_group(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                        sampling: Sampling) -> list[list[int]]:
        """`generate_ids` for each prompt (same stops, budgets, per-prompt random stream), as rows
        of one batch: prompts left-padded (mask 0), then one token per live row per step."""
        limits, rngs, outputs = self._group_start(prompts, budgets, sampling)
        stop = self.stop_ids
        live = [seq for seq, limit in enumerate(limits) if limit > 0]
        if not live:
            return outputs
        # each prompt alone (the graph returns logits for every prompt position: one prompt's
        # worth at a time), its cache left-padded to the longest with mask 0
        width = max(len(prompts[seq]) for seq in live)
        mask = np.zeros((len(live), width), dtype=np.int64)
        last, caches = [], []
        started = time.perf_counter()
        for row, seq in enumerate(live):
            n = len(prompts[seq])
            logits, cache = self._run(list(prompts[seq]), self._empty_past(), 0)
            last.append(logits[-1].copy())
            caches.append([np.pad(c, ((0, 0), (0, 0), (width - n, 0), (0, 0))) for c in cache])
            mask[row, width - n:] = 1
        past = [np.concatenate(layer, axis=0) for layer in zip(*caches)]
        logits = np.stack(last)
        del caches, last
        self.timings.prefill_seconds += time.perf_counter() - started
        self.timings.prefill_tokens += sum(len(prompts[seq]) for seq in live)
        while True:
            rows = self._group_step(logits, live, sampling, rngs, stop, outputs, limits)
            tokens = [outputs[live[row]][-1] for row in rows]
            if not rows:
                return outputs
            if len(rows) < len(live):  # finished rows leave the batch and the cache
                past, mask = [p[rows] for p in past], mask[rows]
                live = [live[row] for row in rows]
            # the padded width may pass n_ctx; each row's own positions stay within its limit
            mask = np.concatenate([mask, np.ones((len(live), 1), dtype=np.int64)], axis=1)
            step_positions = np.asarray([[len(prompts[seq]) + len(outputs[seq]) - 1] for seq in live], dtype=np.int64)
            started = time.perf_counter()
            logits, past = self._run_batch(np.asarray(tokens, dtype=np.int64)[:, None], mask, step_positions, past)
            logits = logits[:, -1]
            self.timings.decode_seconds += time.perf_counter() - started
            self.timings.decode_tokens += len(live)

    def close(self) -> None:
        self._past = None
        self.session = None
