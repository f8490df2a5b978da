"""Calibration of a GGUF parent in llama.cpp (issue 14), on the default model's GGUF:

1. overhead of the eval callback: the capture decodes (prompt + reference, logits for every
   token) with the router tap (routing only, and routing + REAP) against the same decodes in
   a context without a callback; runs interleaved, process CPU time (wall time too), medians
   (target: <= 2x);
2. agreement with the transformers path at F32, teacher-forced: routing mass and REAP
   relative difference, selection-count mismatches;
3. quantized parents (Q8_0, Q4_K_M from llama.cpp's quantizer): per-layer Spearman
   correlation of routing mass (sequence span, both directions summed; and en-de alone, the
   plan's signal) against F32, and the IoU of the resulting 50% uniform en->de plans.

The GGUFs are written by the project's own exporter (`export_gguf`, `quantize_gguf`) into a
work directory. Data: data/harvest/dev.jsonl when present (`make data-eval`), otherwise
the English sentences below (generation mode for the agreement and quantization parts).

Usage: python -m bench.calibration_gguf_bench [--sentences 64] [--repeats 5]
       [--threads 1] [--out bench/results/calibration_gguf.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default"
HARVEST_DEV = ROOT / "data" / "harvest" / "dev.jsonl"
# written for this benchmark (UI-string style, like the default model's training data)
FALLBACK = [
    "Open the file", "Save the document", "Close the window", "Insert a new table", "Delete the selected rows",
    "Print the current page", "Show hidden files", "The file could not be opened.", "Check for updates",
    "Rename the folder", "Copy the link address", "Undo the last change", "Select all", "Paste as plain text",
    "Export as PDF", "Open a new tab", "Do you want to save your changes?", "The connection was lost.",
    "Add a bookmark", "Zoom in", "Zoom out", "Find and replace", "Sort by name", "Sort by date",
    "The printer is not responding.", "Restart the application", "Move to trash", "Empty the trash",
    "Import contacts", "Edit the preferences", "Hide the toolbar", "Show the status bar",
]


def spearman(a, b) -> float:
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = x.argsort(kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average ranks of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def data_file(work: Path, sentences: int) -> tuple[Path, bool]:
    """(data file, has references)."""
    if HARVEST_DEV.is_file():
        lines = [line for line in HARVEST_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
        en_de = [r for r in records if {r["src_lang"], r["tgt_lang"]} == {"en", "de"}]
        step = max(1, len(en_de) // sentences)  # spread over the split (it is sorted by source)
        chosen = en_de[::step][:sentences]
        path = work / "dev.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
        return path, True
    path = work / "fallback.txt"
    path.write_text("\n".join(FALLBACK[:sentences]) + "\n", encoding="utf-8")
    return path, False


def measure_overhead(gguf_file: Path, data: Path, teacher_forced: bool, repeats: int, threads: int) -> dict:
    from packager.calibrate_gguf import LlamaCalibrationModel, PromptBuilder, _packs, inspect_gguf
    from packager.calibration_data import CalibrationSettings, read_examples
    from runtime.prompt import PromptRenderer

    settings = CalibrationSettings(pairs=("en-de",), teacher_forced=teacher_forced, max_sentences=None, text_lang="en",
                                   max_new_tokens=32)
    examples = read_examples([data], settings)["en-de"]
    parent = inspect_gguf(gguf_file)
    results = {}
    for reap in (False, True):
        model = LlamaCalibrationModel(parent, reap=reap, n_threads=threads)
        renderer = PromptRenderer(parent.chat_template, special_tokens=model.special_tokens())
        builder = PromptBuilder(None, None, settings.prompt_template, renderer=renderer, encode=model.encode_with_offsets)
        sequences = []
        for ex in examples:
            ids, _ = builder.encode(ex.pair, ex.source)
            out = model.encode_with_offsets(ex.target)[0] + [model.eos_id] if teacher_forced else model.generate(ids, 32)
            sequences.append(ids + out)
        packs = _packs([len(s) for s in sequences], 16, model.token_budget)
        plain_ctx, plain_batch = model._context("plain", 2048, 16)

        def plain():
            for pack in packs:
                model._clear(plain_ctx)
                model._decode(plain_ctx, plain_batch, [sequences[i] for i in pack], all_logits=True)

        def tapped():
            for pack in packs:
                model.capture([sequences[i] for i in pack])

        plain(), tapped()  # warm-up
        times = {"plain": [], "tap": []}
        walls = {"plain": [], "tap": []}
        callback_seconds = []
        for repeat in range(repeats):
            for name, run in (("plain", plain), ("tap", tapped)) if repeat % 2 == 0 else (("tap", tapped), ("plain", plain)):
                before = model.tap.seconds
                cpu, wall = time.process_time(), time.perf_counter()
                run()
                times[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - wall)
                if name == "tap":
                    callback_seconds.append(model.tap.seconds - before)
        model.close()
        plain_s, tap_s = statistics.median(times["plain"]), statistics.median(times["tap"])
        plain_w, tap_w = statistics.median(walls["plain"]), statistics.median(walls["tap"])
        results["routing+reap" if reap else "routing"] = {
            "plain_cpu_seconds_median": round(plain_s, 4), "tap_cpu_seconds_median": round(tap_s, 4),
            "ratio": round(tap_s / plain_s, 3),
            "plain_wall_seconds_median": round(plain_w, 4), "tap_wall_seconds_median": round(tap_w, 4),
            "wall_ratio": round(tap_w / plain_w, 3), "callback_seconds_median": round(statistics.median(callback_seconds), 4),
            "tokens": int(sum(len(s) for s in sequences)), "sequences": len(sequences), "decodes": len(packs),
            "tokens_per_second_tap": round(sum(len(s) for s in sequences) / tap_s, 1),
        }
        print(f"overhead {'routing+reap' if reap else 'routing'}: plain {plain_s:.3f} s, tap {tap_s:.3f} s, "
              f"x{tap_s / plain_s:.2f}", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration_gguf.json")
    parser.add_argument("--skip-quant", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from converters.gguf.export import export_gguf
    from converters.gguf.quantize import quantize_gguf
    from packager.calibrate_gguf import calibrate_gguf
    from packager.calibration_data import CalibrationSettings
    from packager.planning import PlanSettings, global_iou, plan_keep

    result: dict = {"model": str(args.model), "threads": args.threads, "machine": platform.machine(),
                    "cpus": os.cpu_count(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory(prefix="calibration-gguf-bench-") as tmp:
        work = Path(tmp)
        data, references = data_file(work, args.sentences)
        result["data"] = {"source": str(HARVEST_DEV) if references else "built-in English sentences", "sentences": args.sentences,
                          "mode": "teacher-forced" if references else "generate"}
        started = time.perf_counter()
        f32 = export_gguf(args.model, work / "default.f32.gguf", dtype="f32")
        result["export_seconds"] = round(time.perf_counter() - started, 2)

        result["overhead"] = measure_overhead(f32, data, references, args.repeats, args.threads)

        # agreement with transformers at F32
        import numpy as np

        from packager.calibrate import calibrate

        pairs = ("en-de", "de-en") if references else ("en-de",)
        settings = CalibrationSettings(pairs=pairs, teacher_forced=references, max_sentences=None, text_lang="en",
                                       max_new_tokens=32)
        started = time.perf_counter()
        reference = calibrate(args.model, [data], settings)
        hf_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ours = calibrate_gguf(f32, [data], settings, n_threads=args.threads)
        gguf_seconds = time.perf_counter() - started
        agreement: dict = {"transformers_seconds": round(hf_seconds, 2), "gguf_seconds": round(gguf_seconds, 2),
                           "fingerprint_equal": ours.meta["model_fingerprint"] == reference.meta["model_fingerprint"],
                           "tensors_equal_names": sorted(ours.tensors) == sorted(reference.tensors)}
        worst = {"mass": 0.0, "reap": 0.0}
        mismatches, selections, count_diff = 0, 0, 0
        for name, ref in reference.tensors.items():
            signal = name.split("/")[0]
            value = ours.tensors.get(name)
            if value is None:
                continue
            if signal in worst:
                worst[signal] = max(worst[signal], float(np.abs(value - ref).max() / max(np.abs(ref).max(), 1e-12)))
            elif signal == "selected":
                mismatches += int(np.abs(value - ref).sum()) // 2  # a flip moves one count out and one in
                selections += int(ref.sum())
            else:
                count_diff += int(np.abs(value - ref).sum())
        agreement.update({"mass_max_rel_diff": worst["mass"], "reap_max_rel_diff": worst["reap"],
                          "selection_flips": mismatches, "selections": selections, "token_count_differences": count_diff})
        result["agreement_f32"] = agreement
        print(f"agreement F32: {agreement}", file=sys.stderr, flush=True)

        if not args.skip_quant:
            plan_settings = PlanSettings(langs=("de",), drop_ratio=0.5, uniform=True)
            base_keep, _ = plan_keep(ours, plan_settings)
            base_mass = sum(ours.get("mass", pair, "sequence") for pair in pairs)
            base_en_de = ours.get("mass", "en-de", "sequence")  # the signal the plan ranks by
            result["quantized"] = {}
            for quant in ("Q8_0", "Q4_K_M"):
                qfile = quantize_gguf(f32, work / f"default.{quant}.gguf", quant)
                qstats = calibrate_gguf(qfile, [data], settings, n_threads=args.threads)
                qmass = sum(qstats.get("mass", pair, "sequence") for pair in pairs)
                rho = [spearman(base_mass[pos], qmass[pos]) for pos in range(base_mass.shape[0])]
                q_en_de = qstats.get("mass", "en-de", "sequence")
                rho_en_de = [spearman(base_en_de[pos], q_en_de[pos]) for pos in range(base_en_de.shape[0])]
                keep, _ = plan_keep(qstats, plan_settings)
                result["quantized"][quant] = {
                    "fingerprint_equal": qstats.meta["model_fingerprint"] == ours.meta["model_fingerprint"],
                    "spearman_per_layer": [round(r, 4) for r in rho], "spearman_min": round(min(rho), 4),
                    "spearman_per_layer_en_de": [round(r, 4) for r in rho_en_de],
                    "plan_iou_vs_f32": round(global_iou([base_keep, keep]), 4), "file_bytes": qfile.stat().st_size,
                }
                print(f"{quant}: {result['quantized'][quant]}", file=sys.stderr, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
