"""From routing statistics to a plan: rank experts inside each layer, decide how many each
layer keeps, and compare masks (step 2 of the pipeline).

Scores per layer (higher = kept first; ties go to the lower expert index):
- `routing-mass`: mean over sequences of the per-sequence mean renormalised routing weight
  (span `sequence` by default; with several spans, each span's distribution weighs equally);
- `frequency`: share of the span's tokens whose top-k contains the expert;
- `reap`: mean over the tokens routed to the expert of gate weight x ||expert output||;
- `random`: a seeded permutation per layer (numpy default_rng(seed), layers in order);
- `inverted`: the exact reverse of the routing-mass order (drop the highest mass first).
A language's score is the mean over its calibrated directions (en->X and/or X->en, each
weighing equally); a multilingual pack's score is the mean of its languages' scores, so every
language weighs equally whatever its token count.

Budget: every layer of the uniform plan keeps round_half_up(n_experts x (1 - drop)) experts,
and every allocation keeps exactly n_moe_layers times that many, so uniform and dynamic plans
at the same drop ratio keep the same number of experts. The effective ratio is recorded.

Dynamic allocation: with budget B over L layers each layer keeps
top-k plus a share of B - L*top_k proportional to its Jensen-Shannon divergence (base 2,
in [0, 1]), capped at the layer's expert count (a capped layer's excess is shared again among
the others, in proportion). Shares are computed in exact rational arithmetic on the float JSD
values; the integer part is kept and the leftover units go to the largest fractional parts,
ties to the lower layer index. When every JSD is 0 the extra budget is shared equally.
Inverted-dynamic assigns the same multiset of counts in reverse JSD order: the layer with the
i-th lowest JSD (ties: lower index first) gets the count that dynamic gives to the layer with
the i-th highest JSD (ties: lower index first).

JSD of a language X in one layer (the "English reference" is routing on the English side):
- direction en-x compares X as output: the `generated`/`target` span of en->X against English
  as output, the same span of every X'->en pair in the statistics (each pair weighs equally);
- direction x-en compares X as input: the `source` span of X->en against English as input,
  the `source` span of every en->X' pair;
- direction both averages the two divergences.
Comparing the same role keeps the language difference apart from the input/output
difference. When the statistics hold no English text in that role (e.g. only en->X was
calibrated), the reference falls back to every English-side span present (the source span of
en->X); the plan's metadata says which reference each role used. A pack's JSD is the mean of
its languages' JSDs.

Group-limited routers (DeepSeek-style, `routing_groups` in the statistics): every group of a
layer keeps the same number of experts (its best ones by the ranker), enough that top-k can
still be filled from topk_group groups; allocation works in rows of one expert per group.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations
from typing import Sequence

import numpy as np

from packager.core.errors import PackagerError
from packager.core.stats import (
    MASS, MODE_SPAN, REAP, REAP_TOKENS, SELECTED, SEQUENCE, SEQUENCES, SOURCE, SPANS, TOKENS,
    RoutingStats,
)

logger = logging.getLogger(__name__)

RANKERS = ("routing-mass", "frequency", "reap", "random", "inverted")
ALLOCATIONS = ("uniform", "dynamic", "inverted-dynamic")
DIRECTIONS = ("en-x", "x-en", "both")
ENGLISH = "en"


class PlanningError(PackagerError):
    """A plan cannot be made from these statistics and settings."""


# ---- languages and pairs ---------------------------------------------------------------
def _language(code: str):
    from runtime.errors import LanguageError
    from runtime.languages import parse_language

    try:
        return parse_language(code)
    except LanguageError as exc:
        raise PlanningError(f"--langs: {exc}") from None


def parse_langs(spec: str | Sequence[str]) -> list[str]:
    """Canonical codes of a pack's non-English languages, in the given order, deduplicated."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    codes: list[str] = []
    for item in items:
        if not str(item).strip():
            raise PlanningError(f"--langs {spec!r}: empty language in the list: write e.g. 'de,fr'")
        code = _language(str(item)).code
        if code == ENGLISH:
            raise PlanningError(f"--langs {spec!r}: English is the pivot of every pack; list only the other languages (e.g. 'de,fr')")
        if code not in codes:
            codes.append(code)
    if not codes:
        raise PlanningError("--langs: give at least one language other than English, e.g. 'de'")
    return codes


def pair_slug(src: str, tgt: str) -> str:
    from runtime.languages import Pair

    return Pair(_language(src), _language(tgt)).slug


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise PlanningError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")


def language_pairs(stats: RoutingStats, lang: str, direction: str) -> list[str]:
    """The calibrated pair slugs that a language contributes for `direction`."""
    _check_direction(direction)
    wanted = []
    if direction in ("en-x", "both"):
        wanted.append(pair_slug(ENGLISH, lang))
    if direction in ("x-en", "both"):
        wanted.append(pair_slug(lang, ENGLISH))
    present = stats.pairs()
    missing = [slug for slug in wanted if slug not in present]
    if missing:
        raise PlanningError(
            f"{stats._where()}: no statistics for {', '.join(missing)} (calibrated: {', '.join(present)}): "
            f"calibrate those pairs or choose another --direction"
        )
    return wanted


# ---- scores ------------------------------------------------------------------------------
def _check_spans(stats: RoutingStats, spans: Sequence[str]) -> list[str]:
    spans = list(spans)
    if not spans or any(span not in SPANS for span in spans):
        raise PlanningError(f"spans {spans!r}: choose among {', '.join(SPANS)}")
    if SEQUENCE in spans and len(spans) > 1:
        raise PlanningError(f"spans {spans!r}: 'sequence' already holds every token; do not combine it with other spans")
    return spans


def distribution(stats: RoutingStats, pair: str, span: str) -> np.ndarray:
    """Mean routing-mass distribution of one (pair, span): [n_moe_layers, n_experts], rows sum to 1."""
    mass = stats.get(MASS, pair, span)
    sequences = stats.get(SEQUENCES, pair, span)
    if not np.all(sequences > 0):
        raise PlanningError(f"{stats._where()}: pair {pair!r} span {span!r} has no sequences")
    mean = mass / sequences
    totals = mean.sum(axis=1, keepdims=True)
    return np.divide(mean, totals, out=np.zeros_like(mean), where=totals > 0)


def pair_scores(stats: RoutingStats, pair: str, ranker: str, spans: Sequence[str]) -> np.ndarray:
    if ranker in ("routing-mass", "inverted"):
        return np.mean([distribution(stats, pair, span) for span in spans], axis=0)
    if ranker == "frequency":
        selected = sum(stats.get(SELECTED, pair, span) for span in spans)
        tokens = sum(stats.get(TOKENS, pair, span) for span in spans)
        return np.divide(selected, tokens, out=np.zeros_like(selected), where=tokens > 0)
    if ranker == "reap":
        if not stats.has_reap:
            raise PlanningError(f"{stats._where()}: has no REAP sums (calibrated without REAP): recalibrate with REAP to use --ranker reap")
        reap = sum(stats.get(REAP, pair, span) for span in spans)
        count = sum(stats.get(REAP_TOKENS, pair, span) for span in spans)
        return np.divide(reap, count, out=np.zeros_like(reap), where=count > 0)
    raise PlanningError(f"unknown ranker {ranker!r}: use one of {', '.join(RANKERS)}")


def layer_scores(stats: RoutingStats, langs: Sequence[str], direction: str, ranker: str,
                 spans: Sequence[str] = (SEQUENCE,), seed: int = 0) -> np.ndarray:
    """Scores [n_moe_layers, n_experts] of a pack: languages weigh equally, and within a
    language its directions weigh equally. `random` ignores the statistics but the seed."""
    if ranker not in RANKERS:
        raise PlanningError(f"unknown ranker {ranker!r}: use one of {', '.join(RANKERS)}")
    spans = _check_spans(stats, spans)
    per_language = [np.mean([pair_scores(stats, pair, "routing-mass" if ranker == "random" else ranker, spans)
                             for pair in language_pairs(stats, lang, direction)], axis=0)
                    for lang in langs]
    scores = np.mean(per_language, axis=0)
    if ranker == "random":
        rng = np.random.default_rng(seed)
        scores = np.stack([rng.permutation(stats.n_experts).astype(np.float64) for _ in stats.moe_layers])
    return scores


def expert_order(scores: np.ndarray) -> list[int]:
    """Experts of one layer, most important first: score descending, ties to the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    return [int(i) for i in np.lexsort((np.arange(scores.size), -scores))]


def layer_orders(scores: np.ndarray, ranker: str) -> list[list[int]]:
    orders = [expert_order(row) for row in scores]
    if ranker == "inverted":
        orders = [order[::-1] for order in orders]
    return orders


# ---- divergence ----------------------------------------------------------------------------
def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint supports)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise PlanningError("cannot compute a divergence of an empty routing distribution")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _english_side(stats: RoutingStats, role: str) -> list[tuple[str, str]]:
    out_span = MODE_SPAN[stats.meta["mode"]]
    found = []
    for slug in stats.pairs():
        src, tgt = _split_slug(slug)
        if role == "input" and src == ENGLISH and stats.has(MASS, slug, SOURCE):
            found.append((slug, SOURCE))
        if role == "output" and tgt == ENGLISH and stats.has(MASS, slug, out_span):
            found.append((slug, out_span))
    return found


def _split_slug(slug: str) -> tuple[str, str]:
    from runtime.languages import parse_pair

    pair = parse_pair(slug)
    return pair.src.code, pair.tgt.code


def english_reference(stats: RoutingStats, role: str) -> tuple[np.ndarray, str]:
    """Mean distribution of English text in `role` ("input" | "output"), and which reference
    was used ("same-role" or "any-role" when the statistics hold no English in that role)."""
    spans = _english_side(stats, role)
    used = "same-role"
    if not spans:
        spans = _english_side(stats, "input") + _english_side(stats, "output")
        used = "any-role"
    if not spans:
        raise PlanningError(f"{stats._where()}: no English-side statistics (no en->X or X->en pair): calibrate pairs with English")
    if used == "any-role":
        logger.warning("no English %s statistics: the JSD reference falls back to every English-side span", role)
    return np.mean([distribution(stats, slug, span) for slug, span in spans], axis=0), used


def language_jsd(stats: RoutingStats, lang: str, direction: str) -> tuple[np.ndarray, dict[str, str]]:
    """Per-layer JSD between language `lang` and the English reference (module docstring)."""
    _check_direction(direction)
    roles = []
    if direction in ("en-x", "both"):
        roles.append(("output", pair_slug(ENGLISH, lang), MODE_SPAN[stats.meta["mode"]]))
    if direction in ("x-en", "both"):
        roles.append(("input", pair_slug(lang, ENGLISH), SOURCE))
    per_role, used = [], {}
    for role, slug, span in roles:
        if slug not in stats.pairs():
            raise PlanningError(f"{stats._where()}: no statistics for {slug} (calibrated: {', '.join(stats.pairs())}): calibrate it or choose another --direction")
        mine = distribution(stats, slug, span)
        reference, used[role] = english_reference(stats, role)
        per_role.append([js_divergence(a, b) for a, b in zip(mine, reference)])
    return np.mean(per_role, axis=0), used


def pack_jsd(stats: RoutingStats, langs: Sequence[str], direction: str) -> tuple[np.ndarray, dict]:
    """Mean of the languages' per-layer JSDs, and the reference used per language and role."""
    values, used = [], {}
    for lang in langs:
        jsd, used[lang] = language_jsd(stats, lang, direction)
        values.append(jsd)
    return np.mean(values, axis=0), used


# ---- allocation --------------------------------------------------------------------------
def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def uniform_count(n_experts: int, drop_ratio: float, top_k: int) -> int:
    """Experts kept per layer by a uniform plan; raises PlanningError for a bad ratio."""
    if not isinstance(drop_ratio, (int, float)) or not 0.0 < float(drop_ratio) < 1.0:
        raise PlanningError(f"--drop {drop_ratio!r} is outside (0, 1): give the share of experts to drop, e.g. 0.5")
    keep_share = 1 - Fraction(str(float(drop_ratio)))
    count = _round_half_up(n_experts * keep_share)
    if count < top_k:
        limit = 1 - Fraction(top_k, n_experts)
        raise PlanningError(
            f"--drop {drop_ratio}: keeps {count} of {n_experts} experts per layer, fewer than top-k = {top_k}; "
            f"every layer must keep at least top-k, so use --drop <= {float(limit):.4g}"
        )
    return count


def dynamic_counts(jsd: Sequence[float], n_experts: Sequence[int], top_k: int, budget: int) -> list[int]:
    """Per-layer counts: top_k + a JSD-proportional share of budget - L*top_k (module docstring)."""
    n_layers = len(jsd)
    if len(n_experts) != n_layers:
        raise ValueError("jsd and n_experts differ in length")
    if any(j < 0 or not math.isfinite(j) for j in jsd):
        raise PlanningError(f"JSD values must be finite and >= 0, got {list(jsd)}")
    extra = budget - n_layers * top_k
    caps = [n - top_k for n in n_experts]
    if extra < 0 or any(c < 0 for c in caps):
        raise PlanningError(f"a budget of {budget} experts cannot keep top-k = {top_k} in each of {n_layers} layers")
    if extra > sum(caps):
        raise PlanningError(f"a budget of {budget} experts exceeds the {sum(n_experts)} experts of the model")
    weights = [Fraction(float(j)) for j in jsd]
    share: list[Fraction] = [Fraction(0)] * n_layers
    active = list(range(n_layers))
    remaining = Fraction(extra)
    while active:
        total = sum(weights[i] for i in active)
        local = {i: (weights[i] if total > 0 else Fraction(1)) for i in active}
        local_total = sum(local.values())
        proposed = {i: remaining * local[i] / local_total for i in active}
        capped = [i for i in active if proposed[i] >= caps[i]]
        if not capped:
            for i in active:
                share[i] = proposed[i]
            break
        for i in capped:
            share[i] = Fraction(caps[i])
            remaining -= caps[i]
            active.remove(i)
    counts = [math.floor(s) for s in share]
    leftover = extra - sum(counts)
    by_remainder = sorted(range(n_layers), key=lambda i: (-(share[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return [top_k + c for c in counts]


def invert_counts(counts: Sequence[int], jsd: Sequence[float]) -> list[int]:
    """The same multiset of counts in reverse JSD order (see the module docstring)."""
    high_first = sorted(range(len(jsd)), key=lambda i: (-jsd[i], i))
    low_first = sorted(range(len(jsd)), key=lambda i: (jsd[i], i))
    inverted = [0] * len(counts)
    for rank, layer_pos in enumerate(low_first):
        inverted[layer_pos] = counts[high_first[rank]]
    return inverted


def allocate(allocation: str, n_experts: Sequence[int], top_k: int, per_layer: int,
             jsd: Sequence[float] | None = None) -> list[int]:
    """Per-layer kept counts for `allocation`; the total is always len(n_experts) * per_layer."""
    if allocation not in ALLOCATIONS:
        raise PlanningError(f"unknown allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return [per_layer] * len(n_experts)
    if jsd is None:
        raise PlanningError(f"allocation {allocation!r} needs per-layer JSD values")
    counts = dynamic_counts(jsd, n_experts, top_k, per_layer * len(n_experts))
    if allocation == "inverted-dynamic":
        counts = invert_counts(counts, jsd)
        too_many = [i for i, (c, n) in enumerate(zip(counts, n_experts)) if c > n]
        if too_many:
            raise PlanningError(f"inverted-dynamic needs layers of equal expert counts (layer positions {too_many} overflow)")
    return counts


# ---- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSettings:
    """Everything `make_plan` needs besides the statistics (the CLI builds one of these)."""

    langs: tuple[str, ...]
    direction: str = "en-x"
    drop_ratio: float = 0.5
    ranker: str = "routing-mass"
    allocation: str = "uniform"
    seed: int = 0
    spans: tuple[str, ...] = (SEQUENCE,)
    uniform: bool = False  # one count for every layer (stock llama.cpp / GGUF)


def plan_keep(stats: RoutingStats, settings: PlanSettings) -> tuple[dict[int, list[int]], dict]:
    """Kept experts per decoder-layer index, and the metadata describing how."""
    langs = parse_langs(settings.langs)
    _check_direction(settings.direction)
    if settings.ranker not in RANKERS:
        raise PlanningError(f"unknown ranker {settings.ranker!r}: use one of {', '.join(RANKERS)}")
    allocation = settings.allocation
    if settings.uniform and allocation != "uniform":
        raise PlanningError(f"--uniform asks for one count per layer but --allocation is {allocation!r}: drop one of them")
    per_layer = uniform_count(stats.n_experts, settings.drop_ratio, stats.top_k)
    layers = stats.moe_layers
    scores = layer_scores(stats, langs, settings.direction, settings.ranker, settings.spans, settings.seed)
    jsd, reference = None, None
    if allocation != "uniform":
        jsd, reference = pack_jsd(stats, langs, settings.direction)
    jsd_list = None if jsd is None else [float(j) for j in jsd]
    orders = layer_orders(scores, settings.ranker)
    groups = stats.meta.get("routing_groups") or {}
    if int(groups.get("n_group", 1)) > 1:
        counts, keep_lists = _grouped_selection(stats, groups, allocation, per_layer, jsd_list, orders, settings.drop_ratio)
    else:
        counts = allocate(allocation, [stats.n_experts] * len(layers), stats.top_k, per_layer, jsd_list)
        keep_lists = [order[:count] for order, count in zip(orders, counts)]
    keep = {layer_idx: sorted(kept) for layer_idx, kept in zip(layers, keep_lists)}
    total = stats.n_experts * len(layers)
    meta = {
        "ranker": settings.ranker,
        "allocation": allocation,
        "drop_ratio": float(settings.drop_ratio),
        "drop_ratio_effective": 1 - sum(counts) / total,
        "kept_experts": sum(counts),
        "total_experts": total,
        "languages": langs,
        "direction": settings.direction,
        "pairs": [p for lang in langs for p in language_pairs(stats, lang, settings.direction)],
        "spans": list(settings.spans),
        "uniform_counts": len(set(counts)) == 1,
        "top_k": stats.top_k,
        "n_experts": stats.n_experts,
        "family": stats.meta.get("family"),
    }
    if settings.ranker == "random":
        meta["seed"] = settings.seed
    if int(groups.get("n_group", 1)) > 1:
        meta["routing_groups"] = dict(groups)
    if jsd is not None:
        meta["jsd"] = {str(layer_idx): float(j) for layer_idx, j in zip(layers, jsd)}
        meta["jsd_reference"] = reference
    return keep, meta


def _grouped_selection(stats: RoutingStats, groups: dict, allocation: str, per_layer: int,
                       jsd: list[float] | None, orders: list[list[int]], drop_ratio: float):
    """Group-limited routing (DeepSeek-style): every group of a layer keeps the same number of
    experts, at least max(ceil(top_k / topk_group), group_score_top), so the pruned router picks
    the same groups; allocation then moves whole rows of one expert per group."""
    n_group = int(groups["n_group"])
    topk_group = int(groups.get("topk_group") or n_group)
    min_per_group = max(math.ceil(stats.top_k / topk_group), int(groups.get("group_score_top", 1)))
    if stats.n_experts % n_group:
        raise PlanningError(f"{stats._where()}: {stats.n_experts} experts do not split into {n_group} equal routing groups")
    group_size = stats.n_experts // n_group
    if per_layer % n_group:
        raise PlanningError(
            f"--drop {drop_ratio}: keeps {per_layer} experts per layer, not a multiple of the {n_group} routing groups "
            f"(group-limited routing keeps the same number in every group): choose a drop ratio that keeps a multiple of {n_group}"
        )
    if per_layer // n_group < min_per_group:
        raise PlanningError(
            f"--drop {drop_ratio}: keeps {per_layer // n_group} expert(s) per routing group; group-limited routing "
            f"(top-k {stats.top_k}, topk_group {topk_group}) needs at least {min_per_group} per group: use a smaller --drop"
        )
    units = allocate(allocation, [group_size] * len(orders), min_per_group, per_layer // n_group, jsd)
    keep_lists = []
    for order, per_group in zip(orders, units):
        kept = []
        for group in range(n_group):
            members = [e for e in order if e // group_size == group]
            kept += members[:per_group]
        keep_lists.append(kept)
    return [u * n_group for u in units], keep_lists


def make_plan(stats: RoutingStats, settings: PlanSettings, provenance: dict | None = None):
    """A `packager.core.plan_file.Plan` for `stats` (the parent's fingerprint travels with it)."""
    from packager.core.plan_file import Plan

    keep, meta = plan_keep(stats, settings)
    meta["stats_provenance"] = stats.meta.get("provenance", [])
    if provenance:
        meta["provenance"] = provenance
    return Plan(model_fingerprint=stats.meta["model_fingerprint"], keep=keep, meta=meta)


# ---- overlap -----------------------------------------------------------------------------
def _pairs_of(keep: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(layer_idx, expert_idx) for layer_idx, kept in keep.items() for expert_idx in kept}


def global_iou(keeps: Sequence[dict[int, list[int]]]) -> float:
    """|intersection| / |union| of the retained (layer, expert) pairs of every mask."""
    sets = [_pairs_of(k) for k in keeps]
    union = set().union(*sets)
    inter = set.intersection(*sets)
    return len(inter) / len(union) if union else 1.0


def _hypergeometric(n: int, a: int, b: int) -> np.ndarray:
    """P(|A ∩ B| = x) for random subsets of sizes a and b of n items, x = 0..min(a, b)."""
    total = math.comb(n, b)
    return np.array([math.comb(a, x) * math.comb(n - a, b - x) / total for x in range(min(a, b) + 1)])


def expected_pairwise_iou(sizes_a: Sequence[int], sizes_b: Sequence[int], n_experts: Sequence[int]) -> float:
    """Exact E[global IoU] of two independent uniformly random masks with these per-layer sizes
    (the intersection is a sum of independent hypergeometric variables; convolved in float64)."""
    dist = np.array([1.0])
    for a, b, n in zip(sizes_a, sizes_b, n_experts):
        dist = np.convolve(dist, _hypergeometric(n, a, b))
    both = sum(sizes_a) + sum(sizes_b)
    x = np.arange(dist.size)
    return float(np.sum(dist * x / (both - x)))


def sampled_iou(sizes: Sequence[Sequence[int]], n_experts: Sequence[int], samples: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of the global IoU of len(sizes) random masks (seeded sampling)."""
    rng = np.random.default_rng(seed)
    inter = np.zeros(samples)
    union = np.zeros(samples)
    for layer_pos, n in enumerate(n_experts):
        hits = np.zeros((samples, n), dtype=np.int32)
        for mask_sizes in sizes:
            ranks = np.argsort(rng.random((samples, n)), axis=1)
            hits += ranks < mask_sizes[layer_pos]
        inter += np.sum(hits == len(sizes), axis=1)
        union += np.sum(hits > 0, axis=1)
    values = inter / union
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(samples))


@dataclass
class OverlapReport:
    names: list[str]
    pairwise: list[dict]  # {a, b, iou, random_iou}
    all_iou: float
    all_random_iou: float
    all_random_method: str
    pairwise_random_method: str = "exact (hypergeometric convolution, float64)"

    def to_dict(self) -> dict:
        return {
            "plans": self.names,
            "pairwise": self.pairwise,
            "pairwise_random_method": self.pairwise_random_method,
            "all": {"iou": self.all_iou, "random_iou": self.all_random_iou, "random_method": self.all_random_method},
        }


def compare_keeps(keeps: Sequence[dict[int, list[int]]], names: Sequence[str], n_experts: dict[int, int],
                  samples: int = 4000, seed: int = 0) -> OverlapReport:
    """Global IoU pairwise and all together, next to the IoU expected of random masks with the
    same per-layer sizes (pairwise exact; all-together exact for two masks, else sampled)."""
    if len(keeps) < 2:
        raise PlanningError("compare needs at least two plans")
    layer_sets = [sorted(k) for k in keeps]
    if any(layers != layer_sets[0] for layers in layer_sets):
        raise PlanningError(f"plans {', '.join(names)} cover different MoE layers: compare plans of the same model")
    layers = layer_sets[0]
    sizes = [[len(k[layer_idx]) for layer_idx in layers] for k in keeps]
    ns = [n_experts[layer_idx] for layer_idx in layers]
    pairwise = []
    for (i, a), (j, b) in combinations(enumerate(keeps), 2):
        pairwise.append({"a": names[i], "b": names[j], "iou": global_iou([a, b]),
                         "random_iou": expected_pairwise_iou(sizes[i], sizes[j], ns)})
    if len(keeps) == 2:
        all_random, method = pairwise[0]["random_iou"], "exact (hypergeometric convolution, float64)"
    else:
        all_random, stderr = sampled_iou(sizes, ns, samples, seed)
        method = f"seeded sampling: {samples} draws, seed {seed}, standard error {stderr:.2g}"
    return OverlapReport(list(names), pairwise, global_iou(keeps), all_random, method)
