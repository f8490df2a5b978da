"""packager.report: packs, parent matching, ratios, and the four outputs (HTML self-contained)."""
from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest

from packager.report import ReportError, build_report, find_metrics, group_packs, markdown_table, pack_row
from packager.verify import METRICS_SCHEMA

KINDS = ("empty", "repetition", "length_ratio", "wrong_script", "wrong_language", "lost_placeholder")


def direction(chrf: float, error_rate: float, n: int = 10) -> dict:
    return {"n": n, "chrf++": chrf, "bleu": chrf / 2, "error_rate": error_rate, "reference_error_rate": 0.0,
            "errors": {kind: (round(error_rate * n) if kind == "repetition" else 0) for kind in KINDS},
            "hit_token_limit": 1, "chrf++_ci95": 2.0, "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0",
            "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"}


def metrics(directions: dict, *, fmt="gguf", quant="F16", file_bytes=1_000_000, peak=50_000_000, plan=None, labels=None,
            n_experts=8) -> dict:
    """The shape `packager verify` writes (only what the report reads)."""
    return {
        "schema": METRICS_SCHEMA,
        "labels": labels or {},
        "model": {"format": fmt, "quantization": quant, "plan": plan or {}, "n_experts": {"0": n_experts, "1": n_experts},
                  "parent_n_experts": 8, "path": "x"},
        "directions": directions,
        "footprint": {"file_bytes": file_bytes, "peak_rss_bytes": peak, "peak_rss_anon_bytes": peak // 2,
                      "peak_rss_above_baseline_bytes": peak - 30_000_000, "load_seconds": 0.1,
                      "prefill_tokens_per_second": 1000.0, "decode_tokens_per_second": 100.0, "threads": 2},
        "test": {"file": "data/harvest/eval/test.jsonl", "sha256": "ab" * 32},
    }


def write(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    parent_dirs = {"en-de": direction(50.0, 0.0), "en-fr": direction(60.0, 0.1), "en-es": direction(40.0, 0.0)}
    write(root / "parent" / "gguf-F16" / "metrics.json", metrics(parent_dirs, labels={"role": "parent", "name": "parent"}))
    write(root / "parent" / "gguf-Q8_0" / "metrics.json",
          metrics(parent_dirs, quant="Q8_0", file_bytes=600_000, labels={"role": "parent", "name": "parent-q8"}))
    for drop, chrf, size in ((0.25, 48.0, 800_000), (0.5, 44.0, 600_000)):
        plan = {"meta": {"ranker": "routing-mass", "allocation": "uniform", "drop_ratio": drop}}
        write(root / "en-de" / f"d{drop}" / "model.metrics.json",
              metrics({"en-de": direction(chrf, drop / 5)}, file_bytes=size, peak=40_000_000, plan=plan,
                      labels={"pack": "en->de", "name": f"de-{drop}"}, n_experts=int(8 * (1 - drop))))
        write(root / "en-fr-es" / f"d{drop}" / "metrics.json",
              metrics({"en-fr": direction(chrf + 10, 0.2), "en-es": direction(chrf - 10, 0.0)}, file_bytes=size, plan=plan,
                      labels={"pack": "en->fr,es", "name": f"fres-{drop}"}, n_experts=int(8 * (1 - drop))))
    write(root / "en-de" / "export.json", {"kind": "export_config"})  # not metrics: ignored
    return root


def test_packs_and_rows(runs):
    found = find_metrics([runs])
    assert len(found) == 6
    packs = {pack.name: pack for pack in group_packs(found)}
    assert sorted(packs) == ["en->de", "en->fr,es"]
    assert packs["en->fr,es"].directions == ["en-fr", "en-es"]
    # both parents join both packs (they were measured on every direction)
    assert sorted(run.name for run in packs["en->de"].runs) == ["de-0.25", "de-0.5", "parent", "parent-q8"]
    rows = {run.name: pack_row(run, packs["en->fr,es"]) for run in packs["en->fr,es"].runs}
    parent = rows["parent"]
    assert parent["role"] == "parent" and parent["drop_ratio"] == 0.0
    assert parent["chrf++"] == 50.0  # mean of en-fr 60 and en-es 40, en-de left out
    assert parent["error_rate"] == 0.05  # 1 of 20 segments
    assert parent["file_ratio"] == 1.0 and parent["chrf++_delta"] == 0.0
    half = rows["fres-0.5"]
    assert (half["ranker"], half["allocation"], half["drop_ratio"]) == ("routing-mass", "uniform", 0.5)
    assert half["chrf++"] == 44.0 and half["chrf++_delta"] == -6.0
    assert half["file_ratio"] == 0.6  # against the gguf F16 parent, not Q8_0
    assert half["peak_rss_ratio"] == 1.0
    assert half["experts_kept"] == 8 and half["experts_total"] == 16 and half["per_layer"] == [4, 4]
    assert half["chrf++_ci95"] == 1.41  # sqrt(2^2 + 2^2) / 2
    assert rows["parent"]["chrf++_ci95"] == 1.41
    assert half["errors"]["repetition"] == 2 and half["hit_token_limit"] == 2 and half["n"] == 20


def test_report_outputs(runs, tmp_path):
    out = tmp_path / "report"
    index = build_report([runs], out, command="packager report runs --out report")
    assert index == out / "index.html"
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.csv", "report.json", "report.md"]
    page = index.read_text(encoding="utf-8")
    # self-contained: no external resources, four embedded PNG plots
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert page.count("<h2>Pack ") == 2 and page.count("<tr class='parent'>") == 4
    with (out / "report.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8  # (2 parents + 2 pruned) x 2 packs
    assert [r["name"] for r in rows if r["pack"] == "en->de"] == ["parent", "parent-q8", "de-0.25", "de-0.5"]
    de_half = next(r for r in rows if r["name"] == "de-0.5")
    assert (de_half["chrf++"], de_half["chrf++_delta"], de_half["file_ratio"], de_half["drop_ratio"]) == ("44.0", "-6.0", "0.6", "0.5")
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "packager.report/1"
    assert report["packs"]["en->de"]["directions"] == ["en-de"]
    assert len(report["provenance"]["inputs"]) == 6
    assert report["provenance"]["command"] == "packager report runs --out report"
    # the content hash of the test split is on the page and in the JSON
    assert report["provenance"]["test_splits"] == {"data/harvest/eval/test.jsonl": "sha256:" + "ab" * 32}
    assert "data/harvest/eval/test.jsonl (sha256:abababababab)" in page
    markdown = (out / "report.md").read_text()
    assert "### en->de" in markdown and "### en->fr,es" in markdown
    assert "| de-0.5 | gguf F16 | routing-mass / uniform | 50% | 0.6 (×0.60) | 40.0 (×0.80) | 100 | 44.0 | -6.0 | 10.0% |" in markdown


def test_markdown_table_parent_row():
    row = {"role": "parent", "name": "p", "format": "onnx", "quantization": "fp32", "ranker": None, "allocation": None,
           "drop_ratio": 0.0, "experts_kept": 16, "experts_total": 16, "file_bytes": 2_500_000, "file_ratio": 1.0,
           "peak_rss_bytes": 90_000_000, "peak_rss_ratio": 1.0, "peak_rss_anon_bytes": 10_000_000, "load_seconds": 0.5,
           "prefill_tokens_per_second": 900.0, "decode_tokens_per_second": 80.0, "chrf++": 51.25, "chrf++_delta": 0.0,
           "bleu": 20.0, "error_rate": 0.0, "hit_token_limit": 0}
    assert markdown_table([row]).splitlines()[-1] == "| p | onnx fp32 | parent | 0% | 2.5 | 90.0 | 80 | 51.2 |  | 0.0% |"


def test_signed_format_has_no_negative_zero():
    from packager.report import _fmt

    assert [_fmt(-0.04, "{:+.1f}"), _fmt(-0.04), _fmt(-0.2, "{:+.1f}"), _fmt(None)] == ["+0.0", "0.0", "-0.2", ""]


def test_report_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no `packager verify` metrics"):
        build_report([empty], tmp_path / "out")
    (empty / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"metrics.json: unreadable metrics file"):
        build_report([empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
