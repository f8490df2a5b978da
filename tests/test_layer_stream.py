"""Layer-streamed calibration (packager.core.layer_stream): a layer built from the shards equals the
one transformers loads, streamed statistics equal whole-model statistics for every family and
layout, hidden states spill to disk under a small budget, the parent's own greedy output,
teacher-forced, routes exactly as during generation, and bad input gives one error line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import build_tiny, write_fused_layout, write_mxfp4_layout

from packager.calibrate import CalibrationError, CalibrationSettings, calibrate, load_model
from packager.core.errors import CheckpointError
from packager.core.execution import StreamingError, choose_execution
from packager.core.layer_stream import StreamedModel

TEMPLATE = "{{ bos_token }}<|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>"
SENTENCES = [("the house is red", "das Haus ist rot"), ("open file", "Datei neu"), ("the red window", "Fenster rot"),
             ("save the file", "Datei auf"), ("the dog is blue", "Hund ist blau")]


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": s, "tgt": t}) + "\n" for s, t in SENTENCES))
    return path


# family, builder overrides, on-disk rewrite: dense middle layers, shared experts, fused and
# MXFP4 expert layouts, DeepSeek group routing (the tiny config has n_group 2, topk_group 1)
CASES = {
    "qwen3_moe-dense-middle": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1]), None),
    "qwen3_moe-fused": ("qwen3_moe", {}, write_fused_layout),
    "qwen2_moe-shared": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1]), None),
    "olmoe": ("olmoe", {}, None),
    "mixtral": ("mixtral", {}, None),
    "gpt_oss-mxfp4": ("gpt_oss", {}, write_mxfp4_layout),
    "gpt_oss-fused": ("gpt_oss", {}, None),
    "deepseek_v3-groups": ("deepseek_v3", {}, None),
}


def _model(case: str, root: Path) -> Path:
    family, overrides, rewrite = CASES[case]
    model_dir = build_tiny(family, root / case, seed=5, max_shard_size="20KB", **overrides)
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    if rewrite is not None:
        rewrite(model_dir)
    return model_dir


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_statistics_equal_whole_model_statistics(case, tmp_path):
    model_dir = _model(case, tmp_path)
    data = _data(tmp_path / "d.jsonl")
    settings = dict(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=2, max_sentences=None)
    whole = calibrate(model_dir, [data], CalibrationSettings(**settings, execution="whole", device="cpu"))
    streamed = calibrate(model_dir, [data], CalibrationSettings(**settings, execution="streamed", device="cpu"))
    # experts read one at a time (groups of one expert): every row still computed exactly once
    one_by_one = calibrate(model_dir, [data], CalibrationSettings(**settings, execution="streamed", expert_group_bytes=1))
    assert one_by_one.meta["provenance"][0]["streaming"]["experts_per_group"] == 1
    assert streamed.meta["provenance"][0]["streaming"]["experts_per_group"] == 8
    assert sorted(streamed.tensors) == sorted(whole.tensors) == sorted(one_by_one.tensors)
    assert any(name.startswith("reap/") for name in whole.tensors)
    for name in whole.tensors:
        np.testing.assert_allclose(streamed.tensors[name], whole.tensors[name], rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(one_by_one.tensors[name], whole.tensors[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert whole.meta["provenance"][0]["execution"]["mode"] == "whole"
    run = streamed.meta["provenance"][0]
    assert run["execution"]["mode"] == "streamed" and run["execution"]["reason"] == "--execution streamed"
    assert run["streaming"]["layers"] == whole.meta["moe_layers"][-1] + 1 and not run["streaming"]["spilled"]
    assert {k: v for k, v in whole.meta.items() if k != "provenance"} == {k: v for k, v in streamed.meta.items() if k != "provenance"}


@pytest.mark.parametrize("case", ["qwen3_moe-dense-middle", "mixtral", "gpt_oss-mxfp4", "deepseek_v3-groups", "qwen2_moe-shared"])
def test_a_streamed_layer_is_bit_identical_to_the_loaded_one(case, tmp_path):
    from packager.core.pruned_model import load_pruned

    model_dir = _model(case, tmp_path)
    reference = load_pruned(model_dir, dtype=torch.float32).state_dict()
    streamed = StreamedModel(model_dir, "float32")
    try:
        for layer_idx, layer in enumerate(streamed.layers):
            streamed.load_layer(layer_idx)
            prefix = streamed._layer_paths[layer_idx] + "."
            got = {prefix + k: v for k, v in layer.state_dict().items()}
            assert got.keys() == {k for k in reference if k.startswith(prefix)}
            for name, tensor in got.items():
                torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    finally:
        streamed.close()


def test_hidden_states_spill_to_disk_under_a_small_budget(tmp_path):
    model_dir = _model("qwen3_moe-dense-middle", tmp_path)
    data = _data(tmp_path / "d.jsonl")
    spill = tmp_path / "spill"
    spill.mkdir()
    base = dict(pairs=("en-de",), teacher_forced=True, batch_size=2, max_sentences=None)
    in_memory = calibrate(model_dir, [data], CalibrationSettings(**base, execution="streamed"))
    spilled = calibrate(model_dir, [data], CalibrationSettings(**base, execution="streamed", max_activation_mb=0,
                                                                spill_dir=str(spill)))
    assert spilled.meta["provenance"][0]["streaming"]["spilled"] is True
    assert spilled.meta["provenance"][0]["streaming"]["hidden_bytes"] > 0
    assert not in_memory.meta["provenance"][0]["streaming"]["spilled"]
    for name in in_memory.tensors:
        np.testing.assert_array_equal(spilled.tensors[name], in_memory.tensors[name], err_msg=name)
    assert list(spill.iterdir()) == []  # the spill file is gone


def test_not_enough_disk_for_the_spill_is_one_error_naming_path_and_bytes(tmp_path, monkeypatch):
    from collections import namedtuple

    import packager.core.layer_stream as layer_stream

    model_dir = _model("olmoe", tmp_path)
    data = _data(tmp_path / "d.jsonl")
    spill = tmp_path / "spill"
    spill.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(layer_stream.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    settings = CalibrationSettings(pairs=("en-de",), teacher_forced=True, execution="streamed", max_activation_mb=0,
                                   spill_dir=str(spill))
    with pytest.raises(StreamingError, match=rf"^{spill}: not enough disk for the hidden-state spill: needs \d+ bytes, 4096 free"):
        calibrate(model_dir, [data], settings)
    assert list(spill.iterdir()) == []


def test_layer_tensors_missing_from_the_shards_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = build_tiny("qwen3_moe", tmp_path / "m", seed=5)
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 1: tensor\(s\) 'model.layers.1.self_attn.k_proj.weight' missing"):
        StreamedModel(model_dir, "float32")
    # an index that claims a tensor a shard does not hold
    sharded = build_tiny("qwen3_moe", tmp_path / "s", seed=5, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.gate.weight"] = sorted(set(index["weight_map"].values()))[-1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    data = _data(tmp_path / "d.jsonl")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate.weight' is listed in .* but that shard does not hold it"):
        calibrate(sharded, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, execution="streamed"))


def test_automatic_choice_follows_free_memory(tmp_path, monkeypatch):
    import packager.core.execution as execution

    model_dir = _model("olmoe", tmp_path)
    monkeypatch.setattr(execution, "available_memory", lambda device: 64 * 1024**3)
    roomy = choose_execution(model_dir, "float32", "cpu")
    assert roomy.mode == "whole" and "fit cpu" in roomy.reason
    monkeypatch.setattr(execution, "available_memory", lambda device: 10 * 1024**2)
    tight = choose_execution(model_dir, "float32", "cpu")
    assert tight.mode == "streamed" and "streaming one layer" in tight.reason
    assert 0 < tight.largest_layer_bytes < tight.weight_bytes
    assert choose_execution(model_dir, "float32", "cpu", forced="whole").mode == "whole"
    # the choice lands in the statistics' provenance
    stats = calibrate(model_dir, [_data(tmp_path / "d.jsonl")], CalibrationSettings(pairs=("en-de",), teacher_forced=True))
    assert stats.meta["provenance"][0]["execution"]["mode"] == "streamed"
    if not torch.cuda.is_available():
        with pytest.raises(StreamingError, match="--device cuda: torch sees no CUDA device"):
            choose_execution(model_dir, "float32", "cuda")


def test_weight_bytes_count_mxfp4_as_dequantised_values(tmp_path):
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.execution import weight_bytes

    plain = build_tiny("gpt_oss", tmp_path / "plain", seed=5)
    packed = write_mxfp4_layout(build_tiny("gpt_oss", tmp_path / "packed", seed=5))
    sizes = []
    for model_dir in (plain, packed):
        with CheckpointReader(model_dir) as reader:
            sizes.append(weight_bytes(reader, load_arch(reader.config), reader.config, "float32"))
    assert sizes[0] == sizes[1]


# ---- generated spans --------------------------------------------------------------------------------
def test_teacher_forcing_the_greedy_output_routes_as_generation_did(tmp_path):
    """Router outputs recorded during token-by-token generation (KV cache) equal, position by
    position, those of one teacher-forced pass over prompt + generated tokens. (Generation never
    feeds its last token back, so that one position exists only in the teacher-forced pass.)"""
    model_dir = _model("qwen3_moe-dense-middle", tmp_path)
    loaded = load_model(model_dir)
    model = loaded.model
    routers = [model.get_submodule(loaded.arch.router_module(i)) for i in loaded.arch.moe_layers(loaded.config)]
    seen: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda m, a, out, pos=pos: seen[pos].append(out[0].reshape(-1, out[0].shape[-1]).clone()))
             for pos, r in enumerate(routers)]
    prompt = loaded.tokenizer("<|bos|><|en|><|de|>the house is red<|sep|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=loaded.eos_id,
                             pad_token_id=loaded.pad_id, temperature=None, top_p=None, top_k=None)
        generated = out[0, len(prompt):].tolist()
        assert len(generated) >= 2
        during = [torch.cat(steps) for steps in seen]
        for pos in range(len(seen)):
            seen[pos].clear()
        model.model(input_ids=out, use_cache=False)
        forced = [torch.cat(steps) for steps in seen]
    for h in hooks:
        h.remove()
    for pos in range(len(routers)):
        n = during[pos].shape[0]
        assert n == out.shape[1] - 1
        torch.testing.assert_close(forced[pos][:n], during[pos], rtol=1e-5, atol=1e-5)
        assert torch.equal(forced[pos][:n].topk(2).indices, during[pos].topk(2).indices)


def test_streamed_generation_uses_a_gguf_of_the_parent_and_the_cache(tmp_path, monkeypatch):
    from test_gguf import build_model

    from converters.gguf.export import export_gguf

    import packager.calibrate as calibrate_module

    model_dir = write_fused_layout(build_model("qwen3_moe", tmp_path / "parent"))
    data = _data(tmp_path / "d.jsonl")
    gguf = tmp_path / "parent.gguf"
    export_gguf(model_dir, gguf, dtype="f32")
    base = dict(pairs=("en-de",), max_new_tokens=6, batch_size=1, max_sentences=None)
    whole = calibrate(model_dir, [data], CalibrationSettings(**base, execution="whole"))
    with pytest.raises(CalibrationError, match="streamed calibration cannot generate token by token: pass --generator"):
        calibrate(model_dir, [data], CalibrationSettings(**base, execution="streamed"))
    cache = tmp_path / "cache"
    settings = CalibrationSettings(**base, execution="streamed", generator=str(gguf), cache_dir=str(cache))
    streamed = calibrate(model_dir, [data], settings)
    assert streamed.meta["provenance"][0]["translations"]["generator"] == "llama.cpp:parent.gguf"
    for name in whole.tensors:
        np.testing.assert_allclose(streamed.tensors[name], whole.tensors[name], rtol=1e-6, atol=1e-9, err_msg=name)
    # a GGUF of another model is refused
    other = build_model("qwen3_moe", tmp_path / "other", seed=11)
    export_gguf(other, tmp_path / "other.gguf", dtype="f32")
    with pytest.raises(CalibrationError, match=r"--generator .*other.gguf: a GGUF of another model"):
        calibrate(model_dir, [data], CalibrationSettings(**base, execution="streamed", generator=str(tmp_path / "other.gguf")))
    # a re-run takes the translations from the cache and never starts llama.cpp
    monkeypatch.setattr(calibrate_module, "gguf_generate_outputs", lambda *a, **k: pytest.fail("translated again"))
    again = calibrate(model_dir, [data], settings)
    assert again.meta["provenance"][0]["translations"]["cached"] is True
    for name in whole.tensors:
        np.testing.assert_array_equal(again.tensors[name], streamed.tensors[name])

def test_cli_streamed_calibration_reports_the_execution(tmp_path):
    import subprocess
    import sys

    model_dir = _model("olmoe", tmp_path)
    data = _data(tmp_path / "d.jsonl")
    exe = Path(sys.executable).with_name("packager")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(exe), "calibrate", str(model_dir), "--data", str(data), "--pairs", "en-de", "--teacher-forced",
                             "--execution", "streamed", "--device", "cpu", "--out", str(tmp_path / "s.st")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "(teacher-forced, streamed; en-de 5 sentences" in result.stdout
    bad = subprocess.run([str(exe), "calibrate", str(model_dir), "--data", str(data), "--pairs", "en-de", "--teacher-forced",
                          "--device", "tpu", "--out", str(tmp_path / "t.st")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device 'tpu': use cpu, cuda, cuda:N or auto" in lines[0]
    assert not (tmp_path / "t.st").exists()
    shutil.rmtree(tmp_path / "calibration-cache", ignore_errors=True)


def test_expert_rows_in_small_chunks_give_the_same_statistics(tmp_path, monkeypatch):
    import packager.core.layer_stream as layer_stream

    model_dir = _model("qwen2_moe-shared", tmp_path)
    data = _data(tmp_path / "d.jsonl")
    settings = CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=2, max_sentences=None, execution="streamed",
                                   expert_group_bytes=1)
    whole = calibrate(model_dir, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=2,
                                                             max_sentences=None, execution="whole"))
    monkeypatch.setattr(layer_stream, "EXPERT_ROW_CHUNK", 3)
    chunked = calibrate(model_dir, [data], settings)
    for name in whole.tensors:
        np.testing.assert_allclose(chunked.tensors[name], whole.tensors[name], rtol=1e-6, atol=1e-9, err_msg=name)
