"""STATS file format: round trip, exact merge, and one clear error per bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from packager.core.stats import (
    FORMAT, METADATA_KEY, RoutingStats, StatsError, empty_stats, merge_stats, tensor_name,
)

L, E = 3, 4


def meta(**overrides) -> dict:
    base = {"model_fingerprint": "f" * 64, "family": "qwen3_moe", "moe_layers": [0, 2, 3], "n_experts": E,
            "top_k": 2, "mode": "teacher-forced", "prompt_template": "{source}", "chat_template_sha256": "c" * 64,
            "max_new_tokens": None, "reap": True}
    base.update(overrides)
    return base


def filled(seed: int, pairs=("en-de",), spans=("prompt", "source", "target", "sequence"), **meta_overrides) -> RoutingStats:
    rng = np.random.default_rng(seed)
    stats = empty_stats(meta(**meta_overrides))
    stats.meta["provenance"] = [{"run": seed}]
    for pair in pairs:
        for span in spans:
            for signal in ("mass", "sequences", "selected", "tokens", "reap", "reap_tokens"):
                stats.add(signal, pair, span, rng.integers(0, 50, size=(L, E)).astype(np.float64) + rng.random((L, E)))
    return stats


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    stats = filled(1)
    path = stats.save(tmp_path / "s.safetensors")
    loaded = RoutingStats.load(path)
    assert loaded.meta == stats.meta
    assert sorted(loaded.tensors) == sorted(stats.tensors)
    for name, value in stats.tensors.items():
        assert loaded.tensors[name].dtype == np.float64
        np.testing.assert_array_equal(loaded.tensors[name], value)
    assert loaded.pairs() == ["en-de"]
    assert loaded.spans() == ["prompt", "source", "target", "sequence"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left behind


def test_merge_is_the_sum_and_keeps_pairs_of_either_part():
    a = filled(1, pairs=("en-de", "de-en"))
    b = filled(2, pairs=("en-de", "en-fr"))
    merged = merge_stats([a, b])
    assert merged.pairs() == ["de-en", "en-de", "en-fr"]
    name = tensor_name("mass", "en-de", "source")
    np.testing.assert_array_equal(merged.tensors[name], a.tensors[name] + b.tensors[name])
    name_fr = tensor_name("reap", "en-fr", "target")
    np.testing.assert_array_equal(merged.tensors[name_fr], b.tensors[name_fr])
    name_de = tensor_name("tokens", "de-en", "prompt")
    np.testing.assert_array_equal(merged.tensors[name_de], a.tensors[name_de])
    assert merged.meta["provenance"] == [{"run": 1}, {"run": 2}]
    # the parts are untouched
    assert "en-fr" not in a.pairs()


def test_merge_is_associative_up_to_summation_order():
    parts = [filled(seed) for seed in (3, 4, 5)]
    left = merge_stats([merge_stats(parts[:2]), parts[2]])
    right = merge_stats([parts[0], merge_stats(parts[1:])])
    for name in left.tensors:
        np.testing.assert_allclose(left.tensors[name], right.tensors[name], rtol=1e-15, atol=0)


def test_merge_refuses_stats_of_another_model():
    other = filled(2, model_fingerprint="0" * 64)
    with pytest.raises(StatsError, match="different models .*model_fingerprint"):
        merge_stats([filled(1), other])


def test_merge_refuses_different_calibration_settings():
    with pytest.raises(StatsError, match="setting 'prompt_template' differs"):
        merge_stats([filled(1), filled(2, prompt_template="Translate: {source}")])


def test_generated_span_is_refused_in_a_teacher_forced_file(tmp_path):
    stats = filled(1, spans=("source", "generated"))
    with pytest.raises(StatsError, match="does not belong in a teacher-forced file"):
        stats.save(tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_named(tmp_path):
    with pytest.raises(StatsError, match=r"nope\.safetensors: no such statistics file"):
        RoutingStats.load(tmp_path / "nope.safetensors")


def test_garbage_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(StatsError, match="bad.safetensors: not a readable safetensors statistics file"):
        RoutingStats.load(path)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros((2, 2))}, str(path))
    with pytest.raises(StatsError, match="without 'packager_stats' metadata"):
        RoutingStats.load(path)


def _write_raw(path, tensors, meta_dict):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta_dict)})


def test_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    full = {"format": FORMAT, **meta(reap=False)}
    tensors = {tensor_name(s, "en-de", "source"): np.zeros((L, E)) for s in ("mass", "sequences", "selected", "tokens")}
    tensors[tensor_name("mass", "en-de", "source")] = np.zeros((L, E + 1))
    _write_raw(path, tensors, full)
    with pytest.raises(StatsError, match=r"'mass/en-de/source' is float64 \(3, 5\), expected float64 \(3, 4\)"):
        RoutingStats.load(path)


def test_incomplete_signal_group_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    full = {"format": FORMAT, **meta(reap=False)}
    tensors = {tensor_name(s, "en-de", "source"): np.zeros((L, E)) for s in ("mass", "sequences", "selected")}
    _write_raw(path, tensors, full)
    with pytest.raises(StatsError, match="span 'source' has signals .* expected .*tokens"):
        RoutingStats.load(path)


def test_wrong_format_version_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    tensors = {tensor_name(s, "en-de", "source"): np.zeros((L, E)) for s in ("mass", "sequences", "selected", "tokens")}
    _write_raw(path, tensors, {"format": "packager-stats/0", **meta(reap=False)})
    with pytest.raises(StatsError, match="format 'packager-stats/0' is not 'packager-stats/1'"):
        RoutingStats.load(path)


def test_get_names_the_missing_pair():
    with pytest.raises(StatsError, match="no 'mass' statistics for pair 'en-ja'.*pairs present: en-de"):
        filled(1).get("mass", "en-ja", "source")
