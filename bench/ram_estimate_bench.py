"""`packager fit`'s RAM estimate against measured peak RSS, per bundle (issue 19, part 3).

For every bundle in a directory (default runs/demo/bundles, what `make demo` builds): the peak
RSS `packager verify` measured (the manifest's metrics.footprint.peak_rss_bytes: VmHWM of the
verify process after a reset, memory-mapped model pages included, one thread), and
`packager.fit.estimate_ram_bytes` without its 10% margin (the figure `fit` uses when a bundle
has no measured `min_ram_bytes`), with its terms. Writes bench/results/ram_estimate.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "ram_estimate.json"
MIB = 1 << 20


def bundle_row(bundle: Path) -> dict:
    from packager.fit import RAM_MARGIN, RUNTIME_BYTES, estimate_ram_bytes, gguf_memory_breakdown, onnx_session_bytes

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    footprint = manifest["metrics"]["footprint"]
    model = bundle / manifest["model_files"][0]
    storage = sum(entry["bytes"] for entry in manifest["files"].values())
    estimate = estimate_ram_bytes(model, manifest["format"], storage) / RAM_MARGIN
    terms = {"runtime_bytes": RUNTIME_BYTES[manifest["format"]]}
    if manifest["format"] == "gguf":
        terms["dry_run"] = gguf_memory_breakdown(model)
    else:
        terms["onnx_session_bytes"] = onnx_session_bytes(bundle)
    peak = int(footprint["peak_rss_bytes"])
    return {"bundle": bundle.name, "format": manifest["format"], "files_bytes": storage,
            "measured_peak_rss_bytes": peak, "measured_threads": footprint.get("threads"),
            "estimate_bytes_without_margin": int(estimate), "ratio": round(estimate / peak, 3), "terms": terms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="?", default=str(REPO / "runs" / "demo" / "bundles"))
    args = ap.parse_args()
    root = Path(args.bundles)
    bundles = sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
    if not bundles:
        print(f"error: no bundles under {root}; run `make demo` or give a directory of bundles", file=sys.stderr)
        return 1
    rows = [bundle_row(b) for b in bundles]
    ratios = [r["ratio"] for r in rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"bundles_dir": str(root), "rows": rows,
                                   "ratio_min": min(ratios), "ratio_max": max(ratios)}, indent=1) + "\n")
    print("| bundle | measured peak RSS (MiB) | estimate (MiB) | estimate / measured |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['measured_peak_rss_bytes'] / MIB:.1f} | {r['estimate_bytes_without_margin'] / MIB:.1f} "
              f"| {r['ratio']:.3f} |")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
