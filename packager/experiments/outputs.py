"""What a run writes: results.json, `packager verify`-style metrics records and their report,
the plots and the Markdown page."""
from __future__ import annotations

from pathlib import Path

from packager.experiments.page import render_markdown
from packager.experiments.plots import slug as _slug, write_plots

# ---- outputs ------------------------------------------------------------------------------------------------
def report_metrics(results: dict) -> list[dict]:
    """The sweep as `packager verify` metrics records (schema packager.metrics/1), one per pack
    and setting, so `packager report` draws them. Mask mode runs no device runtime: file_bytes
    is the tensor bytes the pruned checkpoint would hold; memory and speed are absent."""
    from packager.verify import METRICS_SCHEMA

    records = []
    test = {"file": results["data"]["test"]["path"], "sha256": results["data"]["test"]["sha256"],
            "selection": results["setup"]["test_sample"]["selection"]}
    footprint_none = {"peak_rss_bytes": None, "peak_rss_anon_bytes": None, "peak_rss_above_baseline_bytes": None,
                      "load_seconds": None, "prefill_tokens_per_second": None, "decode_tokens_per_second": None, "threads": None}
    model = results["model"]
    for pack, parent in results["parent"]["packs"].items():
        records.append({"schema": METRICS_SCHEMA, "labels": {"pack": pack, "role": "parent", "name": "parent"},
                        "model": {"format": "mask", "quantization": None, "fingerprint": model["fingerprint"]},
                        "directions": parent["directions"], "footprint": {"file_bytes": model["tensor_bytes"], **footprint_none},
                        "test": test})
    for row in results["sweep"]:
        if "error" in row:
            continue
        name = f"{row['ranker']}-{row['allocation']}-{100 * row['drop']:g}"
        records.append({
            "schema": METRICS_SCHEMA,
            "labels": {"pack": row["pack"], "role": "pruned", "name": name, "ranker": row["ranker"],
                       "allocation": row["allocation"], "drop_ratio": row["drop"]},
            "model": {"format": "mask", "quantization": None, "parent_n_experts": model["n_experts"],
                      "n_experts": {str(layer_idx): n for layer_idx, n in zip(model["moe_layers"], row["counts"])}},
            "directions": row["directions"], "footprint": {"file_bytes": row["tensor_bytes"], **footprint_none}, "test": test})
    return records


def write_outputs(results: dict, out_dir: Path, results_md: Path | None) -> None:
    from runtime.atomic import atomic_write_json, atomic_write_text

    plots = write_plots(results, out_dir / "plots")
    results["plots"] = [str(p.relative_to(out_dir)) for p in plots]
    metrics_dir = out_dir / "report-metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    metrics_files = []
    for record in report_metrics(results):
        labels = record["labels"]
        path = metrics_dir / f"{_slug(labels['pack'])}-{labels['name']}.metrics.json"
        atomic_write_json(path, record)
        metrics_files.append(path)
    from packager.report import build_report

    results["report"] = str(build_report([metrics_dir], out_dir / "report", command=results["provenance"]["command"],
                                         metrics_files=metrics_files).relative_to(out_dir))
    atomic_write_json(out_dir / "results.json", results)
    if results_md is not None:
        results_md.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_md, render_markdown(results, out_dir, results_md))


def write_reduce_outputs(results: dict, out_dir: Path, page: Path | None) -> None:
    """`--only reduce`: OUT/reduce.json and a short page (the setup and the reduce section)."""
    from packager.experiments.page import reduce_page
    from runtime.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "reduce.json", results)
    if page is not None:
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, reduce_page(results))
