"""The experiment driver end to end on a tiny random Qwen3-MoE (quick grid): the structure of
results.json, plans that match the planner, mask mode equal to pruned files, the generated
page, and a re-run that computes nothing (every cell cached)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_distill import _write_bpe_tokenizer
from tiny_models import build_tiny

import packager.distill as distill_module
import packager.experiment_cells as cells_module
from packager.core.code_version import code_digest
from packager.core.checkpoint import CheckpointReader
from packager.core.fingerprint import file_sha256
from packager.experiments import QUICK, RESULTS_SCHEMA, Experiment, ExperimentError
from packager.planning import PlanSettings, global_iou, plan_keep
from packager.core.stats import RoutingStats

REPO = Path(__file__).resolve().parents[1]
HARVEST = REPO / "data" / "harvest"
RANKERS = ("routing-mass", "frequency", "reap", "random", "inverted")
ALLOCATIONS = ("uniform", "dynamic", "inverted-dynamic")
CONFIG = replace(QUICK, threads=1, sample=6, sample_multi=4, calib_sentences=12, distill_sentences=16)


def _records(split: str, lang: str, limit: int) -> list[dict]:
    found = []
    with (HARVEST / f"{split}.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["tgt_lang"] == lang and len(record["src"]) < 30 and len(record["tgt"]) < 40:
                found.append({k: record[k] for k in ("src_lang", "tgt_lang", "src", "tgt")})
                if len(found) >= limit:
                    break
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (HARVEST / "test.jsonl").is_file():
        pytest.skip("harvested data missing: run `make data-eval`")
    work = tmp_path_factory.mktemp("experiments")
    data = work / "data"
    data.mkdir()
    everything = []
    for split, limit in (("train", 40), ("dev", 30), ("test", 20)):
        records = _records(split, "de", limit) + _records(split, "fr", limit)
        everything += records
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    model = build_tiny("qwen3_moe", work / "model", vocab_size=320)
    _write_bpe_tokenizer(model, everything)
    experiment = Experiment(model, data, work / "out", CONFIG, work / "docs" / "results.md", show_progress=False,
                            command="test")
    return work, model, data, experiment.run()


def test_results_structure(setup):
    work, model, data, results = setup
    assert results["schema"] == RESULTS_SCHEMA
    assert results["model"]["n_experts"] == 8 and results["model"]["top_k"] == 2 and results["model"]["moe_layers"] == [0, 1]
    assert results["setup"]["calibration"]["pairs"] == ["de-en", "en-de", "en-fr", "fr-en"]
    assert sorted(results["parent"]["directions"]) == ["en-de", "en-fr"]
    assert {pack: p["n_per_direction"] for pack, p in results["parent"]["packs"].items()} == {"en->de": 6, "en->de,fr": 4}
    assert results["parent"]["packs"]["en->de"]["directions"]["en-de"] == results["parent"]["directions"]["en-de"]
    sweep = results["sweep"]
    assert len(sweep) == 2 * 2 * 5 * 3  # packs x drops x rankers x allocations
    assert {(r["pack"], r["drop"], r["ranker"], r["allocation"]) for r in sweep} == {
        (p, d, r, a) for p in ("en->de", "en->de,fr") for d in (0.5, 0.75) for r in RANKERS for a in ALLOCATIONS}
    for row in sweep:
        assert "error" not in row, row
        assert list(row["directions"]) == (["en-de"] if row["pack"] == "en->de" else ["en-de", "en-fr"])
        assert sum(row["counts"]) == (8 if row["drop"] == 0.5 else 4)
        for metrics in row["directions"].values():
            assert metrics["n"] == (6 if row["pack"] == "en->de" else 4) and 0 <= metrics["chrf++"] <= 100 and 0 <= metrics["error_rate"] <= 1
            assert set(metrics["errors"]) == {"empty", "repetition", "length_ratio", "wrong_script", "wrong_language",
                                              "lost_placeholder"}
        assert row["mean"]["n"] == {"en->de": 6, "en->de,fr": 8}[row["pack"]]
    # at 75% every layer keeps top-k = 2: the three allocations are one mask
    for pack in ("en->de", "en->de,fr"):
        for ranker in RANKERS:
            rows = [r for r in sweep if r["pack"] == pack and r["ranker"] == ranker and r["drop"] == 0.75]
            assert len({r["keep_sha256"] for r in rows}) == 1 and all(r["counts"] == [2, 2] for r in rows)
            assert len({json.dumps(r["directions"], sort_keys=True) for r in rows}) == 1


def test_plans_match_the_planner_and_overlap_is_recomputable(setup):
    work, model, data, results = setup
    stats = RoutingStats.load(work / "out" / "stats.safetensors")
    for row in results["overlap"]:
        keeps = [plan_keep(stats, PlanSettings(langs=(lang,), drop_ratio=row["drop"], allocation=row["allocation"]))[0]
                 for lang in ("de", "fr")]
        assert row["pairwise"][0]["iou"] == global_iou(keeps) == row["all"]["iou"]
        assert 0 < row["pairwise"][0]["random_iou"] < 1
    assert [(r["drop"], r["allocation"]) for r in results["overlap"]] == [
        (0.5, "uniform"), (0.5, "dynamic"), (0.75, "uniform"), (0.75, "dynamic")]


def test_recovery_and_noise(setup):
    work, model, data, results = setup
    best = results["best_plan"]
    assert (best["ranker"], best["allocation"]) in {(r, a) for r in RANKERS for a in ALLOCATIONS}
    assert best["mean_chrf++"] == max(c["mean_chrf++"] for c in best["candidates"])
    recovery = results["recovery"]
    assert recovery["pack"] == "en->de,fr" and [r["drop"] for r in recovery["rows"]] == [0.5, 0.75]
    for row in recovery["rows"]:
        for key in ("pruned", "references", "parent"):
            assert list(row[key]["directions"]) == ["en-de", "en-fr"]
            assert [m["n"] for m in row[key]["directions"].values()] == [4, 4]
        assert row["parent"]["training"]["step"] == 3 and row["references"]["training"]["step"] == 3
        assert row["parent"]["sentences"]["sampled"] == 32  # 16 per direction
        # the pruned files score exactly like the mask mode
        assert row["pruned_equals_mask"] == {"en-de": True, "en-fr": True}
        assert (work / "out" / "models" / f"distill-{int(row['drop'] * 1000):04d}" / "distillation.json").is_file()
    # the sweep's size figure for this plan is the tensor bytes of the pruned files, exactly
    for row in recovery["rows"]:
        masked = next(r for r in results["sweep"] if (r["pack"], r["ranker"], r["allocation"], r["drop"]) ==
                      ("en->de,fr", best["ranker"], best["allocation"], row["drop"]))
        with CheckpointReader(work / "out" / "models" / f"pruned-{int(row['drop'] * 1000):04d}") as reader:
            assert masked["tensor_bytes"] == reader.total_bytes < results["model"]["tensor_bytes"]
    noise = results["noise"]
    assert [r["sample"] for r in noise["test_samples"]["rows"]] == [0, 1]
    assert [r["seed"] for r in noise["random_seeds"]["rows"]] == [0, 1]
    for name in ("sweep-en-de.png", "sweep-en-de-fr.png", "recovery.png", "overlap.png"):
        assert (work / "out" / "plots" / name).stat().st_size > 1000


def test_report_in_the_verify_report_format(setup):
    work, model, data, results = setup
    metrics = sorted((work / "out" / "report-metrics").glob("*.metrics.json"))
    assert len(metrics) == 2 + 60  # a parent per pack and every sweep setting
    record = json.loads((work / "out" / "report-metrics" / "en-de-fr-reap-dynamic-50.metrics.json").read_text())
    assert record["schema"] == "packager.metrics/1" and record["labels"]["role"] == "pruned"
    assert list(record["directions"]) == ["en-de", "en-fr"] and record["footprint"]["peak_rss_bytes"] is None
    report = json.loads((work / "out" / "report" / "report.json").read_text())
    assert sorted(report["packs"]) == ["en->de", "en->de,fr"]
    assert all(len(p["rows"]) == 31 for p in report["packs"].values())  # parent + 30 settings
    assert (work / "out" / "report" / "index.html").stat().st_size > 10000


def test_generated_page(setup):
    work, model, data, results = setup
    page = (work / "docs" / "results.md").read_text()
    assert "do not edit by hand" in page
    for heading in ("## Setup", "## Findings", "## Parent", "## Sweep en->de (mask mode)", "## Sweep en->de,fr (mask mode)",
                    "## Recovery (en->de,fr", "## Mask overlap", "## Noise (en-de)"):
        assert heading in page
    sweep_table = page.split("## Sweep en->de (mask mode)")[1].split("Plot:")[0]
    assert len([line for line in sweep_table.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + 15
    assert "Routing mass vs random ranking" in page and "Dynamic vs uniform allocation" in page
    # the frontier under the en->de sweep: chrF++ strictly rising with size, each row a sweep plan (or the
    # parent) with its score, and no plan of the same or a smaller size scoring higher (checked on results.json)
    frontier = page.split("## Sweep en->de (mask mode)")[1].split("Frontier of this sweep")[1].split("\n\n")[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in frontier.splitlines()[2:]]
    sweep = [r for r in results["sweep"] if r["pack"] == "en->de" and "error" not in r]
    parent = {"tensor_bytes": results["model"]["tensor_bytes"], "mean": results["parent"]["packs"]["en->de"]["mean"]}
    chosen = []
    for size, score, plan, _ in cells:
        if plan == "parent":
            chosen.append(parent)
            continue
        ranker, allocation, drop = plan.split(" / ")
        chosen.append(next(r for r in sweep if (r["ranker"], r["allocation"], f"{100 * r['drop']:g}%") == (ranker, allocation, drop)))
        assert f"{chosen[-1]['mean']['chrf++']:.1f}" == score.split(" / ")[0]
    assert chosen and all(a["tensor_bytes"] < b["tensor_bytes"] and a["mean"]["chrf++"] < b["mean"]["chrf++"]
                          for a, b in zip(chosen, chosen[1:]))
    for row in sweep + [parent]:
        beaten = [c for c in chosen if c["tensor_bytes"] <= row["tensor_bytes"]]
        assert beaten and max(c["mean"]["chrf++"] for c in beaten) >= row["mean"]["chrf++"]


def test_rerun_reuses_every_cell(setup, monkeypatch):
    work, model, data, results = setup
    monkeypatch.setattr(distill_module, "greedy_generate", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    import packager.merge as merge_module   # the reduce stage's merged checkpoints (every alignment) are reused too
    monkeypatch.setattr(merge_module, "merge_prune", lambda *a, **k: pytest.fail("a merged checkpoint was rewritten"))
    again = Experiment(model, data, work / "out", CONFIG, work / "docs" / "again.md", show_progress=False, command="test").run()
    assert again["cells"]["computed"] == 0
    assert again["cells"]["cached"] == results["cells"]["computed"] + results["cells"]["cached"]
    for key in ("sweep", "parent", "best_plan", "noise", "overlap"):
        assert again[key] == results[key]


def test_a_new_parent_is_distilled_again(setup, tmp_path, monkeypatch):
    # a distilled model from another parent (or another pruned model) is never reused: its scores
    # would be the old parent's. Here one run's record names another parent.
    work, model, data, results = setup
    out = tmp_path / "out"
    shutil.copytree(work / "out", out)
    record_path = out / "models" / "distill-0500" / "distillation.json"
    record = json.loads(record_path.read_text())
    record["parent"]["fingerprint"] = "0" * 64
    record_path.write_text(json.dumps(record))

    class Distilled(Exception):
        pass

    def refuse(student, parent, data, settings, out_dir, **kwargs):
        raise Distilled(Path(out_dir).name)

    monkeypatch.setattr(distill_module, "distill", refuse)
    with pytest.raises(Distilled, match="^distill-0500$"):
        Experiment(model, data, out, CONFIG, None, show_progress=False, command="test").run()


def test_a_changed_scorer_invalidates_cached_cells(setup, tmp_path, monkeypatch):
    work, model, data, results = setup
    source = tmp_path / "source"  # the project's code with one edit to the scorer
    for package in ("packager", "converters", "runtime"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    scorer = source / "packager" / "quality.py"
    scorer.write_text(scorer.read_text(encoding="utf-8") + "\nLENGTH_RATIO_TOLERANCE = 2.5\n", encoding="utf-8")
    edited = code_digest("packager.experiment_cells", root=source)
    assert edited != cells_module.cell_code()

    experiment = Experiment(model, data, work / "out", CONFIG, None, show_progress=False, command="test")
    experiment.load_parent()
    experiment.load_samples()
    cached = experiment.evaluate(experiment.parent.fingerprint, "en-de")
    assert (experiment.cells_cached, experiment.cells_computed) == (1, 0)
    monkeypatch.setattr(cells_module, "cell_code", lambda: edited)
    computed = experiment.evaluate(experiment.parent.fingerprint, "en-de")
    assert (experiment.cells_cached, experiment.cells_computed) == (1, 1)
    assert {k: v for k, v in computed.items() if k != "seconds"} == {k: v for k, v in cached.items() if k != "seconds"}


def test_missing_data_is_one_error_line(tmp_path):
    with pytest.raises(ExperimentError, match=r"train\.jsonl: harvested split not found"):
        Experiment(tmp_path, tmp_path, tmp_path / "out", CONFIG, None)
    proc = subprocess.run([sys.executable, "-m", "packager.experiments", "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'train.jsonl'}: harvested split not found; run "
                                                "`make data-eval` (or `python -m models.harvest`) first"]


def test_reduce_stage_merge_drop_and_top_k(setup):
    from packager.core.pruned_model import layer_top_k

    work, model, data, results = setup
    reduce = results["reduce"]
    assert reduce["pack"] == "en->de" and reduce["n_per_direction"] == 6
    assert [r["drop_ratio"] for r in reduce["merge_vs_drop"]] == [0.5, 0.75]
    for row in reduce["merge_vs_drop"]:
        assert sum(row["counts"]) == (8 if row["drop_ratio"] == 0.5 else 4)
        # a merged and a dropped checkpoint share the router fingerprint, not the cache identity
        assert row["drop"]["identity"] != row["merge"]["identity"]
        tag = f"{int(row['drop_ratio'] * 1000):04d}"
        pruning = json.loads((work / "out" / "models" / f"reduce-merge-{tag}" / "pruning.json").read_text())
        assert pruning["reduce"] == "merge"
        assert sum(len(pairs) for pairs in pruning["merge"]["map"].values()) == 16 - sum(row["counts"])
        assert pruning["merge"]["align"] == {"method": "none"}
        # one aligned merge per method, each its own checkpoint with the same partners
        assert sorted(row["merge_aligned"]) == ["activations", "weights"]
        identities = {row["drop"]["identity"], row["merge"]["identity"]}
        for align, cell in row["merge_aligned"].items():
            aligned = json.loads((work / "out" / "models" / f"reduce-merge-{align}-{tag}" / "pruning.json").read_text())
            assert aligned["merge"]["align"]["method"] == align
            assert aligned["merge"]["map"] == pruning["merge"]["map"]
            assert set(aligned["merge"]["align"]["layers"]) == {"0", "1"}
            assert cell["identity"] not in identities
            identities.add(cell["identity"])
    assert [(r["model"], r["top_k"]) for r in reduce["top_k"]] == [("parent", 2), ("parent", 1), ("50% dropped", 2),
                                                                   ("50% dropped", 1)]
    for row in reduce["top_k"]:
        assert row["speed"]["decode_tok_s"] > 0 and row["speed"]["tokens_per_cpu_s"] > 0
        assert len(row["speed"]["decode_tok_s_runs"]) == 1
    def timeless(cell):
        return {k: v for k, v in cell.items() if k != "seconds"}

    # the parent read back from its directory scores exactly like the loaded parent
    assert timeless(reduce["top_k"][0]["directions"]["en-de"]) == timeless(results["parent"]["packs"]["en->de"]["directions"]["en-de"])
    assert [r["per_layer_k"] for r in reduce["per_layer_top_k"]] == [[1, 2], [2, 1]]
    # ONNX Runtime serves the per-layer k: speeds next to k=2 and k=1 everywhere
    onnx = reduce["per_layer_onnx_speed"]
    assert [r["per_layer_k"] for r in onnx] == [[2, 2], [1, 2], [2, 1], [1, 1]]
    for row in onnx:
        assert row["speed"]["runtime"] == "ONNX Runtime fp32, 1 thread" and row["speed"]["decode_tok_s"] > 0
    reduced = json.loads((work / "out" / "models" / "topk-2-1" / "config.json").read_text())
    assert reduced["top_k_per_layer"] == [2, 1] and reduced["num_experts_per_tok"] == 2
    # k=1 in every layer in memory scores exactly like the k=1 copy that reduce_top_k wrote
    experiment = Experiment(model, data, work / "out", CONFIG, None, show_progress=False, command="test")
    experiment.load_parent()
    experiment.load_samples()
    with layer_top_k(experiment.parent.model, {0: 1, 1: 1}) as masked:
        every_layer = experiment.evaluate("test-all-layers-k1", "en-de", model=masked, n=6)
    uniform = reduce["top_k"][1]["directions"]["en-de"]
    assert timeless(every_layer) == timeless(uniform)
    page = (work / "docs" / "results.md").read_text()
    assert "## Merge vs drop, top-k reduction (en->de, test split)" in page
    speed = onnx[2]["speed"]
    assert (f"| second half k=1 | 2/1 | {reduce['per_layer_top_k'][1]['mean']['chrf++']:.1f} / "
            f"{100 * reduce['per_layer_top_k'][1]['mean']['error_rate']:.0f}% | {speed['decode_tok_s']:.0f} | "
            f"{speed['tokens_per_cpu_s']:.0f} |") in page
    assert "| dropped | experts per layer | drop | merge | merge, aligned on activations | merge, aligned on weights |" in page


def test_only_reduce_on_the_dev_split(setup):
    work, model, data, results = setup
    out = work / "reduce-dev"
    proc = subprocess.run([sys.executable, "-m", "packager.experiments", "--quick", "--only", "reduce", "--split", "dev",
                           "--sample", "6", "--model", str(model), "--data", str(data), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "reduce.json").read_text())
    assert record["setup"]["test_sample"]["split"] == "dev" and record["setup"]["calibration"]["split"] == "train"
    assert record["model"]["weights_sha256"] == {"model.safetensors": file_sha256(model / "model.safetensors")}
    assert record["reduce"]["split"] == "dev" and len(record["reduce"]["merge_vs_drop"]) == 2
    assert (out / "stats-train.safetensors").is_file() and not (out / "stats.safetensors").exists()
    page = (out / "results.md").read_text()
    assert "## Merge vs drop, top-k reduction (en->de, dev split)" in page and "model.safetensors sha256" in page
