"""The device runtime's own footprint before a model loads (issue 19, part 4).

For each bundle format (the default model exported to GGUF F16 and to ONNX fp32), fresh
processes measure what `edge-translate` costs before the weights arrive:
- `import runtime.cli` (the entry point: click, languages, errors);
- opening the model: resolving its config, the backend module and the backend's library
  (llama-cpp-python / ONNX Runtime + tokenizers), i.e. everything up to the model load;
- VmRSS at that point (the baseline of `packager verify`'s peak RSS) and which heavy
  libraries are in the process (a GGUF bundle must never import onnxruntime, and vice versa);
- then the model load itself, the RSS after it, and the peak RSS of translating 20 en->de test
  segments (max 128 new tokens, as verify): the figure `packager fit`'s runtime constant
  (RUNTIME_BYTES) is derived from, as that peak minus what the dry run accounts for.
Median of RUNS processes. The GGUF case also runs as the runtime did before issue 19
(`import llama_cpp`, the whole package, instead of its low-level binding only), in the same
run so that machine load affects both alike. Writes bench/results/runtime_baseline.json
(`--label` names the run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "runtime_baseline.json"
RUNS = 5
HEAVY = ("onnxruntime", "llama_cpp", "llama_cpp.llama", "tokenizers", "numpy", "jinja2", "torch", "transformers", "gguf",
         "rich", "diskcache")
TEST_SPLIT = ROOT / "data" / "harvest" / "eval" / "test.jsonl"
N_SEGMENTS = 20  # en->de test segments, spread evenly over the split (as verify picks them)

CHILD = r"""
import json, resource, sys, time
def status():
    out = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'VmHWM'):
            out[key] = int(value.split()[0]) * 1024
    return out
t0 = time.perf_counter()
import runtime.cli
t_cli = time.perf_counter()
from runtime.backends import backend_class, resolve_model
model_file, config = resolve_model(sys.argv[1])
cls = backend_class(config.format)
before_backend = status()  # runtime imported, backend library not yet
if config.format == 'gguf':
    from runtime.backends.llama_cpp_backend import llama_module
    if sys.argv[4] == 'package':  # what the runtime did before: the whole llama_cpp package
        import llama_cpp
    llama_module()
else:
    from runtime.backends.onnx_backend import _ort
    _ort()
    import tokenizers
t_open = time.perf_counter()
before = status()
with open('/proc/self/clear_refs', 'w') as f:  # peak from here on (VmHWM = VmRSS), as verify does
    f.write('5')
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
backend = cls.load(model_file, config, n_threads=1)
t_load = time.perf_counter()
after = status()
for text in json.loads(sys.argv[3]):
    backend.translate(text, 'en', 'de', max_new_tokens=128)
peak = status()
print(json.dumps({'import_cli_s': t_cli - t0, 'open_s': t_open - t_cli, 'before_backend_rss': before_backend['VmRSS'],
                  'before_load_rss': before['VmRSS'],
                  'load_s': t_load - t_open, 'after_load_rss': after['VmRSS'], 'peak_rss': peak['VmHWM'],
                  'heavy_modules_before_load': heavy,
                  'modules_after_translate': [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def build_models(work: Path) -> dict[str, Path]:
    from converters.gguf.export import export_gguf
    from converters.onnx.export import export_onnx

    model = ROOT / "models" / "default"
    return {"gguf": export_gguf(model, work / "default.f16.gguf", dtype="f16", force=True),
            "onnx": export_onnx(model, work / "onnx", force=True) / "model.onnx"}


def test_segments() -> list[str]:
    records = [json.loads(line) for line in TEST_SPLIT.read_text(encoding="utf-8").splitlines() if line.strip()]
    en_de = [r["src"] for r in records if (r["src_lang"], r["tgt_lang"]) == ("en", "de")]
    step = max(1, len(en_de) // N_SEGMENTS)
    return en_de[::step][:N_SEGMENTS]


def _child(model: Path, variant: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), json.dumps(HEAVY), json.dumps(test_segments()), variant],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(cases: dict[str, tuple[Path, str]], runs: int) -> dict:
    """Median per case; the cases take turns (one process each per round) so that the machine's
    load affects them alike."""
    rows: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (model, variant) in cases.items():
            rows[name].append(_child(model, variant))
    out = {}
    for name, items in rows.items():
        out[name] = {key: statistics.median(r[key] for r in items) for key in items[0] if not isinstance(items[0][key], list)}
        out[name]["heavy_modules_before_load"] = items[0]["heavy_modules_before_load"]
        out[name]["modules_after_translate"] = items[0]["modules_after_translate"]
        out[name]["runs"] = runs
    return out


def estimate_check(model: Path, fmt: str, row: dict) -> dict:
    """packager.fit's estimate (without its 10% margin) against the measured peak RSS, and the
    runtime constant it uses: the measured peak minus what the dry run accounts for
    (GGUF: weights, KV cache, output buffer, the dry run's own growth; ONNX: the session's RSS)."""
    from packager.fit import RAM_MARGIN, RUNTIME_BYTES, estimate_ram_bytes, gguf_memory_breakdown, onnx_session_bytes

    measured_peak = int(row["peak_rss"])
    estimate = estimate_ram_bytes(model, fmt, 0) / RAM_MARGIN
    if fmt == "gguf":
        dry = gguf_memory_breakdown(model)
        accounted = dry["model"] + dry["kv"] + dry["output"] + dry["load_rss"]
    else:
        dry = {"session": onnx_session_bytes(model),
               "session_in_this_process": int(row["after_load_rss"] - row["before_backend_rss"])}
        accounted = dry["session"]
    return {"dry_run": dry, "measured_peak_rss_bytes": measured_peak,
            "runtime_bytes_measured": measured_peak - accounted, "runtime_bytes_in_packager_fit": RUNTIME_BYTES[fmt],
            "estimate_bytes_without_margin": int(estimate), "ratio": round(estimate / measured_peak, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="name of this run in the results file (e.g. before/after)")
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        run = measure({"gguf, whole llama_cpp package (before issue 19)": (models["gguf"], "package"),
                       "gguf": (models["gguf"], "runtime"), "onnx": (models["onnx"], "runtime")}, args.runs)
        for fmt in ("gguf", "onnx"):
            run[fmt]["ram_estimate"] = estimate_check(models[fmt], fmt, run[fmt])
    results["runs"][args.label] = run
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for fmt, row in run.items():
        print(f"{args.label} {fmt}: import runtime.cli {row['import_cli_s'] * 1000:.0f} ms, open {row['open_s'] * 1000:.0f} ms, "
              f"RSS before load {row['before_load_rss'] / 2**20:.1f} MiB, after load {row['after_load_rss'] / 2**20:.1f} MiB, "
              f"peak {row['peak_rss'] / 2**20:.1f} MiB; loaded before the model: {', '.join(row['heavy_modules_before_load'])}")
    for fmt in ("gguf", "onnx"):
        print(f"{fmt} RAM estimate vs measured peak: {run[fmt]['ram_estimate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
