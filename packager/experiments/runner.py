"""The experiment run: calibration, the mask-mode sweep, noise, mask overlap, recovery."""
from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from packager.experiment_cells import CellCache
from packager.experiments.config import ENGLISH, RESULTS_SCHEMA, ExperimentConfig, ExperimentError, Segment
from packager.experiments.outputs import write_outputs
from packager.pair_data import canonical_keep, digest
from packager.quality import mean_score

logger = logging.getLogger(__name__)


class Experiment:
    """One run of the experiment plan (see the module docstring)."""

    def __init__(self, model_dir: Path, data_dir: Path, out_dir: Path, config: ExperimentConfig,
                 results_md: Path | None, show_progress: bool = True, command: str | None = None):
        self.model_dir, self.data_dir, self.out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
        self.config = config
        self.results_md = results_md
        self.show_progress = show_progress
        self.command = command or " ".join(sys.argv)
        self.timings: dict[str, float] = {}
        self.cells_computed = 0
        self.cells_cached = 0
        self.cells = CellCache(self.out_dir / "cells")
        for split in ("train", "dev", "test"):
            if not (self.data_dir / f"{split}.jsonl").is_file():
                raise ExperimentError(f"{self.data_dir / f'{split}.jsonl'}: harvested split not found; run `make data-eval` "
                                      "(or `python -m models.harvest`) first")
        if not (self.model_dir / "config.json").is_file():
            raise ExperimentError(f"{self.model_dir}: no config.json; give the default model directory (models/default)")
        if not config.packs or any(not pack for pack in config.packs):
            raise ExperimentError("config: give at least one pack with at least one language")
        if config.split not in ("test", "dev"):
            raise ExperimentError(f"config: split {config.split!r}: score on test or dev")

    # ---- setup -------------------------------------------------------------------------------
    def _languages(self) -> list[str]:
        langs: list[str] = []
        for pack in self.config.packs + (self.config.overlap_langs,):
            langs += [lang for lang in pack if lang not in langs]
        return langs

    def load_parent(self) -> None:
        import torch

        from packager.calibrate import PromptBuilder, load_model
        from packager.core.fingerprint import file_sha256

        torch.set_num_threads(self.config.threads)
        self.parent = load_model(self.model_dir)
        self.builder = PromptBuilder(self.model_dir, self.parent.tokenizer, "{source}")
        self.test_sha = file_sha256(self.data_dir / f"{self.config.split}.jsonl")  # the scored split's file
        self.models = {self.parent.fingerprint: self.parent.model}
        self.tensor_bytes, self.expert_bytes = checkpoint_bytes(self.model_dir)

    def calibration(self):
        from packager.calibrate import CalibrationSettings, calibrate
        from packager.core.stats import RoutingStats

        # calibration reads the dev split, or the train split when the cells score dev
        calib_split = "train" if self.config.split == "dev" else "dev"
        path = self.out_dir / ("stats.safetensors" if calib_split == "dev" else f"stats-{calib_split}.safetensors")
        pairs = tuple(p for lang in self._languages() for p in (f"{ENGLISH}-{lang}", f"{lang}-{ENGLISH}"))
        settings = CalibrationSettings(pairs=pairs, teacher_forced=True, max_sentences=self.config.calib_sentences,
                                       batch_size=self.config.batch_size, reap=True, seed=self.config.seed)
        if path.is_file():
            stats = RoutingStats.load(path)
            run = stats.meta.get("provenance", [{}])[0]
            if (stats.meta.get("model_fingerprint") == self.parent.fingerprint and sorted(stats.pairs()) == sorted(pairs)
                    and run.get("settings", {}).get("max_sentences") == settings.max_sentences):
                return stats
            logger.warning("%s was computed with other settings; calibrating again", path)
        started = time.monotonic()
        stats = calibrate(self.model_dir, [self.data_dir / f"{calib_split}.jsonl"], settings, command=self.command,
                          show_progress=self.show_progress, loaded=self.parent)
        stats.save(path)
        self.timings["calibration"] = round(time.monotonic() - started, 1)
        return stats

    def load_samples(self) -> None:
        """Disjoint seeded samples of the scored split (test by default) per en->X direction."""
        config = self.config
        wanted = {lang for pack in config.packs for lang in pack}
        pools: dict[str, list[Segment]] = {lang: [] for lang in wanted}
        split_file = self.data_dir / f"{config.split}.jsonl"
        with split_file.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record.get("src_lang") == ENGLISH and record.get("tgt_lang") in pools:
                    pools[record["tgt_lang"]].append(Segment(record["src"], record["tgt"]))
        self.samples: dict[str, list[list[Segment]]] = {}
        for lang, pool in sorted(pools.items()):
            slug = f"{ENGLISH}-{lang}"
            need = config.sample * config.noise_samples
            if len(pool) < need:
                raise ExperimentError(f"{split_file}: {len(pool)} {slug} {config.split} records, need {need} "
                                      f"({config.noise_samples} disjoint samples of {config.sample}): lower the sample size")
            random.Random(f"{config.seed}:{slug}").shuffle(pool)
            self.samples[slug] = [pool[i * config.sample:(i + 1) * config.sample] for i in range(config.noise_samples)]

    # ---- one scored cell -----------------------------------------------------------------------------
    def pack_n(self, langs: Sequence[str]) -> int:
        return self.config.sample if len(langs) == 1 else min(self.config.sample, self.config.sample_multi)

    def evaluate(self, fingerprint: str, slug: str, keep: dict[int, list[int]] | None = None, sample_idx: int = 0,
                 model=None, label: str = "", n: int | None = None) -> dict:
        """Scores of one model (optionally masked to `keep`) on one direction and sample (cached)."""
        from packager import experiment_cells as cells

        config = self.config
        key = self.cells.key(model=fingerprint, keep=canonical_keep(keep), pair=slug, sample=sample_idx,
                             n=n or config.sample, seed=config.seed, test_sha256=self.test_sha, decoding=self.decoding(),
                             bootstrap=config.bootstrap)
        cached = self.cells.load(key)
        if cached is not None:
            self.cells_cached += 1
            self._advance()
            return cached
        segments = self.samples[slug][sample_idx][:n or config.sample]
        srcs, refs = [s.src for s in segments], [s.ref for s in segments]
        started = time.monotonic()
        outputs = cells.translate(model if model is not None else self.models[fingerprint],
                                  [self.builder.encode(slug, src)[0] for src in srcs], self.parent.eos_id,
                                  self.parent.pad_id, keep, config.max_new_tokens, config.batch_size)
        seconds = time.monotonic() - started
        hyps = [self.parent.tokenizer.decode(o["ids"], skip_special_tokens=True).strip() for o in outputs]
        metrics = cells.score(slug, srcs, refs, hyps, [ENGLISH] + self._languages(), config.bootstrap)
        metrics.update(hit_token_limit=sum(1 for o in outputs if not o["finished"]), seconds=round(seconds, 2))
        self.cells.store(key, label, metrics, srcs, refs, hyps)
        self.cells_computed += 1
        self._advance()
        return metrics

    def decoding(self) -> dict:
        from packager.experiment_cells import decoding

        return decoding(self.config.batch_size, self.config.max_new_tokens)

    def _advance(self) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.advance(self._task)

    # ---- stages -----------------------------------------------------------------------------------------
    @staticmethod
    def summarize(directions: dict) -> dict:
        from packager.quality import summarize_directions

        return summarize_directions(directions)

    def pack_slugs(self, langs: Sequence[str]) -> list[str]:
        return [f"{ENGLISH}-{lang}" for lang in langs]

    def plan(self, langs, ranker: str, allocation: str, drop: float, seed: int | None = None):
        from packager.planning import PlanSettings, plan_keep

        settings = PlanSettings(langs=tuple(langs), direction="en-x", drop_ratio=drop, ranker=ranker, allocation=allocation,
                                seed=self.config.seed if seed is None else seed)
        return plan_keep(self.stats, settings)

    def masked_row(self, langs, ranker: str, allocation: str, drop: float, seed: int | None = None, sample_idx: int = 0) -> dict:
        from packager.planning import PlanningError

        row = {"pack": self.config.pack_name(langs), "ranker": ranker, "allocation": allocation, "drop": drop}
        if seed is not None:
            row["seed"] = seed
        try:
            keep, meta = self.plan(langs, ranker, allocation, drop, seed)
        except PlanningError as exc:
            for _ in self.pack_slugs(langs):
                self._advance()
            return {**row, "error": str(exc)}
        directions = {slug: self.evaluate(self.parent.fingerprint, slug, keep, sample_idx, n=self.pack_n(langs),
                                          label=f"{ranker}/{allocation}/{drop}") for slug in self.pack_slugs(langs)}
        counts = [len(keep[layer_idx]) for layer_idx in sorted(keep)]
        return {**row, "drop_effective": round(meta["drop_ratio_effective"], 4), "counts": counts,
                "tensor_bytes": pruned_bytes(self.tensor_bytes, self.expert_bytes, keep),
                "keep_sha256": digest(canonical_keep(keep)), "directions": directions, "mean": self.summarize(directions)}

    def sweep(self) -> list[dict]:
        config = self.config
        return [self.masked_row(langs, ranker, allocation, drop)
                for langs in config.packs for drop in config.drops for ranker in config.rankers
                for allocation in config.allocations]

    def parent_scores(self) -> dict:
        slugs = sorted({slug for langs in self.config.packs for slug in self.pack_slugs(langs)})
        result = {"directions": {slug: self.evaluate(self.parent.fingerprint, slug, label="parent") for slug in slugs},
                  "packs": {}}
        for langs in self.config.packs:
            directions = {slug: self.evaluate(self.parent.fingerprint, slug, label="parent", n=self.pack_n(langs))
                          for slug in self.pack_slugs(langs)}
            result["packs"][self.config.pack_name(langs)] = {"n_per_direction": self.pack_n(langs), "directions": directions,
                                                             "mean": self.summarize(directions)}
        return result

    def best_plan(self, sweep: list[dict]) -> dict:
        config = self.config
        pack = config.pack_name(config.packs[config.recovery_pack])
        scores = {}
        for ranker in config.rankers:
            for allocation in config.allocations:
                rows = [r for r in sweep if r["pack"] == pack and r["ranker"] == ranker and r["allocation"] == allocation
                        and r["drop"] in config.best_drops and "error" not in r]
                if len(rows) == len(config.best_drops):
                    scores[(ranker, allocation)] = mean_score(r["mean"]["chrf++"] for r in rows)
        if not scores:
            raise ExperimentError(f"no (ranker, allocation) of pack {pack} has results at drops {config.best_drops}")
        order = {(r, a): i for i, (r, a) in enumerate((r, a) for r in config.rankers for a in config.allocations)}
        best = max(scores, key=lambda k: (scores[k], -order[k]))
        return {"pack": pack, "ranker": best[0], "allocation": best[1], "mean_chrf++": scores[best],
                "criterion": f"highest mean chrF++ of {pack} over drops {list(config.best_drops)} (ties: listed order)",
                "candidates": [{"ranker": r, "allocation": a, "mean_chrf++": s} for (r, a), s in sorted(scores.items(), key=lambda kv: -kv[1])]}

    def noise(self, best: dict) -> dict:
        config = self.config
        langs = config.packs[0]
        slug = self.pack_slugs(langs)[0]
        samples = []
        for sample_idx in range(config.noise_samples):
            parent = self.evaluate(self.parent.fingerprint, slug, None, sample_idx, label="parent")
            row = self.masked_row(langs, best["ranker"], best["allocation"], config.noise_drop, sample_idx=sample_idx)
            pruned = row["directions"][slug] if "directions" in row else None
            samples.append({"sample": sample_idx, "parent_chrf++": parent["chrf++"],
                            "pruned_chrf++": pruned["chrf++"] if pruned else None,
                            "chrf++_ci95": pruned.get("chrf++_ci95") if pruned else None})
        seeds = []
        for seed in range(config.noise_seeds):
            row = self.masked_row(langs, "random", "uniform", config.noise_drop, seed=seed)
            seeds.append({"seed": seed, "chrf++": row["directions"][slug]["chrf++"] if "directions" in row else None})

        def spread(values):
            values = [v for v in values if v is not None]
            return round(statistics.stdev(values), 2) if len(values) > 1 else None

        drops = [s["parent_chrf++"] - s["pruned_chrf++"] for s in samples if s["pruned_chrf++"] is not None]
        return {
            "pair": slug,
            "test_samples": {"setting": f"{best['ranker']}/{best['allocation']} drop {config.noise_drop}", "n_each": config.sample,
                             "rows": samples, "sd_parent": spread(s["parent_chrf++"] for s in samples),
                             "sd_pruned": spread(s["pruned_chrf++"] for s in samples), "sd_loss": spread(drops)},
            "random_seeds": {"setting": f"random/uniform drop {config.noise_drop}", "rows": seeds,
                             "sd": spread(s["chrf++"] for s in seeds)},
        }

    def overlap(self) -> list[dict]:
        from packager.planning import compare_keeps

        config = self.config
        n_experts = {layer_idx: self.stats.n_experts for layer_idx in self.stats.moe_layers}
        rows = []
        for drop in config.overlap_drops:
            for allocation in ("uniform", "dynamic"):
                keeps = [self.plan((lang,), "routing-mass", allocation, drop)[0] for lang in config.overlap_langs]
                report = compare_keeps(keeps, list(config.overlap_langs), n_experts, seed=config.seed).to_dict()
                rows.append({"drop": drop, "ranker": "routing-mass", "allocation": allocation, **report})
        return rows

    # ---- recovery -------------------------------------------------------------------------------------
    def load_model_dir(self, path: Path, key: str | None = None):
        """Load `path` as the one extra model in memory, found by `key` (default: its fingerprint)."""
        import torch

        from packager import load_pruned
        from packager.core.fingerprint import model_fingerprint

        key = key or model_fingerprint(path)
        if key not in self.models:
            self.models = {self.parent.fingerprint: self.parent.model}  # at most one extra model in memory
            self.models[key] = load_pruned(path, dtype=torch.float32).eval()
        return key

    def score_model_dir(self, path: Path, slugs: list[str], label: str, n: int) -> dict:
        fingerprint = self.load_model_dir(path)
        directions = {slug: self.evaluate(fingerprint, slug, label=label, n=n) for slug in slugs}
        return {"model": str(path), "fingerprint": fingerprint, "directions": directions, "mean": self.summarize(directions)}

    def distilled_from(self, out: Path, pruned_fingerprint: str, settings) -> bool:
        """Whether `out` holds a model distilled from this parent and the pruned model with
        `pruned_fingerprint` with these settings (a new parent or plan must not reuse an older run's model)."""
        try:
            record = json.loads((out / "distillation.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        wanted = asdict(settings)
        return (record.get("parent", {}).get("fingerprint") == self.parent.fingerprint
                and record.get("input", {}).get("fingerprint") == pruned_fingerprint
                and all(record.get("settings", {}).get(k) == (list(v) if isinstance(v, tuple) else v)
                        for k, v in wanted.items() if k in record.get("settings", {})))

    def recovery(self, best: dict) -> dict:
        from packager.core.fingerprint import model_fingerprint
        from packager.distill import DistillSettings, distill
        from packager.planning import PlanSettings, make_plan
        from packager.prune import prune_checkpoint, read_provenance

        config = self.config
        langs = config.packs[config.recovery_pack]
        slugs = self.pack_slugs(langs)
        models_dir = self.out_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        runs = [(drop, seed) for drop in config.recovery_drops for seed in (config.seed,)]
        runs += [(config.distill_noise_drop, seed) for seed in config.distill_noise_seeds]
        for drop, seed in runs:
            tag = f"{int(round(drop * 1000)):04d}"
            settings = PlanSettings(langs=tuple(langs), direction="en-x", drop_ratio=drop, ranker=best["ranker"],
                                    allocation=best["allocation"], seed=config.seed)
            plan = make_plan(self.stats, settings)
            plan.save(models_dir / f"plan-{tag}.json")
            pruned = models_dir / f"pruned-{tag}"
            record = read_provenance(pruned) if pruned.is_dir() else None
            if record is None or record.get("plan", {}).get("sha256") != plan.sha256():
                prune_checkpoint(self.model_dir, plan, pruned, force=True)
            row = {"drop": drop, "seed": seed, "ranker": best["ranker"], "allocation": best["allocation"],
                   "counts": [len(plan.keep[i]) for i in sorted(plan.keep)]}
            if seed == config.seed:
                row["pruned"] = self.score_model_dir(pruned, slugs, f"pruned {drop}", self.pack_n(langs))
                masked = self.masked_row(langs, best["ranker"], best["allocation"], drop)
                row["pruned_equals_mask"] = {slug: masked["directions"][slug]["chrf++"] == row["pruned"]["directions"][slug]["chrf++"]
                                             for slug in slugs}
            pruned_fingerprint = model_fingerprint(pruned)
            targets_list = ("parent", "references") if seed == config.seed else ("parent",)
            for targets in targets_list:
                name = f"{'distill' if targets == 'parent' else 'sft'}-{tag}" + (f"-seed{seed}" if seed != config.seed else "")
                out = models_dir / name
                distill_settings = DistillSettings(
                    pairs=tuple(slugs), targets=targets, sentences=config.distill_sentences,
                    max_steps=config.distill_max_steps, minutes=config.distill_minutes, lr=config.distill_lr,
                    batch_tokens=config.distill_batch_tokens, eval_every=config.distill_eval_every, seed=seed,
                    gen_batch_size=64, keep_unfinished=config.distill_keep_unfinished,
                    drop_flagged=config.distill_drop_flagged)
                if not self.distilled_from(out, pruned_fingerprint, distill_settings):
                    started = time.monotonic()
                    distill(pruned, self.model_dir, [self.data_dir / "train.jsonl"], distill_settings, out,
                            cache_dir=self.out_dir / "distill-cache", work_dir=self.out_dir / "work" / name, force=True,
                            command=self.command, show_progress=False)
                    self.timings[name] = round(time.monotonic() - started, 1)
                prov = json.loads((out / "distillation.json").read_text(encoding="utf-8"))
                row[targets] = {**self.score_model_dir(out, slugs, name, self.pack_n(langs)),
                                "training": {k: prov["run"][k] for k in ("step", "tokens", "elapsed", "best_step",
                                                                        "dev_loss_initial", "best_dev_loss", "stopped")},
                                "sentences": prov["sentences"]}
            rows.append(row)
        return {"pack": self.config.pack_name(langs), "sentences_per_direction": config.distill_sentences,
                "test_per_direction": self.pack_n(langs),
                "budget": {"minutes": config.distill_minutes, "max_steps": config.distill_max_steps},
                "data": str(self.data_dir / "train.jsonl"), "rows": rows}

    # ---- the run ----------------------------------------------------------------------------------------
    def n_cells(self) -> int:
        config = self.config
        directions = sum(len(p) for p in config.packs)
        total = directions * len(config.drops) * len(config.rankers) * len(config.allocations)
        total += len({lang for p in config.packs for lang in p})          # parent
        first = len(config.packs[0])
        total += config.noise_samples * 2 * first + config.noise_seeds * first
        rec = len(config.packs[config.recovery_pack])
        total += len(config.recovery_drops) * rec * 4 + len(config.distill_noise_seeds) * rec
        return total

    def _prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.load_parent()
        self.stats = self.calibration()
        self.load_samples()

    @contextmanager
    def _progress(self, total: int):
        self._bar = None
        if self.show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("experiments"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._task = self._bar.add_task("cells", total=total)
            self._bar.start()
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.stop()

    def run(self) -> dict:
        from packager.experiments.reduce import n_cells as reduce_cells, reduce_stage
        from packager.planning import PlanningError

        started = time.monotonic()
        self._prepare()
        with self._progress(self.n_cells() + reduce_cells(self.config)):
            stage = time.monotonic()
            parent = self.parent_scores()
            sweep = self.sweep()
            self.timings["sweep"] = round(time.monotonic() - stage, 1)
            best = self.best_plan(sweep)
            stage = time.monotonic()
            noise = self.noise(best)
            self.timings["noise"] = round(time.monotonic() - stage, 1)
            try:
                overlap = self.overlap()
            except PlanningError as exc:
                overlap = [{"error": str(exc)}]
            stage = time.monotonic()
            recovery = self.recovery(best)
            self.timings["recovery"] = round(time.monotonic() - stage, 1)
            reduce = reduce_stage(self)
        self.timings["total"] = round(time.monotonic() - started, 1)
        results = self.results(parent, sweep, best, noise, overlap, recovery, reduce)
        write_outputs(results, self.out_dir, self.results_md)
        return results

    def run_reduce(self) -> dict:
        """The reduce stage alone (`--only reduce`): OUT/reduce.json and a page with its section."""
        from packager.experiments.outputs import write_reduce_outputs
        from packager.experiments.reduce import n_cells as reduce_cells, reduce_stage

        started = time.monotonic()
        self._prepare()
        with self._progress(reduce_cells(self.config)):
            reduce = reduce_stage(self)
        self.timings["total"] = round(time.monotonic() - started, 1)
        results = {**self._common(), "reduce": reduce}
        write_reduce_outputs(results, self.out_dir, self.results_md)
        return results

    def layer_jsd(self) -> dict[str, list[float]]:
        """Per pack, the per-layer JSD against English that dynamic allocation follows (en->X, output role)."""
        from packager.planning import pack_jsd

        return {self.config.pack_name(langs): [round(float(v), 4) for v in pack_jsd(self.stats, list(langs), "en-x")[0]]
                for langs in self.config.packs}

    def _common(self) -> dict:
        """What every results file records: the model (with the sha256 of its weight files), data, setup, provenance."""
        import torch
        import transformers

        from packager import __version__
        from packager.core.fingerprint import file_sha256

        config = self.config
        calib_split = "train" if config.split == "dev" else "dev"
        return {
            "schema": RESULTS_SCHEMA,
            "model": {"dir": str(self.model_dir), "fingerprint": self.parent.fingerprint,
                      "weights_sha256": {p.name: file_sha256(p) for p in sorted(self.model_dir.glob("*.safetensors"))},
                      "family": self.stats.meta.get("family"), "moe_layers": self.stats.moe_layers,
                      "n_experts": self.stats.n_experts, "top_k": self.stats.top_k, "tensor_bytes": self.tensor_bytes,
                      "parameters": sum(p.numel() for p in self.parent.model.parameters())},
            "data": {split: {"path": str(self.data_dir / f"{split}.jsonl"), "sha256": file_sha256(self.data_dir / f"{split}.jsonl")}
                     for split in ("train", "dev", "test")},
            "setup": {
                "config": asdict(config),
                "calibration": {"mode": "teacher-forced", "split": calib_split,
                                "sentences_per_direction": config.calib_sentences, "pairs": self.stats.pairs(), "reap": True},
                "test_sample": {"split": config.split, "per_direction": config.sample,
                                "per_direction_multilingual": min(config.sample, config.sample_multi), "selection":
                                f"seeded shuffle (seed {config.seed}) of the en->X {config.split} records, disjoint blocks of "
                                f"{config.sample} (multilingual packs use the first {min(config.sample, config.sample_multi)} "
                                "of each block); block 0 everywhere except the noise rows"},
                "decoding": self.decoding(),
                "mask_mode": "dropped experts' router logits set to -inf in the loaded parent (packager.masking); no files",
            },
            "cells": {"computed": self.cells_computed, "cached": self.cells_cached},
            "timings_seconds": self.timings,
            "provenance": {"command": self.command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "versions": {"packager": __version__, "torch": torch.__version__,
                                        "transformers": transformers.__version__, "python": sys.version.split()[0]}},
        }

    def results(self, parent, sweep, best, noise, overlap, recovery, reduce) -> dict:
        return {**self._common(), "parent": parent, "layer_jsd": self.layer_jsd(), "sweep": sweep, "best_plan": best,
                "noise": noise, "overlap": overlap, "recovery": recovery, "reduce": reduce}


def checkpoint_bytes(model_dir: Path) -> tuple[int, dict[int, list[int]]]:
    """Tensor bytes of a checkpoint and, per MoE layer, the bytes each routed expert holds
    (its weights plus its router row), read from the safetensors headers."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader

    with CheckpointReader(model_dir) as reader:
        config, names = reader.config, set(reader.names())
        arch = load_arch(config)
        per_layer = {}
        for layer_idx in arch.moe_layers(config):
            n_experts = arch.n_experts(config, layer_idx)
            layout = arch.detect_layout(layer_idx, n_experts, names)
            sizes = [0] * n_experts
            for name in arch.router_tensor_names(layer_idx):
                if name in names:
                    for expert_idx in range(n_experts):
                        sizes[expert_idx] += reader.info(name).nbytes // n_experts
            if layout == "per_expert":
                for expert_idx in range(n_experts):
                    sizes[expert_idx] += sum(reader.info(name).nbytes for name in arch.expert_tensor_names(layer_idx, expert_idx).values()
                                             if name in names)
            else:
                for name in arch.layout_tensor_names(layout, layer_idx, n_experts):
                    for expert_idx in range(n_experts):
                        sizes[expert_idx] += reader.info(name).nbytes // n_experts
            per_layer[layer_idx] = sizes
        return reader.total_bytes, per_layer


def pruned_bytes(total: int, expert_bytes: dict[int, list[int]], keep: dict[int, list[int]] | None) -> int:
    if keep is None:
        return total
    return total - sum(size for layer_idx, sizes in expert_bytes.items() for expert_idx, size in enumerate(sizes)
                       if expert_idx not in keep[layer_idx])
