"""Planning: rankers, budgets, dynamic allocation, JSD, pack weighting and mask overlap, on
hand-made statistics with hand-computed expectations."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from packager.planning import (
    PlanningError, PlanSettings, allocate, compare_keeps, dynamic_counts, expected_pairwise_iou,
    global_iou, invert_counts, js_divergence, language_jsd, layer_scores, parse_langs, plan_keep,
    uniform_count,
)
from packager.core.stats import empty_stats

LAYERS = [0, 1, 2]


def hand_stats(entries: dict, n_experts: int = 4, top_k: int = 1, mode: str = "teacher-forced", reap=None):
    """entries: (pair, span) -> (per-sequence mean distributions [L, E], number of sequences)."""
    stats = empty_stats({"model_fingerprint": "a" * 64, "family": "qwen3_moe", "moe_layers": LAYERS,
                         "n_experts": n_experts, "top_k": top_k, "mode": mode, "prompt_template": "{source}",
                         "chat_template_sha256": None, "max_new_tokens": None, "reap": reap is not None})
    for (pair, span), (dist, n_seq) in entries.items():
        dist = np.asarray(dist, dtype=np.float64)
        if dist.ndim == 1:
            dist = np.tile(dist, (len(LAYERS), 1))
        stats.add("mass", pair, span, dist * n_seq)
        stats.add("sequences", pair, span, np.full(dist.shape, float(n_seq)))
        stats.add("selected", pair, span, dist * 10 * n_seq)
        stats.add("tokens", pair, span, np.full(dist.shape, 10.0 * n_seq))
        if reap is not None:
            reap_sum, reap_count = reap[(pair, span)]
            stats.add("reap", pair, span, reap_sum)
            stats.add("reap_tokens", pair, span, reap_count)
    return stats


# ---- budget -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts,drop,expected", [(16, 0.5, 8), (16, 0.6875, 5), (16, 0.3, 11), (10, 0.25, 8), (32, 0.875, 4)])
def test_uniform_count_rounds_half_up(n_experts, drop, expected):
    assert uniform_count(n_experts, drop, top_k=2) == expected


@pytest.mark.parametrize("drop", [0, 1, 1.0, -0.1, 1.5])
def test_drop_outside_open_interval_is_refused(drop):
    with pytest.raises(PlanningError, match=r"--drop .* is outside \(0, 1\)"):
        uniform_count(16, drop, top_k=2)


def test_budget_below_top_k_is_refused():
    with pytest.raises(PlanningError, match=r"keeps 1 of 16 experts per layer, fewer than top-k = 2.*--drop <= 0.875"):
        uniform_count(16, 0.95, top_k=2)


# ---- dynamic allocation ---------------------------------------------------------------------
def test_dynamic_counts_hand_example():
    # extra = 11 - 3*2 = 5; shares 2.5, 0.625, 1.875 -> floors 2, 0, 1; 2 leftover units go to
    # the largest fractions 0.875 (layer 2) and 0.625 (layer 1).
    assert dynamic_counts([0.5, 0.125, 0.375], [8, 8, 8], top_k=2, budget=11) == [4, 3, 4]


def test_dynamic_counts_ties_go_to_the_lower_layer():
    # shares 0.5, 1, 0.5 -> one leftover unit, tie between layers 0 and 2 -> layer 0
    assert dynamic_counts([0.25, 0.5, 0.25], [8, 8, 8], top_k=2, budget=8) == [3, 3, 2]


def test_dynamic_counts_cap_and_redistribute():
    # layer 0 wants 2.7 extra but only 2 fit; the remaining unit is shared 0.5/0.5 -> tie -> layer 1
    assert dynamic_counts([0.9, 0.05, 0.05], [4, 4, 4], top_k=2, budget=9) == [4, 3, 2]


def test_dynamic_counts_zero_divergence_is_uniform():
    assert dynamic_counts([0.0, 0.0, 0.0, 0.0], [8] * 4, top_k=2, budget=20) == [5, 5, 5, 5]


def test_dynamic_counts_budget_exact_and_monotone_in_jsd():
    rng = np.random.default_rng(0)
    for _ in range(50):
        jsd = rng.random(6).tolist()
        counts = dynamic_counts(jsd, [16] * 6, top_k=2, budget=48)
        assert sum(counts) == 48 and min(counts) >= 2 and max(counts) <= 16
        for i, j in itertools.permutations(range(6), 2):
            if jsd[i] > jsd[j]:
                assert counts[i] >= counts[j]


def test_inverted_dynamic_is_the_reverse_assignment():
    jsd = [0.5, 0.125, 0.375]
    counts = dynamic_counts(jsd, [8, 8, 8], top_k=2, budget=11)
    # JSD high->low: layers 0, 2, 1 get 4, 4, 3; low->high: layers 1, 2, 0 get 4, 4, 3
    assert invert_counts(counts, jsd) == [3, 4, 4]
    rng = np.random.default_rng(1)
    for _ in range(20):
        jsd = rng.random(5).tolist()
        counts = dynamic_counts(jsd, [16] * 5, top_k=4, budget=40)
        inverted = invert_counts(counts, jsd)
        high = sorted(range(5), key=lambda i: (-jsd[i], i))
        low = sorted(range(5), key=lambda i: (jsd[i], i))
        assert [inverted[i] for i in low] == [counts[i] for i in high]
        assert sorted(inverted) == sorted(counts)


def test_allocate_keeps_the_budget_for_every_allocation():
    jsd = [0.3, 0.1, 0.6]
    for allocation in ("uniform", "dynamic", "inverted-dynamic"):
        counts = allocate(allocation, [8, 8, 8], top_k=2, per_layer=4, jsd=jsd)
        assert sum(counts) == 12
    assert allocate("dynamic", [8, 8, 8], 2, 4, jsd) == [4, 3, 5]
    assert allocate("inverted-dynamic", [8, 8, 8], 2, 4, jsd) == [4, 5, 3]


# ---- divergence -------------------------------------------------------------------------------
def test_js_divergence_hand_values():
    assert js_divergence([0.25, 0.75], [0.25, 0.75]) == 0.0
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0, abs=1e-15)
    # m = (0.75, 0.25); 0.5*log2(4/3) + 0.5*(0.5*log2(2/3) + 0.5*log2(2))
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected, rel=1e-12)
    assert js_divergence([2, 0], [1, 1]) == pytest.approx(expected, rel=1e-12)  # unnormalised input


def _role_stats():
    english_in = [0.5, 0.5, 0.0, 0.0]
    english_out = [0.0, 0.5, 0.5, 0.0]
    german = np.array([[0.5, 0.5, 0.0, 0.0],   # layer 0: German output routes like English input...
                       [0.0, 0.5, 0.5, 0.0],   # layer 1: ...like English output (JSD 0)
                       [0.0, 0.0, 0.0, 1.0]])  # layer 2: disjoint (JSD 1)
    return hand_stats({
        ("en-de", "source"): (english_in, 2), ("en-de", "target"): (german, 2),
        ("de-en", "source"): (np.full((3, 4), 0.25), 3), ("de-en", "target"): (english_out, 3),
        ("en-de", "sequence"): ([0.4, 0.3, 0.2, 0.1], 2), ("de-en", "sequence"): ([0.1, 0.2, 0.3, 0.4], 3),
    })


def test_jsd_compares_the_same_role_when_english_output_exists():
    jsd, used = language_jsd(_role_stats(), "de", "en-x")
    assert used == {"output": "same-role"}
    assert jsd[1] == 0.0 and jsd[2] == pytest.approx(1.0)
    assert jsd[0] == pytest.approx(js_divergence([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]))


def test_jsd_falls_back_to_any_english_span_and_says_so():
    stats = _role_stats()
    for name in [n for n in stats.tensors if "/de-en/" in n]:
        del stats.tensors[name]
    jsd, used = language_jsd(stats, "de", "en-x")
    assert used == {"output": "any-role"}
    assert jsd[0] == 0.0  # now compared with English *input* [0.5, 0.5, 0, 0]


def test_jsd_both_directions_is_the_mean_of_roles():
    stats = _role_stats()
    both, used = language_jsd(stats, "de", "both")
    out, _ = language_jsd(stats, "de", "en-x")
    inp, _ = language_jsd(stats, "de", "x-en")
    assert used == {"output": "same-role", "input": "same-role"}
    np.testing.assert_allclose(both, (out + inp) / 2, rtol=1e-15)


# ---- rankers and plans --------------------------------------------------------------------------
def test_rankers_and_inverted_is_exact_reverse():
    stats = _role_stats()
    scores = layer_scores(stats, ["de"], "en-x", "routing-mass")
    np.testing.assert_allclose(scores[0], [0.4, 0.3, 0.2, 0.1])
    settings = dict(langs=("de",), direction="en-x", allocation="uniform")
    keep, meta = plan_keep(stats, PlanSettings(drop_ratio=0.5, ranker="routing-mass", **settings))
    assert keep == {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    assert meta["kept_experts"] == 6 and meta["drop_ratio_effective"] == 0.5 and meta["uniform_counts"]
    inverted, _ = plan_keep(stats, PlanSettings(drop_ratio=0.5, ranker="inverted", **settings))
    assert inverted == {0: [2, 3], 1: [2, 3], 2: [2, 3]}
    # 75% drop inverted keeps the one expert that 25% drop routing-mass drops last
    one, _ = plan_keep(stats, PlanSettings(drop_ratio=0.75, ranker="inverted", **settings))
    three, _ = plan_keep(stats, PlanSettings(drop_ratio=0.25, ranker="routing-mass", **settings))
    for layer_idx in LAYERS:
        assert set(one[layer_idx]) | set(three[layer_idx]) == {0, 1, 2, 3}
        assert not set(one[layer_idx]) & set(three[layer_idx])


def test_frequency_and_reap_rankers_use_their_own_signal():
    dist = [0.4, 0.3, 0.2, 0.1]
    reap_sum = np.tile([1.0, 8.0, 9.0, 0.0], (3, 1))
    reap_count = np.tile([1.0, 2.0, 1.0, 0.0], (3, 1))  # means 1, 4, 9, 0
    stats = hand_stats({("en-de", "sequence"): (dist, 2)}, reap={("en-de", "sequence"): (reap_sum, reap_count)})
    np.testing.assert_allclose(layer_scores(stats, ["de"], "en-x", "frequency")[0], dist)
    np.testing.assert_allclose(layer_scores(stats, ["de"], "en-x", "reap")[0], [1, 4, 9, 0])
    keep, _ = plan_keep(stats, PlanSettings(langs=("de",), ranker="reap", drop_ratio=0.5))
    assert keep[0] == [1, 2]


def test_reap_ranker_without_reap_sums_is_one_error():
    stats = hand_stats({("en-de", "sequence"): ([0.4, 0.3, 0.2, 0.1], 2)})
    with pytest.raises(PlanningError, match="no REAP sums"):
        plan_keep(stats, PlanSettings(langs=("de",), ranker="reap"))


def test_random_ranker_is_seeded():
    stats = _role_stats()
    a, meta = plan_keep(stats, PlanSettings(langs=("de",), ranker="random", seed=7))
    b, _ = plan_keep(stats, PlanSettings(langs=("de",), ranker="random", seed=7))
    assert a == b and meta["seed"] == 7
    others = {tuple(tuple(v) for v in plan_keep(stats, PlanSettings(langs=("de",), ranker="random", seed=s))[0].values())
              for s in range(8)}
    assert len(others) > 1
    rng = np.random.default_rng(7)
    expected = {layer_idx: sorted(np.argsort(-rng.permutation(4), kind="stable")[:2].tolist()) for layer_idx in LAYERS}
    assert a == expected


def test_pack_languages_weigh_equally_not_by_sequences():
    stats = hand_stats({
        ("en-de", "sequence"): ([0.6, 0.4, 0.0, 0.0], 1),
        ("en-fr", "sequence"): ([0.0, 0.5, 0.5, 0.0], 100),  # 100x the data
    })
    scores = layer_scores(stats, ["de", "fr"], "en-x", "routing-mass")
    np.testing.assert_allclose(scores[0], [0.3, 0.45, 0.25, 0.0])
    keep, meta = plan_keep(stats, PlanSettings(langs=("de", "fr"), drop_ratio=0.5))
    assert keep[0] == [0, 1]  # pooled by sequences it would be [1, 2]
    assert meta["pairs"] == ["en-de", "en-fr"]


def test_dynamic_plan_gives_more_experts_to_higher_jsd_layers():
    flat = [0.125] * 8
    falling = [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]
    stats = hand_stats({
        ("en-de", "source"): (flat, 4), ("de-en", "target"): (flat, 4), ("de-en", "source"): (flat, 4),
        ("en-de", "target"): ([flat, falling, [1.0] + [0.0] * 7], 4),
        ("en-de", "sequence"): (falling, 4), ("de-en", "sequence"): (falling, 4),
    }, n_experts=8, top_k=2)
    keep, meta = plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="dynamic"))
    counts = [len(keep[i]) for i in LAYERS]
    assert sum(counts) == 12 and min(counts) >= 2
    assert keep[0] == [0, 1]  # highest mass first: experts 0 and 1
    jsd = [meta["jsd"][str(i)] for i in LAYERS]
    assert jsd[0] == 0.0 < jsd[1] < jsd[2]
    assert counts[0] == 2 and counts[0] < counts[1] <= counts[2]
    assert counts == dynamic_counts(jsd, [8, 8, 8], 2, 12)
    inv, _ = plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.5, allocation="inverted-dynamic"))
    assert [len(inv[i]) for i in LAYERS] == invert_counts(counts, jsd)
    assert not meta["uniform_counts"]
    with pytest.raises(PlanningError, match="--uniform asks for one count per layer"):
        plan_keep(stats, PlanSettings(langs=("de",), allocation="dynamic", uniform=True))
    gguf, gmeta = plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.5, uniform=True))
    assert {len(v) for v in gguf.values()} == {4} and gmeta["uniform_counts"]


def test_bad_languages_and_missing_pairs_are_clear_errors():
    stats = _role_stats()
    with pytest.raises(PlanningError, match="--langs: unknown language 'xx'"):
        parse_langs("de,xx")
    with pytest.raises(PlanningError, match="English is the pivot"):
        parse_langs("en,de")
    assert parse_langs("deu,zh-CN,de") == ["de", "zh"]
    with pytest.raises(PlanningError, match="no statistics for en-fr .*calibrated: de-en, en-de"):
        plan_keep(stats, PlanSettings(langs=("fr",)))
    with pytest.raises(PlanningError, match="unknown ranker 'mass'"):
        plan_keep(stats, PlanSettings(langs=("de",), ranker="mass"))
    with pytest.raises(PlanningError, match="unknown direction 'de-en'"):
        plan_keep(stats, PlanSettings(langs=("de",), direction="de-en"))


# ---- overlap ------------------------------------------------------------------------------------
def test_global_iou_hand_example():
    a = {0: [0, 1], 1: [0, 1]}
    b = {0: [1, 2], 1: [0, 1]}
    c = {0: [1, 3], 1: [1, 2]}
    assert global_iou([a, b]) == pytest.approx(3 / 5)
    assert global_iou([a, b, c]) == pytest.approx(2 / 7)  # common: (0,1), (1,1); union: 7 pairs


def test_expected_random_iou_is_exact():
    # per layer X ~ Hypergeometric(4, 2, 2) = [1, 4, 1]/6; two layers -> [1, 8, 18, 8, 1]/36;
    # E[S / (8 - S)] = (8/7 + 18/3 + 24/5 + 1) / 36 = 151/420
    assert expected_pairwise_iou([2, 2], [2, 2], [4, 4]) == pytest.approx(151 / 420, rel=1e-12)


def _brute_force_expected(sizes, n):
    layer_choices = [[list(itertools.combinations(range(n), s[layer])) for s in sizes] for layer in range(len(sizes[0]))]
    total, count = 0.0, 0
    per_layer = [list(itertools.product(*choices)) for choices in layer_choices]
    for combo in itertools.product(*per_layer):
        inter = sum(len(set.intersection(*map(set, masks))) for masks in combo)
        union = sum(len(set().union(*map(set, masks))) for masks in combo)
        total += inter / union
        count += 1
    return total / count


def test_compare_reports_pairwise_exact_and_all_sampled():
    a = {0: [0, 1], 1: [0, 1]}
    b = {0: [1, 2], 1: [0, 1]}
    c = {0: [1, 3], 1: [1, 2]}
    report = compare_keeps([a, b, c], ["a", "b", "c"], {0: 4, 1: 4}, samples=4000, seed=0)
    assert report.pairwise[0] == {"a": "a", "b": "b", "iou": pytest.approx(0.6), "random_iou": pytest.approx(151 / 420)}
    assert report.all_iou == pytest.approx(2 / 7)
    exact = _brute_force_expected([[2, 2], [2, 2], [2, 2]], 4)
    stderr = float(report.all_random_method.split("standard error ")[1])
    assert abs(report.all_random_iou - exact) < 4 * stderr
    assert report.all_random_method.startswith("seeded sampling: 4000 draws, seed 0")
    two = compare_keeps([a, b], ["a", "b"], {0: 4, 1: 4})
    assert two.all_random_iou == pytest.approx(151 / 420) and two.all_random_method.startswith("exact")
    with pytest.raises(PlanningError, match="cover different MoE layers"):
        compare_keeps([a, {0: [0, 1]}], ["a", "x"], {0: 4, 1: 4})


def test_group_limited_routing_keeps_the_same_count_per_group():
    # 8 experts in 2 groups of 4, top-2 from 1 group, group score = sum of the top 2 -> >= 2 per group
    stats = hand_stats({("en-de", "sequence"): ([0.3, 0.25, 0.2, 0.15, 0.05, 0.03, 0.01, 0.01], 2)}, n_experts=8, top_k=2)
    stats.meta["routing_groups"] = {"n_group": 2, "topk_group": 1, "group_score_top": 2}
    keep, meta = plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.5))
    assert keep == {i: [0, 1, 4, 5] for i in LAYERS}  # best two of each group, not the top four overall
    assert meta["routing_groups"]["n_group"] == 2
    with pytest.raises(PlanningError, match="needs at least 2 per group"):
        plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.75))
    with pytest.raises(PlanningError, match="not a multiple of the 2 routing groups"):
        plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.375))
