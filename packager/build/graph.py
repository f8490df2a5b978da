"""The step graph of a build: every step with its inputs (for its key), its outputs, the steps
it reads from (`needs`) and the resources its task declares on a Ray cluster. Built the same way
by the driver and, from the packs file, by every Ray worker, so both compute the same keys."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.build import runners
from packager.build.config import EXPORTERS, BuildConfig, PackSpec, Variant
from packager.build.steps import Step, dir_key, file_key, key_of


@dataclass
class BuildGraph:
    steps: list[Step]
    bundles: list[Path]
    metrics_files: list[Path]
    report_dir: Path

    def by_id(self, step_id: str) -> Step:
        return next(step for step in self.steps if step.id == step_id)


def _code(module: str) -> str:
    """Digest of the source files that `module` runs: a step's inputs carry it, so a code change
    redoes the step and, through the keys that chain them, every step downstream."""
    from packager.core.code_version import code_digest

    return code_digest(module)


def drop_slug(drop: float) -> str:
    return f"d{round(drop * 100):02d}"


# A pack's plans come from drop ratios and from budgets (packager.pack_budgets.BudgetSpec): a
# budget is one searched plan for every variant, named by its slug; its drop ratio, ranker and
# allocation are the chosen plan's (plan.json meta, which the report reads).
def _is_budget(drop) -> bool:
    return not isinstance(drop, float)


def _what(drop) -> str:
    return drop.title if _is_budget(drop) else f"drop {drop:.0%}"


def _plan_dir(drop, variant: Variant) -> str:
    return drop.slug if _is_budget(drop) else f"{drop_slug(drop)}-{variant.allocation}-{variant.ranker}"


def make_graph(config: BuildConfig, run_dir: Path, command: str | None) -> BuildGraph:
    """Every step of the build, in an order that runs each after the steps it needs."""
    inputs = {
        "parent": {config.parent.name: file_key(config.parent)} if config.gguf_parent else dir_key(config.parent),
        "calibration_data": {str(p): file_key(p) for p in config.calibration_data},
        "test": file_key(config.test_file),
    }
    graph = BuildGraph([], [], [], run_dir / "report")
    calibration = _calibration_steps(config, run_dir, inputs, command, graph)
    verify_settings = {"limit": config.verify.get("limit"), "max_new_tokens": config.verify.get("max_new_tokens", 256),
                       "n_bootstrap": config.verify.get("bootstrap", 1000), "threads": config.threads,
                       "code": _code("packager.verify")}
    parents = _parent_steps(config, run_dir, inputs, verify_settings, command, graph)
    for pack in config.packs:
        for drop in pack.drop_ratios + pack.budgets:
            _pack_steps(config, run_dir, pack, drop, inputs, calibration, verify_settings, parents, command, graph)
    metrics_files = list(graph.metrics_files)

    def report_step() -> None:
        from packager.report import build_report

        build_report([run_dir], graph.report_dir, command=command, metrics_files=metrics_files)

    graph.steps.append(Step("report", "report", {"metrics": [str(p) for p in metrics_files], "nonce": time.time()},
                            [graph.report_dir / "index.html"], report_step,
                            needs=[s.id for s in graph.steps if s.id.endswith("/verify")]))
    return graph


def _calibration_steps(config: BuildConfig, run_dir: Path, inputs: dict, command, graph: BuildGraph) -> Step:
    """Calibration once over every direction of every pack, in shards (each direction, each
    slice of its sentences) merged exactly; one shard writes the statistics itself. Returns the
    step that writes calibration/stats.safetensors."""
    from runtime.languages import parse_pair

    stats_path = run_dir / "calibration" / "stats.safetensors"
    groups = [[p] for p in config.all_pairs] if config.shard_by == "direction" else [config.all_pairs]
    slices = [(i, config.slices) for i in range(config.slices)] if config.slices > 1 else [None]
    shards = [(pairs, data_slice) for pairs in groups for data_slice in slices]
    resources = {"num_cpus": config.threads or 1} | ({} if config.gguf_parent else {"num_gpus": 1})
    code = _code("packager.calibrate_gguf" if config.gguf_parent else "packager.calibrate")
    shard_steps = []
    for pairs, data_slice in shards:
        one = len(shards) == 1
        name = "+".join(parse_pair(p).slug for p in pairs) if len(groups) > 1 else "all"
        name += f".s{data_slice[0] + 1}of{data_slice[1]}" if data_slice else ""
        out = stats_path if one else run_dir / "calibration" / "shards" / f"{name}.safetensors"
        step_inputs = {"parent": inputs["parent"], "data": inputs["calibration_data"], "pairs": list(pairs),
                       "settings": config.calibration, "code": code} | ({"slice": list(data_slice)} if data_slice else {})
        shard_steps.append(Step("calibrate" if one else f"calibrate/{name}",
                                f"calibrate {config.parent.name} on {', '.join(pairs)}"
                                + (f" (slice {data_slice[0] + 1} of {data_slice[1]})" if data_slice else ""),
                                step_inputs, [out], runners.calibrate_runner(config, pairs, data_slice, out, command),
                                resources=dict(resources)))
    graph.steps += shard_steps
    if len(shard_steps) == 1:
        return shard_steps[0]
    merge = Step("calibrate", f"merge {len(shard_steps)} calibration shards",
                 {"shards": [key_of({"step": s.id, "inputs": s.inputs}) for s in shard_steps],
                  "code": _code("packager.core.stats")},
                 [stats_path], runners.merge_runner([s.outputs[0] for s in shard_steps], stats_path),
                 needs=[s.id for s in shard_steps])
    graph.steps.append(merge)
    return merge


def _parent_steps(config: BuildConfig, run_dir: Path, inputs: dict, verify_settings: dict, command,
                  graph: BuildGraph) -> dict[tuple[str, str], tuple[Path, str]]:
    """The parent exported and verified once per variant format+quantization; returns
    (format, quant) -> (its metrics file, the id of the step that writes it)."""
    threads = config.threads
    parent_metrics: dict[tuple[str, str], tuple[Path, str]] = {}
    for fmt in dict.fromkeys(v.format for v in config.variants):
        quant = tuple(dict.fromkeys(q for v in config.variants if v.format == fmt for q in v.quant))
        out_dir = run_dir / "parent" / fmt
        export_inputs = {"model": inputs["parent"], "format": fmt, "quant": quant, "threads": threads,
                         "code": _code(EXPORTERS[fmt][config.gguf_parent])}
        needs: list[str] = []
        if config.gguf_parent:  # the parent file itself, plus what it is quantized to
            files = runners.gguf_parent_files(config.parent, out_dir, quant, config.parent_gguf_type)
            quantized = {q: f for q, f in files.items() if f != config.parent}
            if quantized:
                graph.steps.append(Step(f"parent/{fmt}/quantize", f"quantize parent to {', '.join(quantized)}",
                                        export_inputs, list(quantized.values()),
                                        (lambda quantized=quantized: runners.quantize_files(config.parent, quantized, threads)),
                                        resources={"num_cpus": threads or 1}))
                needs = [graph.steps[-1].id]
        else:
            files = runners.expected_exports(fmt, out_dir, quant)
            graph.steps.append(Step(f"parent/{fmt}/export", f"export parent to {fmt} {', '.join(quant)}", export_inputs,
                                    list(files.values()),
                                    (lambda fmt=fmt, out_dir=out_dir, quant=quant:
                                     runners.export_model(fmt, config.parent, out_dir, quant, threads)),
                                    resources={"num_cpus": threads or 1}))
            needs = [graph.steps[-1].id]
        for q, model_file in files.items():
            out = out_dir / f"{q}.metrics.json"
            labels = {"role": "parent", "name": f"parent {fmt} {q}", "pack": "parent"}
            step = Step(f"parent/{fmt}/{q}/verify", f"verify parent {fmt} {q}",
                        {"export": key_of(export_inputs), "quant": q, "test": inputs["test"], "pairs": config.all_pairs,
                         "settings": verify_settings, "labels": labels},
                        [out], runners.verify_runner(config, verify_settings, model_file, out, config.all_pairs, labels,
                                                     None, command),
                        needs=list(needs), resources={"num_cpus": threads or 1})
            graph.steps.append(step)
            graph.metrics_files.append(out)
            parent_metrics[(fmt, q)] = (out, step.id)
    return parent_metrics


def _pack_steps(config: BuildConfig, run_dir: Path, pack: PackSpec, drop, inputs: dict, calibration: Step,
                verify_settings: dict, parents: dict, command, graph: BuildGraph) -> None:
    """plan -> prune (once per allocation x ranker; once for a budget) -> export -> verify -> bundle for one
    pack x drop ratio or budget."""
    pruned: dict[tuple[str, str], tuple[Path, str, str]] = {}
    calibration_key = key_of(calibration.inputs)
    for variant in config.variants:
        base = run_dir / "packs" / pack.name / _plan_dir(drop, variant)
        prefix = f"{pack.name}/{base.name}"
        slot = ("budget", "") if _is_budget(drop) else (variant.allocation, variant.ranker)
        if slot not in pruned:
            plan_path = base / "plan.json"
            if _is_budget(drop):
                plan_inputs = {"stats": calibration_key, "parent": inputs["parent"],
                               "dev": file_key(Path(config.search["dev"])), "code": _code("packager.pack_budgets"),
                               **runners.budget_plan_inputs(config, pack, drop)}
                plan_run, title = runners.budget_plan_runner(config, calibration.outputs[0], plan_path, pack, drop, command), ""
            else:
                plan_inputs = {"stats": calibration_key, "langs": pack.langs, "direction": pack.direction, "drop": drop,
                               "ranker": variant.ranker, "allocation": variant.allocation, "code": _code("packager.planning")}
                plan_run = runners.plan_runner(calibration.outputs[0], plan_path, pack, drop, variant, command)
                title = f" {variant.ranker}/{variant.allocation}"
            prune_inputs = {"plan": key_of(plan_inputs), "parent": inputs["parent"],
                            "code": _code("converters.gguf.prune_gguf" if config.gguf_parent else "packager.prune")}
            # a budget's plan step runs the plan search (the parent in torch, config.threads threads)
            graph.steps.append(Step(f"{prefix}/plan", f"plan {pack.name} {_what(drop)}{title}", plan_inputs, [plan_path],
                                    plan_run, needs=[calibration.id],
                                    **({"resources": {"num_cpus": config.threads or 1}} if _is_budget(drop) else {})))
            if config.gguf_parent:  # prune-gguf: the pruned GGUF in the parent's own type
                pruned_path = base / "gguf" / "model.gguf"
                prune_run = runners.prune_gguf_runner(config.parent, plan_path, pruned_path)
            else:
                pruned_path = base / "pruned"
                prune_run = runners.prune_runner(config.parent, plan_path, pruned_path)
            graph.steps.append(Step(f"{prefix}/prune", f"prune {pack.name} {_what(drop)} {variant.allocation}",
                                    prune_inputs, [pruned_path], prune_run, needs=[f"{prefix}/plan"]))
            pruned[slot] = (pruned_path, key_of(prune_inputs), f"{prefix}/prune")
        _variant_steps(config, run_dir, pack, drop, variant, base, pruned[slot],
                       inputs, verify_settings, parents, command, graph)


def _variant_steps(config: BuildConfig, run_dir: Path, pack: PackSpec, drop, variant: Variant, base: Path,
                   pruned: tuple[Path, str, str], inputs: dict, verify_settings: dict, parents: dict, command,
                   graph: BuildGraph) -> None:
    """export (or quantize) -> per quantization: verify -> bundle, for one pruned model."""
    pruned_path, prune_key, prune_id = pruned
    threads = config.threads
    export_dir = base / variant.format
    prefix = f"{pack.name}/{base.name}/{variant.format}"
    export_inputs: dict[str, Any] = {"pruned": prune_key, "format": variant.format, "quant": variant.quant,
                                     "threads": threads, "code": _code(EXPORTERS[variant.format][config.gguf_parent])}
    made_by = prune_id
    if config.gguf_parent:
        files = runners.gguf_parent_files(pruned_path, export_dir, variant.quant, config.parent_gguf_type)
        quantized = {q: f for q, f in files.items() if f != pruned_path}
        if quantized:
            graph.steps.append(Step(f"{prefix}/quantize", f"quantize {pack.name} {_what(drop)} to {', '.join(quantized)}",
                                    export_inputs, list(quantized.values()),
                                    (lambda p=pruned_path, quantized=quantized: runners.quantize_files(p, quantized, threads)),
                                    needs=[prune_id], resources={"num_cpus": threads or 1}))
            made_by = graph.steps[-1].id
    else:
        files = runners.expected_exports(variant.format, export_dir, variant.quant)
        graph.steps.append(Step(f"{prefix}/export",
                                f"export {pack.name} {_what(drop)} to {variant.format} {', '.join(variant.quant)}",
                                export_inputs, list(files.values()),
                                (lambda v=variant, d=export_dir, p=pruned_path:
                                 runners.export_model(v.format, p, d, v.quant, threads)),
                                needs=[prune_id], resources={"num_cpus": threads or 1}))
        made_by = graph.steps[-1].id
    for q, model_file in files.items():
        name = f"{pack.name}-{variant.format}-{q}-" + (drop.slug if _is_budget(drop) else f"{drop_slug(drop)}-{variant.allocation}")
        metrics_path = export_dir / f"{q}.metrics.json"
        labels = ({"role": "pruned", "pack": pack.directions, "name": name, "budget": drop.title} if _is_budget(drop) else
                  {"role": "pruned", "pack": pack.directions, "name": name, "drop_ratio": drop,
                   "ranker": variant.ranker, "allocation": variant.allocation})
        parent_metrics, parent_id = parents[(variant.format, q)]
        verify_key = {"export": key_of(export_inputs), "quant": q, "test": inputs["test"], "pairs": pack.pairs,
                      "settings": verify_settings, "labels": labels, "parent": str(parent_metrics)}
        graph.steps.append(Step(f"{prefix}/{q}/verify", f"verify {name}", verify_key, [metrics_path],
                                runners.verify_runner(config, verify_settings, model_file, metrics_path, pack.pairs, labels,
                                                      parent_metrics, command),
                                needs=[made_by, parent_id], resources={"num_cpus": threads or 1}))
        bundle_dir = run_dir / "bundles" / name
        outputs = [bundle_dir] + ([bundle_dir.with_name(bundle_dir.name + ".tar")] if config.archive else [])
        graph.steps.append(Step(f"bundle/{name}", f"bundle {name}",
                                {"verify": key_of(verify_key), "archive": config.archive, "code": _code("packager.bundle")},
                                outputs, runners.bundle_runner(model_file, metrics_path, bundle_dir, pack, config),
                                needs=[f"{prefix}/{q}/verify", made_by]))
        graph.bundles.append(bundle_dir)
        graph.metrics_files.append(metrics_path)
