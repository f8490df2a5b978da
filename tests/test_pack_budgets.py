"""Budgets in the packs file: `packager build` on a tiny random qwen3_moe takes its plans from
`packager plan search` (a GGUF file-size budget and a drop budget), the built GGUF meets the size
budget, and bad budget tables are one error line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.build import BuildError, build, load_build_config
from packager.pack_budgets import BudgetSpec, parse_budget
from packager.plan_budgets import SearchError

from test_end_to_end import quiet
import packs_file
from packs_file import packs_toml as base_packs_toml


def packs_toml(budgets: str, search: str = 'dev = "dev.jsonl"\ndev_n = 6\ndrops = [0.5, 0.75]\nrefine_steps = 1') -> str:
    """The build tests' packs file with budgets in place of the drop ratio, one GGUF F32 variant, pack en->de."""
    text = base_packs_toml("parent", f'[search]\n{search}\n\n[[variant]]\nformat = "gguf"\nquant = ["F32"]\n',
                           extra=f"budgets = {budgets}")
    return text.replace("drop_ratios = [0.5]\n", "").replace('name = "en-de-fr"\ndirections = "en->de,fr"',
                                                              'name = "en-de"\ndirections = "en->de"')


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = packs_file.build_dir(tmp_path_factory.mktemp("budgets"))
    dev = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    (work / "dev.jsonl").write_text("".join(json.dumps({**r, "split": "dev"}) + "\n" for r in dev))
    return work


@pytest.fixture(scope="module")
def parent_f32_bytes(work, tmp_path_factory) -> int:
    from converters.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("parent-gguf") / "parent.gguf"
    export_gguf(work / "parent", out, None, dtype="f32", force=True, hash_inputs=False)
    return out.stat().st_size


def test_build_takes_plans_from_budgets(work, parent_f32_bytes):
    budget_mb = round(0.8 * parent_f32_bytes / 1e6, 3)
    (work / "packs.toml").write_text(packs_toml(f'[{{max_file_mb = {budget_mb}, format = "gguf", quant = "F32"}}, {{drop = 0.5}}]'))
    record = build(work / "packs.toml", work / "run", console=quiet(), command="pytest")
    size_slug = f"budget-gguf-f32-{budget_mb:g}mb"
    ids = [step["id"] for step in record["steps"]]
    assert ids == ["calibrate", "parent/gguf/export", "parent/gguf/F32/verify",
                   f"en-de/{size_slug}/plan", f"en-de/{size_slug}/prune", f"en-de/{size_slug}/gguf/export",
                   f"en-de/{size_slug}/gguf/F32/verify", f"bundle/en-de-gguf-F32-{size_slug}",
                   "en-de/budget-drop50/plan", "en-de/budget-drop50/prune", "en-de/budget-drop50/gguf/export",
                   "en-de/budget-drop50/gguf/F32/verify", "bundle/en-de-gguf-F32-budget-drop50", "report"]
    # the size budget: the real GGUF file is within it, and the plan is uniform (a GGUF variant)
    base = work / "run" / "packs" / "en-de" / size_slug
    plan = json.loads((base / "plan.json").read_text())
    assert (base / "gguf" / "model.gguf").stat().st_size <= budget_mb * 1e6
    assert plan["meta"]["search"]["size_bytes"] <= budget_mb * 1e6 and plan["meta"]["uniform_counts"] is True
    frontier = json.loads((base / "plan.frontier.json").read_text())
    feasible = [r for r in frontier["candidates"] if not r["broken"]]
    assert frontier["chosen"]["chrf++"] == max(r["chrf++"] for r in feasible)
    assert all(r["allocation"] == "uniform" for r in frontier["candidates"])
    # the drop budget: at least half of the experts dropped
    drop_plan = json.loads((work / "run" / "packs" / "en-de" / "budget-drop50" / "plan.json").read_text())
    assert drop_plan["meta"]["drop_ratio_effective"] >= 0.5
    verify = json.loads((work / "run" / "packs" / "en-de" / "budget-drop50" / "gguf" / "F32.metrics.json").read_text())
    assert verify["labels"]["budget"] == "budget drop >= 50%" and "drop_ratio" not in verify["labels"]
    # re-run: every step is up to date (the searches are not run again)
    planned = build(work / "packs.toml", work / "run", console=quiet(), dry_run=True)
    assert {s["status"] for s in planned["steps"] if s["id"] != "report"} == {"up to date"}


@pytest.mark.parametrize("table, message", [
    ({"max_file_mb": 10, "format": "gguf"}, "format = 'gguf' needs quant"),
    ({"format": "gguf", "quant": "Q8_0"}, "give at least one of max_file_mb, max_ram_mb, drop, max_loss"),
    ({"drop": 1.5}, r"drop must be a number in \(0, 1\)"),
    ({"max_loss": 1, "speed": 3}, "unknown key"),
    ({"max_file_mb": 10, "format": "gguf", "quant": "Q9"}, "unknown GGUF type"),
])
def test_bad_budget_tables(table, message):
    with pytest.raises(SearchError, match=message):
        parse_budget(table, "budgets #1")


def test_budget_table_to_search_budgets():
    spec = parse_budget({"max_file_mb": 12.5, "format": "gguf", "quant": "q8_0", "max_loss": 1}, "b")
    assert spec == BudgetSpec(size_format="gguf:Q8_0", max_file_mb=12.5, max_loss=1.0)
    budgets = spec.budgets()
    assert (budgets.size_format, budgets.max_file_bytes, budgets.max_loss, budgets.min_drop) == ("gguf:Q8_0", 12_500_000, 1.0, None)
    assert spec.slug == "budget-gguf-q8_0-12.5mb-loss1"


def test_packs_file_budget_errors(work):
    path = work / "bad.toml"
    path.write_text(packs_toml("[{drop = 0.5}]", search='dev_n = 6'))
    with pytest.raises(BuildError, match=r"bad.toml: budgets need a \[search\] table with dev"):
        load_build_config(path)
    path.write_text(packs_toml("[{drop = 0.5}]", search='dev = "missing.jsonl"'))
    with pytest.raises(BuildError, match=r"\[search\] dev = 'missing.jsonl': file .* not found"):
        load_build_config(path)
    path.write_text(packs_toml("[]"))
    with pytest.raises(BuildError, match=r"\[\[pack\]\] #1 budgets must be a non-empty list"):
        load_build_config(path)
    # budgets replace the default drop ratio; drop_ratios next to them add plans
    path.write_text(packs_toml("[{drop = 0.5}]"))
    assert load_build_config(path).packs[0].drop_ratios == ()
    path.write_text(packs_toml("[{drop = 0.5}]").replace("threads = 1", "threads = 1\ndrop_ratios = [0.25]", 1))
    pack = load_build_config(path).packs[0]
    assert pack.drop_ratios == (0.25,) and pack.budgets == (BudgetSpec(drop=0.5),)
