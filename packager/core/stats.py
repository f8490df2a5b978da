"""The STATS file: routing statistics of one parent model, as sums and counts.

A STATS file is safetensors. Every tensor is float64, shaped [n_moe_layers, n_experts]
(rows follow the `moe_layers` list of the metadata) and named `{signal}/{pair}/{span}`,
`pair` being a direction slug such as `en-de` (runtime.languages.Pair.slug).

Signals (all are sums, so shards of calibration data merge exactly by addition):
- `mass`: sum over sequences of the per-sequence mean, over the span's tokens, of the routing
  weight renormalised over the token's top-k (0 for experts outside the top-k);
- `sequences`: number of sequences with at least one token in the span (same in every cell);
- `selected`: number of tokens whose top-k contains the expert;
- `tokens`: number of tokens in the span (same in every cell);
- `reap`: sum over tokens routed to the expert of gate weight x L2 norm of the expert output
  (the gate weight the model actually applied);
- `reap_tokens`: number of tokens whose REAP term was recorded (equals `selected`).
`reap` and `reap_tokens` are absent when calibration ran without REAP.

Spans: `prompt` (chat-template and prompt-template tokens), `source` (the source text),
`generated` (the model's greedy translation, end token included) or `target` (the reference
translation, teacher-forced), and `sequence` (every token of the sequence: the paper's
per-sequence average). A file holds either `generated` or `target`, never both: prompt and
source routing is the same in both modes, so mixing modes would count it twice.

The JSON metadata (key `packager_stats`) holds the model identity (fingerprint, family, MoE
layer list, expert count, top-k), the calibration settings that must match for a merge (mode,
prompt template, chat-template sha256, generation bound) and a provenance list with one
entry per calibration run (inputs with sha256, command, versions).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packager.core.errors import PackagerError

logger = logging.getLogger(__name__)

FORMAT = "packager-stats/1"
METADATA_KEY = "packager_stats"

MASS, SEQUENCES, SELECTED, TOKENS, REAP, REAP_TOKENS = "mass", "sequences", "selected", "tokens", "reap", "reap_tokens"
ROUTING_SIGNALS = (MASS, SEQUENCES, SELECTED, TOKENS)
REAP_SIGNALS = (REAP, REAP_TOKENS)
SIGNALS = ROUTING_SIGNALS + REAP_SIGNALS

PROMPT, SOURCE, GENERATED, TARGET, SEQUENCE = "prompt", "source", "generated", "target", "sequence"
SPANS = (PROMPT, SOURCE, GENERATED, TARGET, SEQUENCE)
MODE_SPAN = {"generate": GENERATED, "teacher-forced": TARGET}

# Settings that make two calibration runs comparable; a merge refuses to mix them.
IDENTITY_KEYS = ("model_fingerprint", "family", "moe_layers", "n_experts", "top_k")
SETTING_KEYS = ("mode", "prompt_template", "chat_template_sha256", "max_new_tokens", "reap")


class StatsError(PackagerError):
    """A STATS file is unreadable, inconsistent, or does not fit the operation."""


def tensor_name(signal: str, pair: str, span: str) -> str:
    return f"{signal}/{pair}/{span}"


def split_name(name: str) -> tuple[str, str, str]:
    parts = name.split("/")
    if len(parts) != 3:
        raise ValueError(name)
    return parts[0], parts[1], parts[2]


@dataclass
class RoutingStats:
    """Sums and counts per (signal, pair, span); `meta` as described in the module docstring."""

    meta: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    source_path: Path | None = None

    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    @property
    def n_experts(self) -> int:
        return int(self.meta["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.meta["moe_layers"]), int(self.meta["n_experts"]))

    @property
    def has_reap(self) -> bool:
        return bool(self.meta.get("reap"))

    def pairs(self) -> list[str]:
        return sorted({split_name(name)[1] for name in self.tensors})

    def spans(self, pair: str | None = None) -> list[str]:
        found = {split_name(n)[2] for n in self.tensors if pair is None or split_name(n)[1] == pair}
        return [span for span in SPANS if span in found]

    def has(self, signal: str, pair: str, span: str) -> bool:
        return tensor_name(signal, pair, span) in self.tensors

    def get(self, signal: str, pair: str, span: str) -> np.ndarray:
        name = tensor_name(signal, pair, span)
        if name not in self.tensors:
            raise StatsError(
                f"{self._where()}: no {signal!r} statistics for pair {pair!r}, span {span!r} "
                f"(pairs present: {', '.join(self.pairs()) or 'none'}): calibrate that pair"
            )
        return self.tensors[name]

    def add(self, signal: str, pair: str, span: str, values: np.ndarray) -> None:
        """Accumulate `values` (shape [n_moe_layers, n_experts]) into one tensor."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != self.shape:
            raise ValueError(f"{signal}/{pair}/{span}: shape {values.shape} != {self.shape}")
        name = tensor_name(signal, pair, span)
        if name in self.tensors:
            self.tensors[name] = self.tensors[name] + values
        else:
            self.tensors[name] = values.copy()

    def _where(self) -> str:
        return str(self.source_path) if self.source_path else "statistics"

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temporary sibling, fsync, rename)."""
        from runtime.atomic import atomic_write_bytes
        from safetensors.numpy import save

        validate_stats(self)
        path = Path(path)
        if not path.parent.is_dir():
            raise StatsError(f"{path}: directory {path.parent} does not exist: create it or pick another --out")
        ordered = {name: np.ascontiguousarray(self.tensors[name], dtype=np.float64) for name in sorted(self.tensors)}
        data = save(ordered, metadata={METADATA_KEY: json.dumps(self.meta, sort_keys=True)})
        atomic_write_bytes(path, data)
        logger.info("wrote %s (%d tensors)", path, len(ordered))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingStats":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StatsError(f"{path}: no such statistics file: run `packager calibrate` first or fix the path")
        try:
            with safe_open(str(path), framework="np") as handle:
                raw_meta = (handle.metadata() or {}).get(METADATA_KEY)
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise StatsError(f"{path}: not a readable safetensors statistics file ({exc}): recompute it with `packager calibrate`") from None
        if raw_meta is None:
            raise StatsError(f"{path}: safetensors file without {METADATA_KEY!r} metadata: it was not written by `packager calibrate`")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise StatsError(f"{path}: metadata is not valid JSON ({exc}): recompute the file") from None
        stats = cls(meta=meta, tensors=tensors, source_path=path)
        validate_stats(stats)
        return stats


def validate_stats(stats: RoutingStats) -> None:
    """Raise StatsError unless the metadata and tensors are complete and consistent."""
    where = stats._where()
    meta = stats.meta
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StatsError(f"{where}: format {meta.get('format') if isinstance(meta, dict) else None!r} is not {FORMAT!r}: recompute with this version of `packager calibrate`")
    missing = [key for key in IDENTITY_KEYS + ("mode",) if key not in meta]
    if missing:
        raise StatsError(f"{where}: metadata lacks {', '.join(missing)}: recompute the file")
    layers = meta["moe_layers"]
    if not layers or any(not isinstance(i, int) for i in layers) or sorted(set(layers)) != layers:
        raise StatsError(f"{where}: moe_layers {layers!r} must be a non-empty increasing list of layer indices")
    if meta["mode"] not in MODE_SPAN:
        raise StatsError(f"{where}: unknown mode {meta['mode']!r} (expected one of {', '.join(MODE_SPAN)})")
    if not stats.tensors:
        raise StatsError(f"{where}: holds no statistics: calibrate on at least one sentence")
    wrong_output = MODE_SPAN["generate" if meta["mode"] == "teacher-forced" else "teacher-forced"]
    groups: dict[tuple[str, str], set[str]] = {}
    for name, value in stats.tensors.items():
        try:
            signal, pair, span = split_name(name)
        except ValueError:
            raise StatsError(f"{where}: tensor {name!r} is not named signal/pair/span") from None
        if signal not in SIGNALS or span not in SPANS:
            raise StatsError(f"{where}: tensor {name!r} has an unknown signal or span (signals: {', '.join(SIGNALS)}; spans: {', '.join(SPANS)})")
        if span == wrong_output:
            raise StatsError(f"{where}: tensor {name!r} does not belong in a {meta['mode']} file: do not mix generated and teacher-forced runs")
        if value.dtype != np.float64 or value.shape != stats.shape:
            raise StatsError(f"{where}: tensor {name!r} is {value.dtype} {tuple(value.shape)}, expected float64 {stats.shape}")
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            raise StatsError(f"{where}: tensor {name!r} holds negative or non-finite sums: the file is corrupt, recompute it")
        groups.setdefault((pair, span), set()).add(signal)
    wanted = set(ROUTING_SIGNALS) | (set(REAP_SIGNALS) if meta.get("reap") else set())
    for (pair, span), signals in sorted(groups.items()):
        if signals != wanted:
            raise StatsError(f"{where}: pair {pair!r} span {span!r} has signals {sorted(signals)}, expected {sorted(wanted)}: the file is incomplete")


def empty_stats(meta: dict) -> RoutingStats:
    full = {"format": FORMAT, "provenance": [], **meta}
    return RoutingStats(meta=full)


def check_same_model(a: RoutingStats, b: RoutingStats, what: str = "merge") -> None:
    for key in IDENTITY_KEYS:
        if a.meta.get(key) != b.meta.get(key):
            raise StatsError(
                f"cannot {what} {b._where()} with {a._where()}: they come from different models "
                f"({key} {b.meta.get(key)!r} != {a.meta.get(key)!r}): calibrate every shard on the same parent"
            )


def merge_stats(parts: list[RoutingStats]) -> RoutingStats:
    """Exact merge: tensors are added (equal to one run on all the data up to fp64 summation
    order); provenance lists are concatenated. Every part must come from the same model and
    the same calibration settings."""
    if not parts:
        raise StatsError("nothing to merge: give at least one statistics file")
    first = parts[0]
    for other in parts[1:]:
        check_same_model(first, other)
        for key in SETTING_KEYS:
            if first.meta.get(key) != other.meta.get(key):
                raise StatsError(
                    f"cannot merge {other._where()} with {first._where()}: calibration setting {key!r} differs "
                    f"({other.meta.get(key)!r} != {first.meta.get(key)!r}): recompute the shards with the same settings"
                )
    meta = {key: value for key, value in first.meta.items() if key != "provenance"}
    meta["provenance"] = [run for part in parts for run in part.meta.get("provenance", [])]
    merged = RoutingStats(meta=meta)
    for part in parts:
        for name in sorted(part.tensors):
            merged.add(*split_name(name), part.tensors[name])
    return merged
