"""`packager plan search` on a tiny random Qwen3-MoE: budgets met exactly (the predicted GGUF size
against a real export), a monotone frontier, the proxy's rank correlation computed from the
scored plans, a resumed run that computes nothing, and the dev-only rule."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_distill import _harvest_records, _write_bpe_tokenizer
from tiny_models import build_tiny

from packager.plan_search import (
    Budgets,
    SearchError,
    SearchSettings,
    pareto_frontier,
    parse_size_budget,
    read_dev,
    search,
    spearman,
    write_outputs,
)

SETTINGS = SearchSettings(langs=("de",), drops=(0.25, 0.5, 0.75), dev_n=10, batch_size=16, max_new_tokens=12,
                          refine_steps=2, rankers=("routing-mass", "frequency", "reap", "random"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from packager.calibrate import CalibrationSettings, calibrate

    work = tmp_path_factory.mktemp("search")
    records = _harvest_records(40)
    model = build_tiny("qwen3_moe", work / "model", vocab_size=320, num_hidden_layers=3)
    _write_bpe_tokenizer(model, records)
    dev = work / "dev.jsonl"
    dev.write_text("".join(json.dumps({**r, "split": "dev"}, ensure_ascii=False) + "\n" for r in records[:12]))
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[12:]))
    stats = calibrate(model, [calib], CalibrationSettings(pairs=("en-de", "de-en"), teacher_forced=True, reap=True,
                                                          batch_size=16))
    return work, model, dev, stats


def _run(setup, budgets, name, settings=SETTINGS):
    work, model, dev, stats = setup
    return search(stats, model, dev, budgets, settings, work / "cache")


def test_file_budget_met_and_size_exact(setup):
    from converters.gguf.export import export_gguf
    from packager.prune import prune_checkpoint

    work, model, dev, stats = setup
    probe = _run(setup, Budgets(size_format="gguf:F32"), "probe")
    sizes = sorted({r["size_bytes"] for r in probe.rows})
    assert len(sizes) >= 3
    budget = (sizes[0] + sizes[1]) // 2 + 1        # only the smallest plans fit
    result = _run(setup, Budgets(size_format="gguf:F32", max_file_bytes=budget, min_drop=0.5), "file")
    chosen = result.chosen
    assert chosen is not None and chosen["size_bytes"] <= budget and chosen["drop_effective"] >= 0.5
    assert len(set(chosen["counts"])) == 1          # GGUF: uniform plans only
    assert all(r["allocation"] == "uniform" for r in result.rows)
    best_feasible = max(r["chrf++"] for r in result.rows if r["size_bytes"] <= budget and r["drop_effective"] >= 0.5)
    assert chosen["chrf++"] == best_feasible
    # the prediction against a real export of the chosen plan
    write_outputs(result, work / "chosen.json", work / "chosen.frontier.json", work / "chosen.frontier.png")
    pruned = prune_checkpoint(model, work / "chosen.json", work / "chosen-model")
    actual = export_gguf(pruned, work / "chosen.gguf", None, dtype="f32").stat().st_size
    predicted = chosen["size_bytes"]
    allowance = result.size_model.allowance
    assert actual <= predicted <= budget
    assert predicted - allowance - actual == pytest.approx(0, abs=allowance)
    assert (work / "chosen.frontier.png").stat().st_size > 0
    saved = json.loads((work / "chosen.frontier.json").read_text())
    assert saved["chosen"]["name"] == chosen["name"] and saved["budgets"]["max_file_bytes"] == budget


def test_safetensors_size_is_exact(setup):
    from packager.prune import prune_checkpoint

    work, model, dev, stats = setup
    result = _run(setup, Budgets(min_drop=0.75), "st")
    assert result.chosen["drop_effective"] >= 0.75
    result.plan.save(work / "st.json")
    pruned = prune_checkpoint(model, work / "st.json", work / "st-model")
    provenance = json.loads((pruned / "pruning.json").read_text())
    assert provenance["output"]["tensor_bytes"] == result.chosen["size_bytes"]


def test_loss_and_ram_budgets(setup):
    result = _run(setup, Budgets(max_loss=100.0), "loss")
    # with a loss budget the smallest plan within the loss wins
    assert result.chosen["size_bytes"] == min(r["size_bytes"] for r in result.rows if not r["broken"])
    parent = result.parent["chrf++"]
    tight = _run(setup, Budgets(max_loss=0.0), "tight")
    if tight.chosen is not None:
        assert parent - tight.chosen["chrf++"] <= 0.0
    ram_budget = sorted(r["ram_bytes"] for r in result.rows)[2] + 1000
    ram = _run(setup, Budgets(max_ram_bytes=ram_budget, ram_overhead_bytes=1000), "ram")
    assert ram.chosen["ram_bytes"] <= ram_budget


def test_frontier_monotone_and_correlation_computed(setup):
    result = _run(setup, Budgets(), "all")
    front = result.frontier
    assert front
    for a, b in zip(front, front[1:]):
        assert a["size_bytes"] < b["size_bytes"] and a["chrf++"] < b["chrf++"]
    names = {p["name"] for p in front}
    for row in result.rows:   # nothing off the frontier beats a frontier point of at most its size
        if row["name"] not in names:
            assert any(p["size_bytes"] <= row["size_bytes"] and p["chrf++"] >= row["chrf++"] for p in front)
    grid = [r for r in result.rows if r["origin"] == "grid"]
    rho = result.correlation["spearman_proxy_vs_chrf"]
    assert rho == spearman([-r["proxy"] for r in grid], [r["chrf++"] for r in grid])
    assert rho is not None and -1.0 <= rho <= 1.0
    assert result.correlation["n"] == len(grid)


def test_resumed_search_computes_nothing(setup):
    _run(setup, Budgets(), "first")
    again = _run(setup, Budgets(), "again")
    assert again.cells["computed"] == 0 and again.cells["reused"] > 0


def test_refinement_keeps_size_and_reports(setup):
    settings = replace(SETTINGS, refine_steps=3)
    result = _run(setup, Budgets(min_drop=0.5), "refine", settings)
    assert result.refinement["ran"]
    trace = result.refinement["trace"]
    assert all(b["proxy"] < a["proxy"] for a, b in zip(trace, trace[1:]))
    assert all(sum(t["counts"]) == sum(trace[0]["counts"]) for t in trace)


def test_test_split_refused_and_bad_budgets(tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "a", "tgt": "b", "split": "test"}) + "\n")
    with pytest.raises(SearchError, match="never on the test split"):
        read_dev(dev, ["en-de"], 10)
    assert parse_size_budget("gguf:q8_0=10") == ("gguf:Q8_0", 10_000_000)
    assert parse_size_budget("onnx:int8=2.5") == ("onnx:int8", 2_500_000)
    for bad in ("10", "gguf:Q9=3", "zip=4", "gguf:F16=-1"):
        with pytest.raises(SearchError):
            parse_size_budget(bad)


def test_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    points = [{"name": n, "size_bytes": s, "chrf++": q} for n, s, q in
              (("a", 1, 10), ("b", 2, 9), ("c", 2, 12), ("d", 3, 12), ("e", 4, 20))]
    assert [p["name"] for p in pareto_frontier(points)] == ["a", "c", "e"]


def test_within_drop_correlation(setup):
    result = _run(setup, Budgets(), "within")
    grid = [r for r in result.rows if r["origin"] == "grid"]
    for drop, entry in result.correlation["within_drop"].items():
        same = [r for r in grid if f"{r['drop']:g}" == drop]
        assert entry["n"] == len(same)
        assert entry["spearman"] == spearman([-r["proxy"] for r in same], [r["chrf++"] for r in same])


def test_cli_writes_plan_frontier_and_plot(setup, tmp_path, monkeypatch, capsys):
    from test_prune_cli import run_cli

    work, model, dev, stats = setup
    stats_path = tmp_path / "stats.safetensors"
    stats.save(stats_path)
    common = ["plan", "search", str(stats_path), "--model", str(model), "--dev", str(dev), "--langs", "de",
              "--drops", "0.5,0.75", "--rankers", "routing-mass,frequency", "--dev-n", "10", "--refine-steps", "1",
              "--work", str(work / "cache")]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--drop", "0.5", "--out", str(tmp_path / "plan.json"))
    assert code == 0, err
    assert "rank correlation" in out and "frontier" in out
    saved = json.loads((tmp_path / "plan.frontier.json").read_text())
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["meta"]["search"]["name"] == saved["chosen"]["name"]
    assert (tmp_path / "plan.frontier.png").stat().st_size > 0
    code, out, err = run_cli(monkeypatch, capsys, *common, "--max-file-mb", "safetensors=0.001",
                             "--out", str(tmp_path / "none.json"))
    assert code != 0 and "no plan meets the budgets" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.json").exists() and (tmp_path / "none.frontier.json").is_file()
