"""`packager plan search`: the best plan under a budget (issue 18, part 1).

A user says what they need (a file size in a format, a RAM footprint, a drop ratio, a loss in
chrF++ against the parent) and gets the best plan that meets it, plus the frontier it was
chosen from.

1. Candidates: every ranker x allocation x drop ratio of `packager.planning` (identical masks
   evaluated once). A GGUF size budget keeps only uniform plans: stock llama.cpp loads one
   expert count per model.
2. Each candidate is evaluated in mask mode (packager.masking) on a dev file, never the test
   split (records with split = "test" are refused):
   - quality: greedy translations of the dev sources, chrF++ against the references, and the
     generation-error rate (packager.quality);
   - proxy: teacher-forced on the parent's own greedy translations of the same sources, the
     mean per-token KL(parent || pruned) over the translation tokens (`kl`), or the pruned
     model's mean negative log-likelihood of those tokens (`nll`). One forward pass each, no
     decoding, so it is cheap enough to drive the refinement.
3. The proxy's Spearman rank correlation with dev chrF++ over the grid candidates is computed
   and reported (-proxy against chrF++, so +1 means the proxy orders plans as chrF++ does).
4. Choice among the candidates that meet every budget: with --max-loss the smallest plan
   whose dev chrF++ is within the loss (ties: higher chrF++); otherwise the highest dev
   chrF++ (ties: smaller, then lower proxy).
5. Refinement (formats that load per-layer counts): starting from the choice, move one expert
   slot from layer a to layer b (a drops its lowest-ranked kept expert, b takes its best-ranked
   dropped expert, by the candidate's ranker) while the proxy improves; the size does not
   change (equal-shaped layers). The refined plan is then scored on chrF++ and replaces the
   choice only if it meets the budgets and scores at least as well on dev chrF++.
6. Frontier: of every chrF++-scored plan, the ones no smaller plan beats (size ascending,
   chrF++ strictly ascending), with their error rates.

Sizes (`packager.plan_search.SizeModel`):
- `safetensors`: the pruned checkpoint's tensor bytes, exact (packager.prune.describe_prune).
- `gguf:<TYPE>` / `onnx:<QUANT>`: measured. The parent and a uniform top-k prune of it are
  exported once (cached in the work directory); a model file is affine in the kept expert
  count when MoE layers have equal shapes, so bytes = A + B x kept experts reproduces the
  tensor data exactly. Metadata holds provenance strings (paths, the plan) whose length
  varies by a few KB between exports (2.7 KB measured on the default), so the budget is checked against the
  prediction plus METADATA_ALLOWANCE bytes: a chosen plan never exceeds the budget.
  Caveat: llama.cpp's k-quant rules give attention tensors more bits in 8-expert models, so
  for k-quants a plan keeping exactly 8 experts per layer may differ from the affine model.
- RAM (`--max-ram-mb`): an estimate, the model file of the size format (the runtime maps or
  loads all of it) + an f32 KV cache for `ctx_tokens` + `ram_overhead_bytes` (the runtime's
  own baseline, measured by `packager verify` as RSS above the interpreter).

Everything evaluated is cached under the work directory (one JSON per cell, keyed by the
parent's fingerprint, the mask, the dev file's sha256 and the decoding settings), so an
interrupted search resumes where it stopped and a re-run computes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from packager.core.errors import PackagerError

logger = logging.getLogger(__name__)

SEARCH_FORMAT = "edge-packager-plan-search"
SEARCH_VERSION = 1
CELL_VERSION = 1
METADATA_ALLOWANCE = 16384
DEFAULT_RANKERS = ("routing-mass", "frequency", "reap")
DEFAULT_DROPS = (0.25, 0.5, 0.625, 0.75, 0.875)
PROXIES = ("kl", "nll")
NEW_TOKENS_PER_SOURCE_TOKEN = 2
NEW_TOKENS_SLACK = 10


class SearchError(PackagerError):
    """A search that cannot run or whose budgets no candidate meets."""


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budgets:
    size_format: str = "safetensors"        # "safetensors", "gguf:Q8_0", "onnx:int8", ...
    max_file_bytes: int | None = None
    max_ram_bytes: int | None = None
    min_drop: float | None = None           # --drop: drop at least this share of experts
    max_loss: float | None = None           # dev chrF++ below the parent
    ram_overhead_bytes: int = 0
    ctx_tokens: int = 512

    def any(self) -> bool:
        return any(v is not None for v in (self.max_file_bytes, self.max_ram_bytes, self.min_drop, self.max_loss))


@dataclass(frozen=True)
class SearchSettings:
    langs: tuple[str, ...]
    direction: str = "en-x"
    rankers: tuple[str, ...] = DEFAULT_RANKERS
    allocations: tuple[str, ...] = ("uniform", "dynamic", "inverted-dynamic")
    drops: tuple[float, ...] = DEFAULT_DROPS
    dev_n: int = 100
    batch_size: int = 32
    max_new_tokens: int = 256
    proxy: str = "kl"
    refine_steps: int = 8
    seed: int = 0
    threads: int = 1


def parse_size_budget(spec: str) -> tuple[str, int]:
    """'gguf:Q8_0=10' -> ('gguf:Q8_0', 10_000_000); 'safetensors=12.5' too. MB = 10^6 bytes."""
    fmt, sep, number = spec.rpartition("=")
    if not sep or not fmt:
        raise SearchError(f"--max-file-mb {spec!r}: write FORMAT:QUANT=MB, e.g. gguf:Q8_0=10 or onnx:int8=25")
    kind, quant = check_size_format(fmt)
    fmt = kind if quant is None else f"{kind}:{quant}"
    try:
        mb = float(number)
    except ValueError:
        raise SearchError(f"--max-file-mb {spec!r}: {number!r} is not a number of megabytes") from None
    if not mb > 0:
        raise SearchError(f"--max-file-mb {spec!r}: the size must be positive")
    return fmt, int(mb * 1_000_000)


def check_size_format(fmt: str) -> tuple[str, str | None]:
    if fmt == "safetensors":
        return fmt, None
    kind, sep, quant = fmt.partition(":")
    if kind == "gguf" and sep:
        from converters.gguf.quantize import QUANT_TYPES

        if quant.upper() in QUANT_TYPES + ("F32",):
            return kind, quant.upper()
        raise SearchError(f"size format {fmt!r}: unknown GGUF type {quant!r} (F32, {', '.join(QUANT_TYPES)})")
    if kind == "onnx" and sep:
        from converters.onnx.options import QUANT_TYPES as ONNX_QUANTS

        if quant in ONNX_QUANTS:
            return kind, quant
        raise SearchError(f"size format {fmt!r}: unknown ONNX quantization {quant!r} ({', '.join(ONNX_QUANTS)})")
    raise SearchError(f"size format {fmt!r}: use safetensors, gguf:<TYPE> (e.g. gguf:Q8_0) or onnx:<QUANT> (e.g. onnx:int8)")


# ---- small helpers -------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def canonical_keep(keep: dict[int, list[int]]) -> dict[str, list[int]]:
    return {str(layer_idx): sorted(int(e) for e in ids) for layer_idx, ids in sorted(keep.items())}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None with fewer than 3 points or no spread."""
    if len(x) != len(y):
        raise ValueError("spearman: lengths differ")
    if len(x) < 3:
        return None

    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="mergesort")
        result = np.empty(len(values))
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
                j += 1
            result[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def pareto_frontier(points: Sequence[dict], size_key: str = "size_bytes", quality_key: str = "chrf++") -> list[dict]:
    """Points no smaller-or-equal point beats: size ascending, quality strictly ascending."""
    usable = [p for p in points if p.get(quality_key) is not None and p.get(size_key) is not None]
    ordered = sorted(usable, key=lambda p: (p[size_key], -p[quality_key]))
    frontier, best = [], -math.inf
    for point in ordered:
        if point[quality_key] > best:
            if frontier and frontier[-1][size_key] == point[size_key]:
                continue
            frontier.append(point)
            best = point[quality_key]
    return frontier


# ---- sizes ---------------------------------------------------------------------------------------
@dataclass
class SizeModel:
    """Bytes of a plan's model file in one format (see the module docstring)."""

    size_format: str
    base: int                   # bytes with no routed expert (A)
    per_expert: float           # bytes per kept routed expert (B)
    allowance: int              # metadata allowance added to every prediction
    exact: bool                 # True when the prediction has no allowance (safetensors)
    references: dict = field(default_factory=dict)
    kv_bytes_per_token: int = 0

    def file_bytes(self, keep: dict[int, list[int]]) -> int:
        kept = sum(len(ids) for ids in keep.values())
        return int(round(self.base + self.per_expert * kept)) + self.allowance

    def ram_bytes(self, keep: dict[int, list[int]], budgets: Budgets) -> int:
        return self.file_bytes(keep) + self.kv_bytes_per_token * budgets.ctx_tokens + budgets.ram_overhead_bytes

    def to_dict(self) -> dict:
        return {"format": self.size_format, "base_bytes": self.base, "bytes_per_expert": self.per_expert,
                "metadata_allowance": self.allowance, "exact": self.exact, "references": self.references,
                "kv_bytes_per_token": self.kv_bytes_per_token}


def _kv_bytes_per_token(config: dict) -> int:
    heads = int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * int(config["num_hidden_layers"]) * heads * head_dim * 4


def model_file_bytes(path: Path) -> int:
    """A GGUF file, or an ONNX export directory's model graph plus its external data."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path.stat().st_size
    directory = path.parent if path.is_file() else path
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and (p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")))


def _export(kind: str, quant: str, model_dir: Path, out_dir: Path) -> Path:
    """One export of `model_dir` as `kind`/`quant` into `out_dir`; returns the model file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "gguf":
        from converters.gguf.export import export_gguf, quantized_path

        out_file = out_dir / "model.gguf"
        if quant in ("F32", "F16"):
            export_gguf(model_dir, out_file, None, dtype=quant.lower(), force=True, hash_inputs=False)
            return out_file
        export_gguf(model_dir, out_file, [quant], dtype="f16", force=True, hash_inputs=False)
        return quantized_path(out_file, quant)
    from converters.onnx.export import MODEL_FILE, export_onnx

    target = out_dir / quant
    export_onnx(model_dir, target, quant=quant, force=True, hash_inputs=False, check=False)
    return target / MODEL_FILE


def build_size_model(size_format: str, model_dir: Path, work_dir: Path, fingerprint: str, config: dict,
                     moe_layers: list[int], n_experts: int, top_k: int) -> SizeModel:
    """The size model of `size_format` for this parent (reference exports cached in work_dir)."""
    kind, quant = check_size_format(size_format)
    kv = _kv_bytes_per_token(config)
    if kind == "safetensors":
        from packager.core.plan_file import Plan
        from packager.prune import describe_prune

        full = describe_prune(model_dir, Plan(fingerprint, {i: list(range(n_experts)) for i in moe_layers}))["output_tensor_bytes"]
        low = describe_prune(model_dir, Plan(fingerprint, {i: list(range(top_k)) for i in moe_layers}))["output_tensor_bytes"]
        span = len(moe_layers) * (n_experts - top_k)
        per_expert = (full - low) / span
        return SizeModel(size_format, int(round(full - per_expert * len(moe_layers) * n_experts)), per_expert, 0, True,
                         {"parent_tensor_bytes": full, "top_k_tensor_bytes": low}, kv)
    cache = work_dir / "sizes" / f"{fingerprint[:16]}-{size_format.replace(':', '-')}.json"
    if cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("fingerprint") == fingerprint and data.get("format") == size_format:
            return SizeModel(size_format, data["base"], data["per_expert"], METADATA_ALLOWANCE, False, data["references"], kv)
    import shutil

    from packager.core.plan_file import Plan
    from packager.prune import prune_checkpoint
    from runtime.atomic import atomic_write_json

    scratch = work_dir / "sizes" / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    full_file = _export(kind, quant, model_dir, scratch / "parent")
    low_dir = prune_checkpoint(model_dir, Plan(fingerprint, {i: list(range(top_k)) for i in moe_layers},
                                               meta={"purpose": "size reference"}), scratch / "top-k-model")
    low_file = _export(kind, quant, low_dir, scratch / "top-k")
    full, low = model_file_bytes(full_file), model_file_bytes(low_file)
    span = len(moe_layers) * (n_experts - top_k)
    per_expert = (full - low) / span
    base = full - per_expert * len(moe_layers) * n_experts
    references = {"parent_bytes": full, "top_k_bytes": low, "kept_experts": [len(moe_layers) * n_experts, len(moe_layers) * top_k]}
    atomic_write_json(cache, {"fingerprint": fingerprint, "format": size_format, "base": base, "per_expert": per_expert,
                              "references": references})
    shutil.rmtree(scratch, ignore_errors=True)
    return SizeModel(size_format, base, per_expert, METADATA_ALLOWANCE, False, references, kv)


# ---- dev data ------------------------------------------------------------------------------------
@dataclass
class DevSegment:
    src: str
    ref: str


def read_dev(path: Path, slugs: Sequence[str], limit: int) -> dict[str, list[DevSegment]]:
    """The first `limit` records per direction of a JSONL dev file; a test-split record is refused."""
    found: dict[str, list[DevSegment]] = {slug: [] for slug in slugs}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SearchError(f"{path}: dev file not found") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            slug = f"{record['src_lang']}-{record['tgt_lang']}"
            src, ref = record["src"], record["tgt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SearchError(f"{path}:{number}: not a JSONL record with src_lang, tgt_lang, src, tgt ({exc})") from None
        if record.get("split") == "test":
            raise SearchError(f"{path}:{number}: a test-split record; search on a dev split, never on the test split")
        if slug in found and len(found[slug]) < limit:
            found[slug].append(DevSegment(src, ref))
    empty = [slug for slug, rows in found.items() if not rows]
    if empty:
        raise SearchError(f"{path}: no records for {', '.join(empty)}")
    return found


# ---- evaluation ------------------------------------------------------------------------------------
class Evaluator:
    """Mask-mode scores of plans on the dev set, cached one JSON file per plan and measure."""

    def __init__(self, model_dir: Path, dev_path: Path, settings: SearchSettings, work_dir: Path):
        import torch

        from packager.calibrate import load_model
        from packager.calibration_data import PromptBuilder
        from packager.core.fingerprint import file_sha256

        torch.set_num_threads(settings.threads)
        self.settings, self.work_dir = settings, work_dir
        self.loaded = load_model(model_dir)
        self.fingerprint = self.loaded.fingerprint
        self.builder = PromptBuilder(model_dir, self.loaded.tokenizer, "{source}")
        self.dev_sha = file_sha256(dev_path)
        self.slugs = _pack_slugs(settings.langs, settings.direction)
        self.dev = read_dev(dev_path, self.slugs, settings.dev_n)
        self.prompts = {slug: [self.builder.encode(slug, s.src)[0] for s in rows] for slug, rows in self.dev.items()}
        self.computed = self.reused = 0
        self.parent_ids = self._parent_translations()

    # decoding bound: the same rule as the experiment driver
    def _bound(self, longest_prompt: int) -> int:
        return min(self.settings.max_new_tokens, NEW_TOKENS_PER_SOURCE_TOKEN * longest_prompt + NEW_TOKENS_SLACK)

    def _key(self, what: str, keep: dict | None) -> dict:
        s = self.settings
        return {"v": CELL_VERSION, "what": what, "model": self.fingerprint, "keep": None if keep is None else canonical_keep(keep),
                "dev_sha256": self.dev_sha, "pairs": self.slugs, "n": s.dev_n, "batch": s.batch_size,
                "max_new_tokens": s.max_new_tokens}

    def _cached(self, key: dict, compute: Callable[[], dict]) -> dict:
        from runtime.atomic import atomic_write_json

        path = self.work_dir / "cells" / f"{_digest(key)[:40]}.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") == key:
                self.reused += 1
                return data["value"]
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "value": value})
        self.computed += 1
        return value

    def _generate(self, keep: dict | None) -> dict[str, list[list[int]]]:
        from packager.distill import greedy_generate
        from packager.masking import expert_mask

        out = {}
        for slug, prompts in self.prompts.items():
            def run(prompts=prompts):
                return greedy_generate(self.loaded.model, prompts, self.loaded.eos_id, self.loaded.pad_id,
                                       max_new_tokens=self._bound, batch_size=self.settings.batch_size)
            if keep is None:
                rows = run()
            else:
                with expert_mask(self.loaded.model, keep):
                    rows = run()
            out[slug] = [r["ids"] for r in rows]
        return out

    def _parent_translations(self) -> dict[str, list[list[int]]]:
        value = self._cached(self._key("parent-ids", None), lambda: {"ids": self._generate(None)})
        return value["ids"]

    def quality(self, keep: dict | None) -> dict:
        """chrF++, BLEU and generation-error rate of greedy translations (mean over directions)."""
        def compute():
            ids = self.parent_ids if keep is None else self._generate(keep)
            return self._score(ids)
        return self._cached(self._key("quality", keep), compute)

    def _score(self, ids: dict[str, list[list[int]]]) -> dict:
        from packager.quality import ErrorDetector, corpus_scores, error_summary, usual_length_ratio

        directions, errors_total, n_total = {}, 0, 0
        langs = sorted({lang for slug in self.slugs for lang in slug.split("-")})
        for slug, rows in ids.items():
            segments = self.dev[slug]
            hyps = [self.loaded.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
            src_lang, tgt_lang = slug.split("-")
            ratio = usual_length_ratio([s.src for s in segments], [s.ref for s in segments])
            detector = ErrorDetector(langs, {(src_lang, tgt_lang): ratio})
            errors = [detector.detect(s.src, h, src_lang, tgt_lang) for s, h in zip(segments, hyps)]
            scores = corpus_scores(hyps, [s.ref for s in segments], tgt_lang)
            rate = error_summary(errors)["rate"]
            directions[slug] = {"chrf++": scores["chrf++"], "bleu": scores["bleu"], "error_rate": rate, "n": len(segments)}
            errors_total += round(rate * len(segments))
            n_total += len(segments)
        return {"chrf++": round(float(np.mean([d["chrf++"] for d in directions.values()])), 2),
                "bleu": round(float(np.mean([d["bleu"] for d in directions.values()])), 2),
                "error_rate": round(errors_total / n_total, 4), "directions": directions}

    def proxy(self, keep: dict) -> dict:
        """Teacher-forced on the parent's translations: mean KL(parent || pruned) and pruned NLL per token."""
        return self._cached(self._key("proxy", keep), lambda: self._proxy(keep))

    def _proxy(self, keep: dict) -> dict:
        import torch

        from packager.masking import expert_mask

        model, pad = self.loaded.model, self.loaded.pad_id
        kl_sum = nll_sum = 0.0
        tokens = 0
        for slug, prompts in self.prompts.items():
            seqs = [(p, o) for p, o in zip(prompts, self.parent_ids[slug]) if o]
            for start in range(0, len(seqs), self.settings.batch_size):
                batch = seqs[start:start + self.settings.batch_size]
                longest = max(len(p) + len(o) for p, o in batch)
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                attn = torch.zeros((len(batch), longest), dtype=torch.long)
                target = torch.zeros((len(batch), longest), dtype=torch.bool)
                for row, (p, o) in enumerate(batch):
                    seq = p + o
                    ids[row, :len(seq)] = torch.tensor(seq)
                    attn[row, :len(seq)] = 1
                    target[row, len(p) - 1:len(seq) - 1] = True   # positions predicting the output tokens
                labels = torch.roll(ids, -1, dims=1)
                with torch.no_grad():
                    parent = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
                    with expert_mask(model, keep):
                        pruned = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
                p_sel, q_sel = parent[target], pruned[target]
                kl_sum += float((p_sel.exp() * (p_sel - q_sel)).sum())
                nll_sum += float(-q_sel.gather(1, labels[target].unsqueeze(1)).sum())
                tokens += int(target.sum())
        return {"kl": kl_sum / max(tokens, 1), "nll": nll_sum / max(tokens, 1), "tokens": tokens}


def _pack_slugs(langs: Sequence[str], direction: str) -> list[str]:
    slugs = []
    for lang in langs:
        if direction in ("en-x", "both"):
            slugs.append(f"en-{lang}")
        if direction in ("x-en", "both"):
            slugs.append(f"{lang}-en")
    return slugs


# ---- the search ------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    keep: dict[int, list[int]]
    ranker: str
    allocation: str
    drop: float
    meta: dict
    origin: str = "grid"
    values: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.name, "origin": self.origin, "ranker": self.ranker, "allocation": self.allocation,
                "drop": self.drop, "counts": [len(self.keep[i]) for i in sorted(self.keep)],
                "keep": canonical_keep(self.keep), **self.values}


def grid_candidates(stats, settings: SearchSettings, uniform_only: bool) -> tuple[list[Candidate], list[dict]]:
    """Every ranker x allocation x drop plan the statistics allow (duplicate masks once)."""
    from packager.planning import PlanningError, PlanSettings, plan_keep

    rankers = [r for r in settings.rankers if r != "reap" or stats_has_reap(stats)]
    allocations = [a for a in settings.allocations if not uniform_only or a == "uniform"]
    candidates, skipped, seen = [], [], set()
    for drop in settings.drops:
        for ranker in rankers:
            for allocation in allocations:
                name = f"{ranker}/{allocation}/{drop:g}"
                try:
                    keep, meta = plan_keep(stats, PlanSettings(langs=tuple(settings.langs), direction=settings.direction,
                                                               drop_ratio=drop, ranker=ranker, allocation=allocation,
                                                               seed=settings.seed))
                except PlanningError as exc:
                    skipped.append({"name": name, "reason": str(exc)})
                    continue
                digest = _digest(canonical_keep(keep))
                if digest in seen:
                    continue
                seen.add(digest)
                candidates.append(Candidate(name, keep, ranker, allocation, drop, meta))
    return candidates, skipped


def stats_has_reap(stats) -> bool:
    return bool(stats.has_reap)


def meets(values: dict, budgets: Budgets, parent_chrf: float) -> list[str]:
    """The budgets a scored candidate breaks (empty list: it meets every one)."""
    broken = []
    if budgets.max_file_bytes is not None and values["size_bytes"] > budgets.max_file_bytes:
        broken.append("max-file")
    if budgets.max_ram_bytes is not None and values["ram_bytes"] > budgets.max_ram_bytes:
        broken.append("max-ram")
    if budgets.min_drop is not None and values["drop_effective"] < budgets.min_drop - 1e-12:
        broken.append("drop")
    if budgets.max_loss is not None and (values.get("chrf++") is None or parent_chrf - values["chrf++"] > budgets.max_loss + 1e-9):
        broken.append("max-loss")
    return broken


def choose(rows: list[dict], budgets: Budgets) -> dict | None:
    feasible = [r for r in rows if not r["broken"]]
    if not feasible:
        return None
    if budgets.max_loss is not None:
        return min(feasible, key=lambda r: (r["size_bytes"], -r["chrf++"], r["proxy"]))
    return min(feasible, key=lambda r: (-r["chrf++"], r["size_bytes"], r["proxy"]))


def refine(candidate: Candidate, stats, settings: SearchSettings, evaluator: Evaluator, n_experts: int, top_k: int,
           advance: Callable[[], None] | None = None) -> tuple[Candidate, list[dict]]:
    """Greedy slot moves between layers while the proxy improves (at most settings.refine_steps moves)."""
    from packager.planning import layer_orders, layer_scores

    scores = layer_scores(stats, list(settings.langs), settings.direction, candidate.ranker, ("sequence",), settings.seed)
    orders = dict(zip(sorted(candidate.keep), layer_orders(scores, candidate.ranker)))
    keep = {i: list(ids) for i, ids in candidate.keep.items()}
    best = evaluator.proxy(keep)[settings.proxy]
    trace = [{"step": 0, "proxy": best, "counts": [len(keep[i]) for i in sorted(keep)]}]
    for step in range(1, settings.refine_steps + 1):
        moves = []
        for a in sorted(keep):
            if len(keep[a]) <= top_k:
                continue
            worst = [e for e in orders[a] if e in keep[a]][-1]
            for b in sorted(keep):
                if b == a or len(keep[b]) >= n_experts:
                    continue
                gain = next(e for e in orders[b] if e not in keep[b])
                trial = {i: list(ids) for i, ids in keep.items()}
                trial[a].remove(worst)
                trial[b] = sorted(trial[b] + [gain])
                trial[a] = sorted(trial[a])
                value = evaluator.proxy(trial)[settings.proxy]
                if advance:
                    advance()
                moves.append((value, a, b, trial))
        if not moves:
            break
        value, a, b, trial = min(moves, key=lambda m: (m[0], m[1], m[2]))
        if value >= best:
            break
        best, keep = value, trial
        trace.append({"step": step, "proxy": value, "moved": {"from_layer": a, "to_layer": b},
                      "counts": [len(keep[i]) for i in sorted(keep)]})
    refined = Candidate(candidate.name + "+refined", keep, candidate.ranker, candidate.allocation, candidate.drop,
                        dict(candidate.meta), origin="refined")
    return refined, trace


@dataclass
class SearchResult:
    chosen: dict | None
    plan: object | None
    rows: list[dict]
    frontier: list[dict]
    correlation: dict
    parent: dict
    budgets: Budgets
    size_model: SizeModel
    refinement: dict
    skipped: list[dict]
    cells: dict

    def to_json(self) -> dict:
        return {"format": SEARCH_FORMAT, "version": SEARCH_VERSION, "budgets": asdict(self.budgets),
                "size_model": self.size_model.to_dict(), "parent": self.parent, "chosen": self.chosen,
                "frontier": self.frontier, "correlation": self.correlation, "refinement": self.refinement,
                "candidates": self.rows, "skipped": self.skipped, "cells": self.cells}


def search(stats, model_dir: Path, dev_path: Path, budgets: Budgets, settings: SearchSettings, work_dir: Path,
           progress: bool = False, provenance: dict | None = None) -> SearchResult:
    """Run the search (module docstring). Raises SearchError when no candidate meets the budgets,
    after scoring everything (the result is still written by the caller through `exc.result`)."""
    from packager.core.arch import load_arch
    from packager.planning import parse_langs
    from packager.core.plan_file import Plan

    if settings.proxy not in PROXIES:
        raise SearchError(f"--proxy {settings.proxy!r}: use one of {', '.join(PROXIES)}")
    settings = SearchSettings(**{**asdict(settings), "langs": tuple(parse_langs(settings.langs))})
    work_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = load_arch(config)
    moe_layers = arch.moe_layers(config)
    n_experts, top_k = stats.n_experts, stats.top_k
    evaluator = Evaluator(model_dir, dev_path, settings, work_dir)
    if stats.meta.get("model_fingerprint") != evaluator.fingerprint:
        raise SearchError(f"statistics come from model {str(stats.meta.get('model_fingerprint'))[:16]}..., "
                          f"{model_dir} is {evaluator.fingerprint[:16]}...: calibrate this model")
    size_model = build_size_model(budgets.size_format, model_dir, work_dir, evaluator.fingerprint, config, moe_layers,
                                  n_experts, top_k)
    uniform_only = budgets.size_format.startswith("gguf")
    candidates, skipped = grid_candidates(stats, settings, uniform_only)
    if not candidates:
        raise SearchError("no candidate plan: every ranker x allocation x drop was refused (see --drops)")
    parent_quality = evaluator.quality(None)
    parent_chrf = parent_quality["chrf++"]
    total_experts = n_experts * len(moe_layers)

    def score(candidate: Candidate) -> dict:
        proxy = evaluator.proxy(candidate.keep)
        quality = evaluator.quality(candidate.keep)
        kept = sum(len(ids) for ids in candidate.keep.values())
        values = {"size_bytes": size_model.file_bytes(candidate.keep), "ram_bytes": size_model.ram_bytes(candidate.keep, budgets),
                  "drop_effective": round(1 - kept / total_experts, 6), "kept_experts": kept,
                  "proxy": proxy[settings.proxy], "kl": proxy["kl"], "nll": proxy["nll"],
                  "chrf++": quality["chrf++"], "bleu": quality["bleu"], "error_rate": quality["error_rate"],
                  "loss": round(parent_chrf - quality["chrf++"], 2), "directions": quality["directions"]}
        values["broken"] = meets(values, budgets, parent_chrf)
        candidate.values = values
        return candidate.row()

    bar = _ProgressBar(progress, len(candidates))
    rows = []
    with bar:
        for candidate in candidates:
            rows.append(score(candidate))
            bar.advance(candidate.name)
        grid_rows = list(rows)
        xs = [-r["proxy"] for r in grid_rows]
        correlation = {
            "proxy": settings.proxy, "n": len(grid_rows),
            "spearman_proxy_vs_chrf": spearman(xs, [r["chrf++"] for r in grid_rows]),
            "spearman_kl_vs_chrf": spearman([-r["kl"] for r in grid_rows], [r["chrf++"] for r in grid_rows]),
            "spearman_nll_vs_chrf": spearman([-r["nll"] for r in grid_rows], [r["chrf++"] for r in grid_rows]),
            "note": "Spearman rank correlation over the grid candidates of -proxy with dev chrF++ (+1: same order); "
                    "within_drop: the same among the candidates of one drop ratio (plans of one size)",
            "within_drop": {},
        }
        for drop in sorted({r["drop"] for r in grid_rows}):
            same = [r for r in grid_rows if r["drop"] == drop]
            correlation["within_drop"][f"{drop:g}"] = {
                "n": len(same), "spearman": spearman([-r["proxy"] for r in same], [r["chrf++"] for r in same])}
        chosen = choose(rows, budgets)
        refinement = {"ran": False}
        if chosen is not None and not uniform_only and settings.refine_steps > 0:
            start = next(c for c in candidates if c.name == chosen["name"])
            bar.extend(settings.refine_steps * len(moe_layers) * (len(moe_layers) - 1) + 1, "refine")
            refined, trace = refine(start, stats, settings, evaluator, n_experts, top_k, advance=lambda: bar.advance("refine"))
            refinement = {"ran": True, "from": start.name, "trace": trace}
            if canonical_keep(refined.keep) != canonical_keep(start.keep):
                row = score(refined)
                rows.append(row)
                bar.advance("refine")
                better = not row["broken"] and row["chrf++"] >= chosen["chrf++"]
                refinement.update(refined=row["name"], chrf_before=chosen["chrf++"], chrf_after=row["chrf++"],
                                  proxy_before=chosen["proxy"], proxy_after=row["proxy"], accepted=better)
                if better:
                    chosen = row
            else:
                refinement.update(accepted=False, note="no move improved the proxy")
    frontier = [{k: r[k] for k in ("name", "size_bytes", "chrf++", "error_rate", "proxy", "drop_effective", "counts")}
                for r in pareto_frontier(rows)]
    parent = {"fingerprint": evaluator.fingerprint, "chrf++": parent_chrf, "bleu": parent_quality["bleu"],
              "error_rate": parent_quality["error_rate"], "directions": parent_quality["directions"],
              "size_bytes": size_model.file_bytes({i: list(range(n_experts)) for i in moe_layers})}
    plan = None
    if chosen is not None:
        meta = dict(next(c for c in candidates + ([refined] if refinement.get("refined") else [])
                         if c.name == chosen["name"]).meta)
        meta.update(search={"name": chosen["name"], "size_format": budgets.size_format, "size_bytes": chosen["size_bytes"],
                            "ram_bytes": chosen["ram_bytes"], "dev_chrf++": chosen["chrf++"], "dev_error_rate": chosen["error_rate"],
                            "parent_dev_chrf++": parent_chrf, "proxy": {settings.proxy: chosen["proxy"]},
                            "budgets": asdict(budgets)},
                    drop_ratio_effective=chosen["drop_effective"], kept_experts=chosen["kept_experts"],
                    uniform_counts=len(set(chosen["counts"])) == 1)
        meta["stats_provenance"] = stats.meta.get("provenance", [])
        if provenance:
            meta["provenance"] = provenance
        plan = Plan(model_fingerprint=evaluator.fingerprint, keep={int(k): v for k, v in chosen["keep"].items()}, meta=meta)
    return SearchResult(chosen, plan, rows, frontier, correlation, parent, budgets, size_model, refinement, skipped,
                        {"computed": evaluator.computed, "reused": evaluator.reused})


def write_outputs(result: SearchResult, out_plan: Path | None, out_json: Path, plot: Path | None) -> None:
    from runtime.atomic import atomic_write_json

    atomic_write_json(out_json, result.to_json())
    if plot is not None:
        plot_frontier(result, plot)
    if result.plan is not None and out_plan is not None:
        result.plan.save(out_plan)


def plot_frontier(result: SearchResult, path: Path) -> None:
    """Size vs dev chrF++ (every candidate grey, the frontier in blue, error rates annotated)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    rows = [r for r in result.rows if r.get("chrf++") is not None]
    ax.scatter([r["size_bytes"] / 1e6 for r in rows], [r["chrf++"] for r in rows], s=14, color="#bbbbbb", label="candidates")
    front = result.frontier
    ax.plot([r["size_bytes"] / 1e6 for r in front], [r["chrf++"] for r in front], "-o", color="#1f77b4", ms=4, label="frontier")
    for r in front:
        ax.annotate(f"{r['error_rate']:.0%}", (r["size_bytes"] / 1e6, r["chrf++"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points", color="#555555")
    ax.axhline(result.parent["chrf++"], color="#2ca02c", ls="--", lw=1, label=f"parent {result.parent['chrf++']:.1f}")
    if result.chosen:
        ax.scatter([result.chosen["size_bytes"] / 1e6], [result.chosen["chrf++"]], s=60, facecolors="none",
                   edgecolors="#d62728", label="chosen")
    if result.budgets.max_file_bytes:
        ax.axvline(result.budgets.max_file_bytes / 1e6, color="#d62728", ls=":", lw=1, label="size budget")
    ax.set_xlabel(f"model file, MB ({result.budgets.size_format})")
    ax.set_ylabel("dev chrF++ (mask mode)")
    ax.set_title("plan search: size vs dev chrF++ (labels: generation-error rate)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


class _ProgressBar:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("plan search {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("", total=self.total)
            self.bar.start()
        return self

    def advance(self, label: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=label)

    def extend(self, more: int, label: str) -> None:
        if self.bar is not None:
            self.total += more
            self.bar.update(self.task, total=self.total, description=label)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
