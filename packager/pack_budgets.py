"""Budgets in the packs file: `packager build` asks `packager plan search` for each pack's plan
instead of taking a drop ratio.

    budgets = [{max_file_mb = 12, format = "gguf", quant = "Q8_0"}, {max_loss = 1.0}]   # or per [[pack]]

    [search]                              # required when a pack has budgets
    dev = "../data/harvest/eval/dev.jsonl"   # dev records, never the test split
    dev_n = 100                           # per direction; also: drops, rankers, allocations, proxy, refine_steps

A budget table holds one or more of `max_file_mb` (with `format` = safetensors | gguf | onnx
and, for gguf/onnx, `quant`), `max_ram_mb` (with `ram_overhead_mb`, `ctx`), `drop` (drop at
least this share) and `max_loss` (dev chrF++ below the parent): the same budgets as `packager
plan search`. Each budget of a pack is one plan, shared by every variant of the build; when a
variant is GGUF the search keeps uniform plans only (stock llama.cpp loads one expert count).
A pack lists `drop_ratios`, `budgets` or both (its own keys, else the top-level ones); with
budgets and no drop ratios it builds only the budgets' plans. Bundle names carry the budget's
slug; drop ratio, ranker and allocation of the chosen plan are in its plan.json and report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from packager.plan_budgets import DEFAULT_DROPS, DEFAULT_RANKERS, PROXIES, Budgets, SearchError, check_size_format

BUDGET_KEYS = ("max_file_mb", "format", "quant", "max_ram_mb", "ram_overhead_mb", "ctx", "drop", "max_loss")
SEARCH_KEYS = ("dev", "dev_n", "drops", "rankers", "allocations", "proxy", "refine_steps")


@dataclass(frozen=True)
class BudgetSpec:
    size_format: str = "safetensors"
    max_file_mb: float | None = None
    max_ram_mb: float | None = None
    ram_overhead_mb: float = 0.0
    ctx: int = 512
    drop: float | None = None
    max_loss: float | None = None

    def budgets(self) -> Budgets:
        mb = 1_000_000
        return Budgets(size_format=self.size_format,
                       max_file_bytes=None if self.max_file_mb is None else int(self.max_file_mb * mb),
                       max_ram_bytes=None if self.max_ram_mb is None else int(self.max_ram_mb * mb),
                       min_drop=self.drop, max_loss=self.max_loss, ram_overhead_bytes=int(self.ram_overhead_mb * mb),
                       ctx_tokens=self.ctx)

    def _parts(self):
        """(name part, title part) of each budget that is set."""
        if self.max_file_mb is not None:
            yield (f"{self.size_format.replace(':', '-').lower()}-{self.max_file_mb:g}mb",
                   f"{self.size_format} <= {self.max_file_mb:g} MB")
        if self.max_ram_mb is not None:
            yield f"ram{self.max_ram_mb:g}mb", f"RAM <= {self.max_ram_mb:g} MB"
        if self.drop is not None:
            yield f"drop{round(self.drop * 100):02d}", f"drop >= {self.drop:.0%}"
        if self.max_loss is not None:
            yield f"loss{self.max_loss:g}", f"loss <= {self.max_loss:g} chrF++"

    @property
    def slug(self) -> str:
        """A directory and bundle name part, e.g. 'budget-gguf-q8_0-12mb-loss1'."""
        return "-".join(["budget"] + [name for name, _ in self._parts()])

    @property
    def title(self) -> str:
        return "budget " + ", ".join(title for _, title in self._parts())


def _number(value: Any, where: str, key: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or (high is not None and not value < high):
        bound = f"in ({low:g}, {high:g})" if high is not None else f"above {low:g}"
        raise SearchError(f"{where}: {key} must be a number {bound}, got {value!r}")
    return float(value)


def parse_budget(item: Any, where: str) -> BudgetSpec:
    """One budget table of the packs file; SearchError names the table and the key."""
    if not isinstance(item, dict):
        raise SearchError(f"{where} must be a table such as {{max_file_mb = 12, format = \"gguf\", quant = \"Q8_0\"}}")
    extra = sorted(set(item) - set(BUDGET_KEYS))
    if extra:
        raise SearchError(f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(BUDGET_KEYS)}")
    if not {"max_file_mb", "max_ram_mb", "drop", "max_loss"} & set(item):
        raise SearchError(f"{where}: give at least one of max_file_mb, max_ram_mb, drop, max_loss")
    fmt = item.get("format", "safetensors")
    quant = item.get("quant")
    if fmt == "safetensors" and quant is not None:
        raise SearchError(f"{where}: quant is for format = \"gguf\" or \"onnx\"")
    if fmt in ("gguf", "onnx") and not isinstance(quant, str):
        raise SearchError(f"{where}: format = {fmt!r} needs quant = \"...\" (e.g. \"Q8_0\" or \"int8\")")
    kind, quant = check_size_format(fmt if quant is None else f"{fmt}:{quant}")
    return BudgetSpec(
        size_format=kind if quant is None else f"{kind}:{quant}",
        max_file_mb=None if "max_file_mb" not in item else _number(item["max_file_mb"], where, "max_file_mb"),
        max_ram_mb=None if "max_ram_mb" not in item else _number(item["max_ram_mb"], where, "max_ram_mb"),
        ram_overhead_mb=0.0 if "ram_overhead_mb" not in item else _number(item["ram_overhead_mb"], where, "ram_overhead_mb", -1e-9),
        ctx=int(_number(item.get("ctx", 512), where, "ctx")),
        drop=None if "drop" not in item else _number(item["drop"], where, "drop", 0.0, 1.0),
        max_loss=None if "max_loss" not in item else _number(item["max_loss"], where, "max_loss", -1e-9))


def parse_budgets(value: Any, where: str) -> tuple[BudgetSpec, ...]:
    if not isinstance(value, list) or not value:
        raise SearchError(f"{where} must be a non-empty list of budget tables, got {value!r}")
    budgets = tuple(parse_budget(item, f"{where} #{i + 1}") for i, item in enumerate(value))
    if len({b.slug for b in budgets}) != len(budgets):
        raise SearchError(f"{where}: two budgets are the same")
    return budgets


def parse_search(value: Any, source: Path) -> dict:
    """The [search] table: settings of the plan search behind every budget (paths relative to the packs file)."""
    if not isinstance(value, dict) or "dev" not in value:
        raise SearchError("budgets need a [search] table with dev = \"...\" (dev records, never the test split)")
    extra = sorted(set(value) - set(SEARCH_KEYS))
    if extra:
        raise SearchError(f"[search] unknown key(s) {', '.join(extra)}; known: {', '.join(SEARCH_KEYS)}")
    dev = value["dev"]
    if not isinstance(dev, str) or not dev:
        raise SearchError(f"[search] dev must be a path string, got {dev!r}")
    dev_path = Path(dev) if Path(dev).is_absolute() else (source.parent / dev).resolve()
    if not dev_path.is_file():
        raise SearchError(f"[search] dev = {dev!r}: file {dev_path} not found")
    settings = {"dev": str(dev_path), "dev_n": value.get("dev_n", 100), "drops": value.get("drops", list(DEFAULT_DROPS)),
                "rankers": value.get("rankers", list(DEFAULT_RANKERS)),
                "allocations": value.get("allocations", ["uniform", "dynamic", "inverted-dynamic"]),
                "proxy": value.get("proxy", "kl"), "refine_steps": value.get("refine_steps", 8)}
    if isinstance(settings["dev_n"], bool) or not isinstance(settings["dev_n"], int) or settings["dev_n"] < 1:
        raise SearchError(f"[search] dev_n must be a positive integer, got {settings['dev_n']!r}")
    drops = settings["drops"]
    if not isinstance(drops, list) or not drops or not all(not isinstance(d, bool) and isinstance(d, (int, float))
                                                          and 0 < d < 1 for d in drops):
        raise SearchError(f"[search] drops must be a non-empty list of ratios in (0, 1), got {drops!r}")
    for key in ("rankers", "allocations"):
        if not isinstance(settings[key], list) or not settings[key] or not all(isinstance(x, str) for x in settings[key]):
            raise SearchError(f"[search] {key} must be a non-empty list of names, got {settings[key]!r}")
    if settings["proxy"] not in PROXIES:
        raise SearchError(f"[search] proxy must be one of {', '.join(PROXIES)}, got {settings['proxy']!r}")
    steps = settings["refine_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SearchError(f"[search] refine_steps must be a whole number >= 0, got {steps!r}")
    return settings


def plan_inputs(budget: BudgetSpec, search: dict, langs: Sequence[str], direction: str, uniform: bool) -> dict:
    """What the searched plan depends on (besides the statistics and the code): the build's step key."""
    return {"budget": asdict(budget), "search": search, "langs": list(langs), "direction": direction, "uniform": uniform}


def search_plan(stats_path: Path, plan_path: Path, parent: Path, langs: Sequence[str], direction: str, budget: BudgetSpec,
                search: dict, uniform: bool, threads: int | None, command: str | None) -> dict:
    """Run the plan search for one budget of one pack; writes plan_path and its frontier beside it
    (PLAN.frontier.json / .png), the search cache under PLAN.search/. Returns the chosen row."""
    import time

    from packager import __version__
    from packager.core.stats import RoutingStats
    from packager.plan_search import SearchSettings, search as run_search, write_outputs
    from runtime.file_hash import file_sha256

    settings = SearchSettings(langs=tuple(langs), direction=direction, rankers=tuple(search["rankers"]),
                              allocations=tuple(search["allocations"]),
                              drops=tuple(sorted(set(search["drops"]) | ({budget.drop} if budget.drop else set()))),
                              dev_n=search["dev_n"], proxy=search["proxy"], refine_steps=search["refine_steps"],
                              threads=threads or 1, uniform=uniform)
    provenance = {"command": command, "stats": {"path": str(stats_path), "sha256": file_sha256(stats_path)},
                  "dev": {"path": search["dev"], "sha256": file_sha256(Path(search["dev"]))},
                  "budget": budget.title, "versions": {"packager": __version__},
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    result = run_search(RoutingStats.load(stats_path), parent, Path(search["dev"]), budget.budgets(), settings,
                        plan_path.with_name(plan_path.name + ".search"), progress=True, provenance=provenance)
    write_outputs(result, plan_path, plan_path.with_suffix(".frontier.json"), plan_path.with_suffix(".frontier.png"))
    if result.chosen is None:
        raise SearchError(f"{budget.title}: no plan meets it (frontier in {plan_path.with_suffix('.frontier.json')}); "
                          "relax the budget")
    return result.chosen
