"""Whole-model vs layer-streamed calibration of a synthetic checkpoint with Qwen3-30B-A3B layer
shapes (bench.prune_bench builds it: hidden 2048, 128 experts of width 768, top-8, bf16 values
N(0, 0.02)), at 4 and 8 decoder layers.

Each run is `packager calibrate --teacher-forced --dtype bfloat16` in a child process, sampled
every 10 ms from /proc: wall time, peak total RSS (VmHWM) and peak anonymous RSS. `cp` of the
checkpoint (fsynced) is the I/O reference, in the same run. Inputs are read once before every
timed run, so all runs start from the same warm page cache. The whole-model run is skipped
where it would not fit in RAM (it is the reason streaming exists) and the result says so.

Targets (issue 13): streamed peak RSS <= 1.5 GiB at bfloat16 whatever the number of layers,
streamed time <= 2x whole-model time.

Usage: python -m bench.calibration_stream_bench [--layers 4 8] [--sentences 32]
Writes bench/results/calibration_stream.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from bench.prune_bench import SHAPES, _CP_FSYNC, _read_all, build_input, run_measured

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "calibration_stream.json"
TARGET_STREAMED_RSS_BYTES = int(1.5 * 1024**3)
TARGET_TIME_RATIO = 2.0
WHOLE_MODEL_FACTOR = 1.9  # measured whole-model peak RSS / checkpoint bytes (4 layers)

# sentences written for this benchmark (the project's own), English -> German
SENTENCES = [
    ("Open the file you saved yesterday.", "Öffne die Datei, die du gestern gespeichert hast."),
    ("The window closes when the task is done.", "Das Fenster schließt sich, wenn die Aufgabe erledigt ist."),
    ("Choose a folder for the new pictures.", "Wähle einen Ordner für die neuen Bilder."),
    ("This setting changes the size of the text.", "Diese Einstellung ändert die Größe des Textes."),
    ("The printer is not ready yet.", "Der Drucker ist noch nicht bereit."),
    ("Press the button to start the download.", "Drücke die Taste, um den Download zu starten."),
    ("Your changes will be lost if you quit now.", "Deine Änderungen gehen verloren, wenn du jetzt beendest."),
    ("The connection to the server was interrupted.", "Die Verbindung zum Server wurde unterbrochen."),
]


def write_tokenizer(model_dir: Path) -> None:
    """A byte-level tokenizer (every UTF-8 byte one token, no merges) plus the special tokens and
    chat template calibration needs; ids stay far below the synthetic vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>", "<|en|>", "<|de|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}))
    (model_dir / "chat_template.jinja").write_text(
        "{{ bos_token }}<|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>")
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))


def write_data(path: Path, n: int) -> Path:
    rows = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    path.write_text("".join(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": f"{s} ({i})", "tgt": f"{t} ({i})"}) + "\n"
                            for i, (s, t) in enumerate(rows)))
    return path


def calibrate_cmd(model_dir: Path, data: Path, out: Path, execution: str, sentences: int) -> list[str]:
    exe = Path(sys.executable).parent / "packager"
    return [str(exe), "calibrate", str(model_dir), "--data", str(data), "--pairs", "en-de", "--teacher-forced",
            "--dtype", "bfloat16", "--max-sentences", str(sentences), "--batch-size", "16", "--execution", execution,
            "--device", "cpu", "--out", str(out), "--force"]


def measure_layers(work: Path, n_layers: int, sentences: int) -> dict:
    model_dir = work / f"parent-{n_layers}L"
    print(f"[{n_layers} layers] building the synthetic checkpoint in {model_dir}", flush=True)
    ckpt_bytes = build_input(model_dir, n_layers, values="normal")
    write_tokenizer(model_dir)
    data = write_data(work / "data.jsonl", sentences)
    row: dict = {"layers": n_layers, "checkpoint_bytes": ckpt_bytes}

    _read_all(model_dir)
    os.sync()
    cp_dir = work / "cp-copy"
    shutil.rmtree(cp_dir, ignore_errors=True)
    cp = run_measured([sys.executable, "-c", _CP_FSYNC, str(model_dir), str(cp_dir)])
    shutil.rmtree(cp_dir, ignore_errors=True)
    row["cp_seconds"] = round(cp["seconds"], 2)

    import psutil

    for execution in ("streamed", "whole"):
        need = int(ckpt_bytes * WHOLE_MODEL_FACTOR)
        available = psutil.virtual_memory().available
        if execution == "whole" and need > available - 2 * 1024**3:
            row["whole"] = {"skipped": f"needs about {need / 1e9:.1f} GB of RAM, {available / 1e9:.1f} GB available"}
            print(f"[{n_layers} layers] whole: skipped ({row['whole']['skipped']})", flush=True)
            continue
        _read_all(model_dir)
        os.sync()
        out = work / f"stats-{n_layers}L-{execution}.safetensors"
        print(f"[{n_layers} layers] {execution} calibration", flush=True)
        run = run_measured(calibrate_cmd(model_dir, data, out, execution, sentences))
        from packager.core.stats import RoutingStats

        prov = RoutingStats.load(out).meta["provenance"][0]
        tokens = sum(prov["tokens"].values())
        row[execution] = {
            "seconds": round(run["seconds"], 2),
            "calibration_seconds": prov["seconds"],
            "tokens": tokens,
            "tokens_per_second": round(tokens / prov["seconds"], 1),
            "peak_rss_total_bytes": run["peak_rss_total_bytes"],
            "peak_rss_anon_bytes": run["peak_rss_anon_bytes"],
            "peak_rss_over_checkpoint": round(run["peak_rss_total_bytes"] / ckpt_bytes, 3),
            "streaming": prov.get("streaming"),
        }
        print(f"[{n_layers} layers] {execution}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_total_bytes'] / 2**30:.2f} GiB",
              flush=True)
    streamed, whole = row.get("streamed", {}), row.get("whole", {})
    if "seconds" in whole and "seconds" in streamed:
        row["time_ratio_streamed_over_whole"] = round(streamed["seconds"] / whole["seconds"], 3)
        row["memory_ratio_streamed_over_whole"] = round(streamed["peak_rss_total_bytes"] / whole["peak_rss_total_bytes"], 3)
    row["streamed_over_cp_seconds"] = round(streamed["seconds"] / cp["seconds"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "calibrate",
                        help="scratch directory for the synthetic checkpoints (outside git)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-files", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args(argv)

    from packager import __version__
    from packager.core.checkpoint import atomic_write_json

    args.work.mkdir(parents=True, exist_ok=True)
    layer_bytes = 3 * 2 * SHAPES["num_experts"] * SHAPES["moe_intermediate_size"] * SHAPES["hidden_size"]
    largest = max(args.layers) * layer_bytes + 4 * SHAPES["vocab_size"] * SHAPES["hidden_size"]
    free = shutil.disk_usage(args.work).free
    if free < largest + 2 * 1024**3:
        print(f"error: {args.work}: needs {(largest + 2 * 1024**3) / 1e9:.1f} GB free, has {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    rows = []
    for n_layers in args.layers:
        rows.append(measure_layers(args.work, n_layers, args.sentences))
        if not args.keep_files:
            shutil.rmtree(args.work / f"parent-{n_layers}L", ignore_errors=True)
    streamed_peaks = [r["streamed"]["peak_rss_total_bytes"] for r in rows]
    ratios = [r["time_ratio_streamed_over_whole"] for r in rows if "time_ratio_streamed_over_whole" in r]
    result = {
        "benchmark": "calibration_stream", "created_unix": int(time.time()),
        "command": [sys.executable, "-m", "bench.calibration_stream_bench", *(argv or sys.argv[1:])],
        "input": {"shapes": SHAPES, "dtype": "bf16", "values": "N(0, 0.02)", "sentences": args.sentences,
                  "mode": "teacher-forced", "compute_dtype": "bfloat16"},
        "method": {"cache": "inputs read once and os.sync() before every timed run",
                   "rss": "child sampled every 10 ms from /proc/<pid>/status; total = VmHWM",
                   "cp": "cp -r of the checkpoint with fsync, the I/O reference"},
        "rows": rows,
        "targets": {"streamed_peak_rss_bytes": TARGET_STREAMED_RSS_BYTES, "time_ratio_streamed_over_whole": TARGET_TIME_RATIO},
        "pass": {"memory": max(streamed_peaks) <= TARGET_STREAMED_RSS_BYTES,
                 "time": bool(ratios) and max(ratios) <= TARGET_TIME_RATIO},
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"packager": __version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    for row in rows:
        whole = row.get("whole", {})
        whole_text = (f"whole {whole['seconds']:.1f} s / {whole['peak_rss_total_bytes'] / 2**30:.2f} GiB"
                      if "seconds" in whole else f"whole skipped ({whole.get('skipped')})")
        print(f"{row['layers']} layers ({row['checkpoint_bytes'] / 1e9:.1f} GB): streamed {row['streamed']['seconds']:.1f} s / "
              f"{row['streamed']['peak_rss_total_bytes'] / 2**30:.2f} GiB; {whole_text}; cp {row['cp_seconds']:.1f} s")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
