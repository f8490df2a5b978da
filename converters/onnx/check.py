"""Compare an exported graph with the transformers model it came from: logits after a prefill
and after cached decode steps, on several token sequences (one example input is not enough:
a wrongly traced router would pass on the example and fail elsewhere).

Used by the exporter as a guard and by the tests for the parity numbers."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.backends.onnx_backend import (
    ATTENTION_MASK, INPUT_IDS, POSITION_IDS, graph_output_names, past_names,
)

logger = logging.getLogger(__name__)


@dataclass
class ParityReport:
    """Max abs logit difference (ONNX vs transformers) and greedy-token agreement."""

    prefill_max_abs: float = 0.0
    decode_max_abs: float = 0.0
    positions: int = 0
    argmax_agree: int = 0
    sequences: list[dict] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max(self.prefill_max_abs, self.decode_max_abs)

    @property
    def argmax_agreement(self) -> float:
        return self.argmax_agree / self.positions if self.positions else 1.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["max_abs"] = self.max_abs
        data["argmax_agreement"] = self.argmax_agreement
        return data


def open_session(model_path: str | Path, n_threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_graph(session, token_ids: np.ndarray, past: list[np.ndarray], n_layers: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call: token_ids [B, S] after `past` (all sequences equally long, no padding)."""
    batch, seq = token_ids.shape
    n_past = past[0].shape[2]
    feeds = {
        INPUT_IDS: token_ids.astype(np.int64),
        ATTENTION_MASK: np.ones((batch, n_past + seq), dtype=np.int64),
        POSITION_IDS: np.broadcast_to(np.arange(n_past, n_past + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    feeds.update(zip(past_names(n_layers), past))
    outputs = session.run(graph_output_names(n_layers), feeds)
    return outputs[0], outputs[1:]


def empty_past(n_layers: int, n_kv_heads: int, head_dim: int, batch: int = 1) -> list[np.ndarray]:
    return [np.zeros((batch, n_kv_heads, 0, head_dim), dtype=np.float32) for _ in range(2 * n_layers)]


def probe_sequences(vocab_size: int, seed: int = 0, lengths: Sequence[int] = (9, 4, 1)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


def compare_with_transformers(session, model, prompts: Sequence[Sequence[int]], n_layers: int, n_kv_heads: int,
                              head_dim: int, decode_steps: int = 3) -> ParityReport:
    """Prefill each prompt, then `decode_steps` greedy steps through the KV cache; compare the
    logits of every step with transformers' full forward over the same tokens."""
    import torch

    report = ParityReport()
    for prompt in prompts:
        tokens = list(prompt)
        logits, past = run_graph(session, np.asarray([tokens]), empty_past(n_layers, n_kv_heads, head_dim), n_layers)
        with torch.no_grad():
            reference = model(torch.tensor([tokens])).logits[0].float().numpy()
        prefill = float(np.abs(reference - logits[0]).max())
        report.prefill_max_abs = max(report.prefill_max_abs, prefill)
        report.positions += len(tokens)
        report.argmax_agree += int((reference.argmax(-1) == logits[0].argmax(-1)).sum())
        decode = 0.0
        for _ in range(decode_steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits, past = run_graph(session, np.asarray([[tokens[-1]]]), past, n_layers)
            with torch.no_grad():
                reference = model(torch.tensor([tokens])).logits[0, -1].float().numpy()
            decode = max(decode, float(np.abs(reference - logits[0, -1]).max()))
            report.positions += 1
            report.argmax_agree += int(reference.argmax() == logits[0, -1].argmax())
        report.decode_max_abs = max(report.decode_max_abs, decode)
        report.sequences.append({"length": len(prompt), "prefill_max_abs": prefill, "decode_max_abs": decode})
    return report
