"""Greedy probe of an ONNX export through the runtime's own ONNX backend, for bench/device_check.py.

Runs under any Python that has onnxruntime, numpy, tokenizers and jinja2, including an aarch64
Python under qemu-user (so it imports only the runtime, never the packager or llama_cpp).
Usage: python onnx_greedy_probe.py EXPORT_DIR N_PREDICT SENTENCE... ; prints one JSON object:
per sentence the generated ids and text and the top-1 minus top-2 logit gap at every step.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from runtime.backends.onnx_backend import OnnxBackend  # noqa: E402
from runtime.schema import ExportConfig  # noqa: E402


def main() -> int:
    export_dir, n_predict, sentences = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    config_path = next(export_dir.glob("*.export.json"))
    config = ExportConfig.load(config_path)
    model = export_dir / config.model_files[0]
    backend = OnnxBackend.load(model, config, n_threads=1)
    stop = backend.stop_ids
    out = {"machine": platform.machine(), "sentences": []}
    for s in sentences:
        prompt = backend.prompt_ids(s, "en", "de")
        t0 = time.perf_counter()
        logits = np.asarray(backend._start(prompt), dtype=np.float64).reshape(-1)
        ids: list[int] = []
        gaps: list[float] = []
        runner_up: list[int] = []
        for _ in range(n_predict):
            order = np.argsort(-logits, kind="stable")[:2]
            gaps.append(float(logits[order[0]] - logits[order[1]]))
            runner_up.append(int(order[1]))
            tok = int(order[0])
            if tok in stop:
                ids.append(tok)
                break
            ids.append(tok)
            logits = np.asarray(backend._step(tok), dtype=np.float64).reshape(-1)
        seconds = time.perf_counter() - t0
        text_ids = [i for i in ids if i not in stop]
        out["sentences"].append({"source": s, "ids": ids, "text": backend.detokenize(text_ids),
                                 "top1_minus_top2": gaps, "runner_up": runner_up,
                                 "tok_per_s": round(len(ids) / seconds, 2) if seconds else None})
    backend.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
