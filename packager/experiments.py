"""`make experiments`: the method's findings reproduced on the embedded default model.

    python -m packager.experiments --out runs/experiments [--model models/default] [--data data/harvest]

What runs (every number comes from this command; docs/results.md is generated from it):
1. Calibration, teacher-forced (reference translations, one forward pass per batch), on a
   seeded sample of the harvested dev split, en->X and X->en for every pack language (X->en
   gives the English-as-output reference of the dynamic allocation's JSD), REAP included.
2. Sweep in mask mode (packager.masking: the dropped experts' router logits are -inf; no file
   is written): packs x rankers x allocations x drop ratios, each scored on a seeded sample of
   the test split per direction (greedy, batched): chrF++, BLEU (sacrebleu, with signatures
   and a bootstrap 95% interval for chrF++) and the generation-error rate (packager.quality
   detectors: empty, repetition, length ratio, wrong script/language, lost placeholder).
3. Noise: the same setting on disjoint test samples, the random ranker with several seeds,
   bootstrap intervals in every cell, and a second distillation seed.
4. Recovery: for the best (ranker, allocation) of the distillation pack, the plan is pruned
   to files at each recovery drop ratio and fine-tuned by sequence-level distillation on the
   parent's translations and, as the control, by SFT on the references (packager.distill,
   same sentences, same budget), then scored like the sweep.
5. Mask overlap: global IoU of the per-language masks next to random masks of the same
   per-layer sizes (packager.planning.compare_keeps).
Every scored cell is cached under `OUT/cells/` by a key of model fingerprint, kept experts,
direction, sample, decoding settings and the code that computes it (packager.experiment_cells:
an edit to the scorer or the generator computes the cells again), and every pruned/distilled model under
`OUT/models/`, so an interrupted run continues where it stopped and a re-run only rebuilds
the report. Results: `OUT/results.json`, `OUT/plots/*.png`, and the Markdown page.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from packager.core.errors import PackagerError
from packager.experiment_cells import CellCache, canonical_keep, digest
from packager.quality import mean_score

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = "packager.experiments/1"
ENGLISH = "en"


class ExperimentError(PackagerError):
    """Inputs of the experiment run (model, data, settings) that cannot be used."""


@dataclass(frozen=True)
class ExperimentConfig:
    packs: tuple[tuple[str, ...], ...] = (("de",), ("fr",), ("de", "fr", "es"))   # en->X languages per pack
    rankers: tuple[str, ...] = ("routing-mass", "frequency", "reap", "random", "inverted")
    allocations: tuple[str, ...] = ("uniform", "dynamic", "inverted-dynamic")
    drops: tuple[float, ...] = (0.25, 0.5, 0.625, 0.75, 0.875)
    calib_sentences: int = 100          # per calibrated direction (dev split)
    sample: int = 100                   # test sentences per direction (single-language packs)
    sample_multi: int = 50              # per direction in multilingual packs (the first ones of the same sample)
    noise_samples: int = 3              # disjoint test samples for the sample-noise setting
    noise_seeds: int = 3                # random-ranker seeds for the seed-noise setting
    noise_drop: float = 0.5
    bootstrap: int = 200                # chrF++ bootstrap resamples per cell (0 = none)
    recovery_pack: int = -1             # index into packs
    recovery_drops: tuple[float, ...] = (0.5, 0.75, 0.875)
    best_drops: tuple[float, ...] = (0.5, 0.625, 0.75)  # the best plan maximises mean chrF++ here
    distill_sentences: int = 3000       # per direction (train split)
    distill_minutes: float | None = 3.0
    distill_max_steps: int | None = None
    distill_eval_every: int = 50
    distill_lr: float = 3e-4
    distill_batch_tokens: int = 4096
    distill_keep_unfinished: bool = False   # a random tiny parent never ends its outputs: --quick keeps them
    distill_drop_flagged: bool = True       # ... and every output of it is flagged: --quick keeps those too
    distill_noise_seeds: tuple[int, ...] = (1,)   # extra distillation seeds at distill_noise_drop
    distill_noise_drop: float = 0.75
    overlap_drops: tuple[float, ...] = (0.75, 0.875)
    overlap_langs: tuple[str, ...] = ("de", "fr", "es")
    batch_size: int = 32
    max_new_tokens: int = 256
    seed: int = 0
    # one torch thread: with two, any other process on a 2-core machine made OpenMP spin and a
    # cell took 25-110 s instead of 3-4 s (measured); one thread ran at a steady 3-4 s per cell
    threads: int = 1

    def pack_name(self, langs: Sequence[str]) -> str:
        return f"{ENGLISH}->{','.join(langs)}"


QUICK = ExperimentConfig(
    packs=(("de",), ("de", "fr")), drops=(0.5, 0.75), calib_sentences=16, sample=8, noise_samples=2, noise_seeds=2,
    bootstrap=0, recovery_drops=(0.5, 0.75), best_drops=(0.5, 0.75), distill_sentences=20, distill_minutes=None,
    distill_max_steps=3, distill_eval_every=2, distill_batch_tokens=1024, distill_keep_unfinished=True,
    distill_drop_flagged=False,
    distill_noise_seeds=(), overlap_drops=(0.5, 0.75),
    overlap_langs=("de", "fr"), batch_size=16, max_new_tokens=16,
)


@dataclass
class Segment:
    src: str
    ref: str


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
        self.test_sha = file_sha256(self.data_dir / "test.jsonl")
        self.models = {self.parent.fingerprint: self.parent.model}
        self.tensor_bytes, self.expert_bytes = checkpoint_bytes(self.model_dir)

    def calibration(self):
        from packager.calibrate import CalibrationSettings, calibrate
        from packager.core.stats import RoutingStats

        path = self.out_dir / "stats.safetensors"
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
        stats = calibrate(self.model_dir, [self.data_dir / "dev.jsonl"], settings, command=self.command,
                          show_progress=self.show_progress, loaded=self.parent)
        stats.save(path)
        self.timings["calibration"] = round(time.monotonic() - started, 1)
        return stats

    def load_samples(self) -> None:
        """Disjoint seeded samples of the test split per en->X direction."""
        config = self.config
        wanted = {lang for pack in config.packs for lang in pack}
        pools: dict[str, list[Segment]] = {lang: [] for lang in wanted}
        with (self.data_dir / "test.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record.get("src_lang") == ENGLISH and record.get("tgt_lang") in pools:
                    pools[record["tgt_lang"]].append(Segment(record["src"], record["tgt"]))
        self.samples: dict[str, list[list[Segment]]] = {}
        for lang, pool in sorted(pools.items()):
            slug = f"{ENGLISH}-{lang}"
            need = config.sample * config.noise_samples
            if len(pool) < need:
                raise ExperimentError(f"{self.data_dir / 'test.jsonl'}: {len(pool)} {slug} test records, need {need} "
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
        key = self.cells.key(model=fingerprint, keep=cells.canonical_keep(keep), pair=slug, sample=sample_idx,
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
    def load_model_dir(self, path: Path):
        import torch

        from packager import load_pruned
        from packager.core.fingerprint import model_fingerprint

        fingerprint = model_fingerprint(path)
        if fingerprint not in self.models:
            self.models = {self.parent.fingerprint: self.parent.model}  # at most one extra model in memory
            self.models[fingerprint] = load_pruned(path, dtype=torch.float32).eval()
        return fingerprint

    def score_model_dir(self, path: Path, slugs: list[str], label: str, n: int) -> dict:
        fingerprint = self.load_model_dir(path)
        directions = {slug: self.evaluate(fingerprint, slug, label=label, n=n) for slug in slugs}
        return {"model": str(path), "fingerprint": fingerprint, "directions": directions, "mean": self.summarize(directions)}

    def recovery(self, best: dict) -> dict:
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
            targets_list = ("parent", "references") if seed == config.seed else ("parent",)
            for targets in targets_list:
                name = f"{'distill' if targets == 'parent' else 'sft'}-{tag}" + (f"-seed{seed}" if seed != config.seed else "")
                out = models_dir / name
                if not (out / "distillation.json").is_file():
                    started = time.monotonic()
                    distill_settings = DistillSettings(
                        pairs=tuple(slugs), targets=targets, sentences=config.distill_sentences,
                        max_steps=config.distill_max_steps, minutes=config.distill_minutes, lr=config.distill_lr,
                        batch_tokens=config.distill_batch_tokens, eval_every=config.distill_eval_every, seed=seed,
                        gen_batch_size=64, keep_unfinished=config.distill_keep_unfinished,
                        drop_flagged=config.distill_drop_flagged)
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

    def run(self) -> dict:
        from packager.planning import PlanningError

        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.load_parent()
        self.stats = self.calibration()
        self.load_samples()
        bar = None
        if self.show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("experiments"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar = bar
        if bar is not None:
            self._task = bar.add_task("cells", total=self.n_cells())
            bar.start()
        try:
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
        finally:
            if bar is not None:
                bar.stop()
        self.timings["total"] = round(time.monotonic() - started, 1)
        results = self.results(parent, sweep, best, noise, overlap, recovery)
        write_outputs(results, self.out_dir, self.results_md)
        return results

    def layer_jsd(self) -> dict[str, list[float]]:
        """Per pack, the per-layer JSD against English that dynamic allocation follows (en->X, output role)."""
        from packager.planning import pack_jsd

        return {self.config.pack_name(langs): [round(float(v), 4) for v in pack_jsd(self.stats, list(langs), "en-x")[0]]
                for langs in self.config.packs}

    def results(self, parent, sweep, best, noise, overlap, recovery) -> dict:
        import torch
        import transformers

        from packager import __version__
        from packager.core.fingerprint import file_sha256

        config = self.config
        return {
            "schema": RESULTS_SCHEMA,
            "model": {"dir": str(self.model_dir), "fingerprint": self.parent.fingerprint,
                      "family": self.stats.meta.get("family"), "moe_layers": self.stats.moe_layers,
                      "n_experts": self.stats.n_experts, "top_k": self.stats.top_k, "tensor_bytes": self.tensor_bytes,
                      "parameters": sum(p.numel() for p in self.parent.model.parameters())},
            "data": {split: {"path": str(self.data_dir / f"{split}.jsonl"), "sha256": file_sha256(self.data_dir / f"{split}.jsonl")}
                     for split in ("train", "dev", "test")},
            "setup": {
                "config": asdict(config),
                "calibration": {"mode": "teacher-forced", "split": "dev", "sentences_per_direction": config.calib_sentences,
                                "pairs": self.stats.pairs(), "reap": True},
                "test_sample": {"split": "test", "per_direction": config.sample,
                                "per_direction_multilingual": min(config.sample, config.sample_multi), "selection":
                                f"seeded shuffle (seed {config.seed}) of the en->X test records, disjoint blocks of {config.sample} "
                                f"(multilingual packs use the first {min(config.sample, config.sample_multi)} of each block); "
                                "block 0 everywhere except the noise rows"},
                "decoding": self.decoding(),
                "mask_mode": "dropped experts' router logits set to -inf in the loaded parent (packager.masking); no files",
            },
            "parent": parent,
            "layer_jsd": self.layer_jsd(),
            "sweep": sweep,
            "best_plan": best,
            "noise": noise,
            "overlap": overlap,
            "recovery": recovery,
            "cells": {"computed": self.cells_computed, "cached": self.cells_cached},
            "timings_seconds": self.timings,
            "provenance": {"command": self.command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "versions": {"packager": __version__, "torch": torch.__version__,
                                        "transformers": transformers.__version__, "python": sys.version.split()[0]}},
        }


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def write_plots(results: dict, plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    config = results["setup"]["config"]
    written = []
    for pack in dict.fromkeys(r["pack"] for r in results["sweep"]):
        rows = [r for r in results["sweep"] if r["pack"] == pack and "error" not in r]
        parent_chrf = results["parent"]["packs"][pack]["mean"]["chrf++"]
        fig, axes = plt.subplots(2, len(config["allocations"]), figsize=(4.2 * len(config["allocations"]), 6.4),
                                 sharex=True, squeeze=False)
        for col, allocation in enumerate(config["allocations"]):
            for ranker in config["rankers"]:
                sel = sorted((r for r in rows if r["ranker"] == ranker and r["allocation"] == allocation), key=lambda r: r["drop"])
                xs = [100 * r["drop"] for r in sel]
                axes[0][col].plot(xs, [r["mean"]["chrf++"] for r in sel], marker="o", label=ranker)
                axes[1][col].plot(xs, [100 * r["mean"]["error_rate"] for r in sel], marker="o", label=ranker)
            if parent_chrf is not None:
                axes[0][col].axhline(parent_chrf, color="black", linestyle=":", label="parent")
            axes[0][col].set_title(f"{pack}: {allocation}")
            axes[0][col].set_ylabel("chrF++")
            axes[1][col].set_ylabel("generation errors (%)")
            axes[1][col].set_xlabel("experts dropped (%)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"sweep-{_slug(pack)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    recovery = results["recovery"]
    main_rows = [r for r in recovery["rows"] if "pruned" in r]
    if main_rows:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [100 * r["drop"] for r in main_rows]
        for key, label in (("pruned", "no recovery"), ("references", "SFT on references"), ("parent", "distillation")):
            ax.plot(xs, [r[key]["mean"]["chrf++"] for r in main_rows], marker="o", label=label)
        ax.axhline(results["parent"]["packs"][recovery["pack"]]["mean"]["chrf++"], color="black", linestyle=":", label="parent")
        ax.set_xlabel("experts dropped (%)")
        ax.set_ylabel("chrF++")
        ax.set_title(f"recovery, {recovery['pack']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / "recovery.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    overlap = [r for r in results["overlap"] if "error" not in r]
    if overlap:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        labels = [f"{100 * r['drop']:g}% {r['allocation']}" for r in overlap]
        pairwise = [statistics.mean(p["iou"] for p in r["pairwise"]) for r in overlap]
        random_pw = [statistics.mean(p["random_iou"] for p in r["pairwise"]) for r in overlap]
        xs = range(len(overlap))
        ax.bar([x - 0.2 for x in xs], pairwise, width=0.4, label="language masks (mean pairwise IoU)")
        ax.bar([x + 0.2 for x in xs], random_pw, width=0.4, label="random masks, same sizes")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("global IoU")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / "overlap.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _budget(budget: dict) -> str:
    parts = []
    if budget.get("minutes"):
        parts.append(f"{budget['minutes']:g} minutes")
    if budget.get("max_steps"):
        parts.append(f"{budget['max_steps']} steps")
    return " or ".join(parts)


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(rate) -> str:
    return "–" if rate is None else f"{100 * rate:.0f}%"


def findings(results: dict) -> list[str]:
    """Plain statements computed from the numbers (whichever way they go)."""
    config = results["setup"]["config"]
    sweep = [r for r in results["sweep"] if "error" not in r]
    lines = []

    def score(pack, ranker, allocation, drop):
        for r in sweep:
            if (r["pack"], r["ranker"], r["allocation"], r["drop"]) == (pack, ranker, allocation, drop):
                return r["mean"]["chrf++"]
        return None

    packs = list(dict.fromkeys(r["pack"] for r in sweep))
    high = [d for d in config["drops"] if d >= 0.5]
    for rival in ("random", "inverted"):
        if rival not in config["rankers"] or "routing-mass" not in config["rankers"]:
            continue
        wins, total, gaps = 0, 0, []
        for pack in packs:
            for drop in high:
                a, b = score(pack, "routing-mass", "uniform", drop), score(pack, rival, "uniform", drop)
                if a is not None and b is not None:
                    total += 1
                    wins += a > b
                    gaps.append(a - b)
        if total:
            lines.append(f"Routing mass vs {rival} ranking (uniform allocation, drops >= 50%): routing mass scores higher in "
                         f"{wins} of {total} pack x drop settings; mean chrF++ difference {statistics.mean(gaps):+.1f}.")
    if {"uniform", "dynamic"} <= set(config["allocations"]):
        cliff = [d for d in config["drops"] if 0.5 < d < max(config["drops"])] or high
        wins, total, gaps = 0, 0, []
        for pack in packs:
            for drop in cliff:
                a, b = score(pack, "routing-mass", "dynamic", drop), score(pack, "routing-mass", "uniform", drop)
                if a is not None and b is not None:
                    total += 1
                    wins += a > b
                    gaps.append(a - b)
        if total:
            text = (f"Dynamic vs uniform allocation (routing mass, drops {', '.join(f'{100 * d:g}%' for d in cliff)}): "
                    f"dynamic scores higher in {wins} of {total} settings; mean chrF++ difference {statistics.mean(gaps):+.1f}.")
            top = max(config["drops"])
            same = {r["keep_sha256"] for r in sweep if r["drop"] == top and r["ranker"] == "routing-mass"
                    and r["pack"] == packs[0]}
            if len(same) == 1:
                text += f" At {100 * top:g}% every layer keeps exactly top-k experts, so all allocations coincide."
            lines.append(text)
    for pack in packs:
        best = []
        for drop in config["drops"]:
            cands = [r for r in sweep if r["pack"] == pack and r["drop"] == drop]
            if cands:
                top = max(cands, key=lambda r: r["mean"]["chrf++"])
                best.append(f"{100 * drop:g}%: {top['ranker']}/{top['allocation']} {top['mean']['chrf++']:.1f}")
        lines.append(f"Best setting per drop ratio, {pack}: " + "; ".join(best) + ".")
    rows = [r for r in results["recovery"]["rows"] if "pruned" in r]
    p = results["parent"]["packs"][results["recovery"]["pack"]]["mean"]["chrf++"]
    # a loss smaller than twice the measured paired-loss noise (or 1 point) has no meaningful share
    sd_loss = (results.get("noise") or {}).get("test_samples", {}).get("sd_loss") or 0.0
    floor = max(1.0, 2 * sd_loss)

    def errors(cell):
        rate = cell["mean"].get("error_rate")
        return f" ({100 * rate:.0f}% errors)" if rate is not None else ""

    for r in rows:
        lost = p - r["pruned"]["mean"]["chrf++"]
        scores = (f"no recovery {r['pruned']['mean']['chrf++']:.1f}{errors(r['pruned'])}, distillation "
                  f"{r['parent']['mean']['chrf++']:.1f}{errors(r['parent'])}, SFT on references "
                  f"{r['references']['mean']['chrf++']:.1f}{errors(r['references'])}, parent {p:.1f}")
        if lost >= floor:
            shares = {k: (r[k]["mean"]["chrf++"] - r["pruned"]["mean"]["chrf++"]) / lost for k in ("parent", "references")}
            lines.append(f"At {100 * r['drop']:g}% dropped, pruning loses {lost:.1f} chrF++; distillation recovers "
                         f"{100 * shares['parent']:.0f}% of it, SFT on references {100 * shares['references']:.0f}% "
                         f"({scores}).")
        else:
            lines.append(f"At {100 * r['drop']:g}% dropped, pruning changes chrF++ by {-lost:+.1f}, under the noise floor of "
                         f"{floor:.1f} (2 x the measured sd of the loss, at least 1): no recovery share is meaningful "
                         f"({scores}).")
    return lines


def render_markdown(results: dict, out_dir: Path, md_path: Path) -> str:
    config = results["setup"]["config"]
    model = results["model"]
    parent = results["parent"]["directions"]
    lines = [
        "# Results: the method's findings on the embedded default model",
        "",
        "<!-- generated by `make experiments` (python -m packager.experiments); do not edit by hand -->",
        "",
        f"Generated {results['provenance']['created']} by `{results['provenance']['command']}` "
        f"in {results['timings_seconds'].get('total', 0) / 60:.1f} minutes "
        f"({results['cells']['computed']} cells computed, {results['cells']['cached']} reused from the cache).",
        "",
        "## Setup",
        "",
        f"- Model: `{model['dir']}` ({model['family']}, {len(model['moe_layers'])} MoE layers x {model['n_experts']} experts, "
        f"top-{model['top_k']}, {model['parameters'] / 1e6:.2f}M parameters), fingerprint `{model['fingerprint'][:16]}`.",
        f"- Calibration: {results['setup']['calibration']['mode']} on the dev split, "
        f"{config['calib_sentences']} sentences per direction ({', '.join(results['setup']['calibration']['pairs'])}), REAP included.",
        f"- Evaluation: {config['sample']} test sentences per direction, "
        f"{results['setup']['test_sample']['per_direction_multilingual']} per direction in multilingual packs "
        f"({results['setup']['test_sample']['selection']}); "
        f"{results['setup']['decoding']['kind']} decoding, batch {config['batch_size']}, bound "
        f"{results['setup']['decoding']['max_new_tokens']}. chrF++ and BLEU by sacrebleu; "
        f"generation errors by `packager.quality` (empty, repetition, length ratio, wrong script, wrong language, "
        "lost placeholder), counted apart from quality.",
        f"- Sweep: {results['setup']['mask_mode']}.",
        f"- Recovery: {results['recovery']['sentences_per_direction']} training sentences per direction of the train split "
        f"for {results['recovery']['pack']}, budget {_budget(results['recovery']['budget'])} per run "
        "(SFT and distillation alike), every parameter trained, best dev-loss weights kept.",
        "",
        "## Findings",
        "",
    ]
    lines += [f"- {text}" for text in findings(results)]
    lines += ["", "## Parent", "", "| direction | chrF++ | BLEU | errors | errors in references |", "|---|---|---|---|---|"]
    for slug, m in sorted(parent.items()):
        lines.append(f"| {slug} | {_fmt(m['chrf++'])} | {_fmt(m['bleu'])} | {_pct(m['error_rate'])} | {_pct(m['reference_error_rate'])} |")
    for pack in dict.fromkeys(r["pack"] for r in results["sweep"]):
        rows = [r for r in results["sweep"] if r["pack"] == pack]
        pp = results["parent"]["packs"][pack]
        lines += ["", f"## Sweep {pack} (mask mode): chrF++ / generation-error rate", "",
                  f"{pp['n_per_direction']} test sentences per direction, mean over the pack's directions; "
                  f"parent {_fmt(pp['mean']['chrf++'])} / {_pct(pp['mean']['error_rate'])}.", "",
                  "| ranker | allocation | " + " | ".join(f"{100 * d:g}%" for d in config["drops"]) + " |",
                  "|---|---|" + "---|" * len(config["drops"])]
        for ranker in config["rankers"]:
            for allocation in config["allocations"]:
                cells = []
                for drop in config["drops"]:
                    r = next((r for r in rows if (r["ranker"], r["allocation"], r["drop"]) == (ranker, allocation, drop)), None)
                    if r is None or "error" in r:
                        cells.append("n/a")
                    else:
                        cells.append(f"{_fmt(r['mean']['chrf++'])} / {_pct(r['mean']['error_rate'])}")
                lines.append(f"| {ranker} | {allocation} | " + " | ".join(cells) + " |")
        lines += ["", f"Plot: `{out_dir / 'plots' / ('sweep-' + _slug(pack) + '.png')}`"]
        jsd = (results.get("layer_jsd") or {}).get(pack)
        mass = [r for r in rows if r["ranker"] == "routing-mass" and "counts" in r]
        if mass:
            lines += ["", "Experts kept per MoE layer by the routing-mass plans"
                      + (f"; the per-layer JSD against English that dynamic allocation follows is "
                         f"{' / '.join(f'{v:.3f}' for v in jsd)}" if jsd else "") + ":", "",
                      "| allocation | " + " | ".join(f"{100 * d:g}%" for d in config["drops"]) + " |",
                      "|---|" + "---|" * len(config["drops"])]
            for allocation in config["allocations"]:
                cells = []
                for drop in config["drops"]:
                    r = next((r for r in mass if (r["allocation"], r["drop"]) == (allocation, drop)), None)
                    cells.append("/".join(map(str, r["counts"])) if r else "n/a")
                lines.append(f"| {allocation} | " + " | ".join(cells) + " |")
    best = results["best_plan"]
    rec = results["recovery"]
    lines += ["", f"## Recovery ({rec['pack']}, plan {best['ranker']} / {best['allocation']})", "",
              f"Best plan: {best['criterion']}: {best['mean_chrf++']}.", "",
              "| dropped | experts per layer | no recovery | SFT on references | distillation | parent | steps (SFT / distill) |",
              "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if "pruned" not in r:
            continue
        p = results["parent"]["packs"][rec["pack"]]["mean"]["chrf++"]

        def cell(key):
            m = r[key]["mean"]
            return f"{_fmt(m['chrf++'])} / {_pct(m['error_rate'])}"

        lines.append(f"| {100 * r['drop']:g}% | {r['counts']} | {cell('pruned')} | {cell('references')} | {cell('parent')} | "
                     f"{_fmt(p)} | {r['references']['training']['step']} / {r['parent']['training']['step']} |")
    lines += ["", "Cells are chrF++ / generation-error rate, mean over the pack's directions. "
              "`pruned_equals_mask` in results.json checks that the pruned files score exactly like the mask mode."]
    extra = [r for r in rec["rows"] if "pruned" not in r]
    if extra:
        lines += ["", "Distillation seed noise: " + "; ".join(
            f"{100 * r['drop']:g}% seed {r['seed']}: {_fmt(r['parent']['mean']['chrf++'])}" for r in extra)
            + " (compare the distillation column above, seed " + str(config["seed"]) + "; another seed samples other "
            "training sentences, so the parent translates them anew, and changes the dev split and the batch order)."]
    lines += ["", "## Mask overlap (routing mass, per-language en->X masks)", "",
              "| dropped | allocation | pairwise IoU (random) | all languages IoU (random) |", "|---|---|---|---|"]
    for r in results["overlap"]:
        if "error" in r:
            lines.append(f"| n/a | | {r['error']} | |")
            continue
        pairwise = ", ".join(f"{p['a']}-{p['b']} {p['iou']:.3f} ({p['random_iou']:.3f})" for p in r["pairwise"])
        lines.append(f"| {100 * r['drop']:g}% | {r['allocation']} | {pairwise} | {r['all']['iou']:.3f} ({r['all']['random_iou']:.3f}) |")
    noise = results["noise"]
    ts, rs = noise["test_samples"], noise["random_seeds"]
    lines += ["", f"## Noise ({noise['pair']})", "",
              f"- Disjoint test samples of {ts['n_each']} sentences, {ts['setting']}: parent "
              + ", ".join(_fmt(r["parent_chrf++"]) for r in ts["rows"]) + f" (sd {_fmt(ts['sd_parent'], 2)}); pruned "
              + ", ".join(_fmt(r["pruned_chrf++"]) for r in ts["rows"]) + f" (sd {_fmt(ts['sd_pruned'], 2)}); "
              f"loss to the parent sd {_fmt(ts['sd_loss'], 2)}.",
              f"- {rs['setting']} with seeds " + ", ".join(f"{r['seed']}: {_fmt(r['chrf++'])}" for r in rs["rows"])
              + f" (sd {_fmt(rs['sd'], 2)}).",
              f"- Bootstrap: every cell in results.json carries a 95% chrF++ interval ({config['bootstrap']} resamples)"
              if config["bootstrap"] else "- Bootstrap intervals were switched off for this run.",
              "- Greedy decoding is deterministic: re-running a cell reproduces it exactly (the cache relies on it).",
              "", f"Raw results: `{out_dir / 'results.json'}`; plots in `{out_dir / 'plots'}`.", ""]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--data", type=Path, default=Path("data/harvest"))
    parser.add_argument("--results-md", type=Path, default=None,
                        help="Markdown page to write (default docs/results.md; with --quick OUT/results.md)")
    parser.add_argument("--quick", action="store_true", help="tiny grid and samples: checks the pipeline in a minute")
    parser.add_argument("--sample", type=int, default=None, help="test sentences per direction")
    parser.add_argument("--distill-minutes", type=float, default=None)
    parser.add_argument("--distill-sentences", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = QUICK if args.quick else ExperimentConfig()
    overrides = {k: v for k, v in (("sample", args.sample), ("distill_minutes", args.distill_minutes),
                                   ("distill_sentences", args.distill_sentences), ("threads", args.threads)) if v is not None}
    config = replace(config, **overrides)
    results_md = args.results_md or (args.out / "results.md" if args.quick else Path("docs/results.md"))
    try:
        experiment = Experiment(args.model, args.data, args.out, config, results_md, command=shlex.join(sys.argv))
        results = experiment.run()
    except PackagerError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    print(f"results: {args.out / 'results.json'}, page: {results_md} ({results['timings_seconds']['total'] / 60:.1f} min)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
