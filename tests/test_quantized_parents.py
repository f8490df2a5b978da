"""Quantized parents as users hold them (issue 22): FP8 block-scaled, GPTQ (act-order too), AWQ
and compressed-tensors pack-quantized checkpoints, written here from tiny fp32 models in the
tensor naming of published checkpoints.

- every companion tensor (scales, zeros, group indices, packed shapes) follows its expert
  through pruning; tagged scales prove it;
- pruned == parent with the dropped experts masked, on dequantised weights (bit for bit) and
  on logits (fp32, 1e-5), for uniform and non-uniform plans;
- calibrating a quantized parent equals calibrating its dequantised copy (streamed, no
  transformers quantizer); `export gguf` dequantises exactly (F32 equals the dequantised copy's);
- bad input gets one error line and nothing is written."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from packager_cli import run_cli
from tiny_models import build_tiny

from packager import load_pruned
from packager.core.arch import PER_LAYER_COUNTS_KEY, load_arch
from packager.core.checkpoint import CheckpointReader
from packager.core.errors import CheckpointError
from packager.core.fingerprint import model_fingerprint
from packager.masking import expert_mask
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint
from packager.core.quant_formats import FP8_TABLES, logical_tensors, read_float32, write_dequantized

TOLERANCE = 1e-5
TEMPLATE = "{{ bos_token }}<|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>"


# ------------------------------------------------------------------------ writing quantized layouts
def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    return tensors


def _save(model_dir: Path, tensors: dict, quantization_config: dict) -> Path:
    for path in model_dir.glob("*.safetensors"):
        path.unlink()
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def _quantizable(model_dir: Path, tensors: dict) -> list[str]:
    """Linear weights inside decoder layers except routers (published FP8/GPTQ checkpoints keep
    routers, norms, embeddings and the LM head unquantized)."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    routers = {n for layer_idx in arch.moe_layers(config) for n in arch.router_tensor_names(layer_idx)}
    return [n for n, t in tensors.items() if n.startswith("model.layers.") and n.endswith(".weight") and t.ndim == 2
            and "norm" not in n and "shared_expert_gate" not in n and n not in routers]


def write_fp8(model_dir: Path, block=(16, 16), keep_unquantized=()) -> Path:
    """FP8 e4m3 weights [out, in] + F32 `weight_scale_inv` per block (ceil grid) as DeepSeek-V3
    and Qwen3-FP8 publish them; modules in `keep_unquantized` stay fp32 (modules_to_not_convert)."""
    tensors = _load(model_dir)
    for name in _quantizable(model_dir, tensors):
        if name[: -len(".weight")] in keep_unquantized:
            continue
        weight = tensors.pop(name).float()
        out, n_in = weight.shape
        grid = (math.ceil(out / block[0]), math.ceil(n_in / block[1]))
        padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
        padded[:out, :n_in] = weight
        amax = padded.reshape(grid[0], block[0], grid[1], block[1]).abs().amax(dim=(1, 3)).clamp(min=1e-12)
        scale = (amax / 448.0).float()
        full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :n_in]
        tensors[name] = (weight / full).to(torch.float8_e4m3fn)
        tensors[name[: -len("weight")] + "weight_scale_inv"] = scale
    config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block),
              "modules_to_not_convert": ["lm_head", *keep_unquantized]}
    return _save(model_dir, tensors, config)


def _int_quantize(weight: torch.Tensor, bits: int, group: int, g_idx: torch.Tensor):
    """Asymmetric per-group quantization along the input dimension: q [out, in], zeros and
    scales [groups, out] (scales stored as fp16 and used as stored)."""
    out, n_in = weight.shape
    groups = int(g_idx.max()) + 1
    levels = (1 << bits) - 1
    scales = torch.empty(groups, out)
    zeros = torch.empty(groups, out, dtype=torch.int32)
    for g in range(groups):
        cols = weight[:, g_idx == g]
        low, high = cols.min(dim=1).values.clamp(max=0), cols.max(dim=1).values.clamp(min=0)
        scales[g] = ((high - low) / levels).clamp(min=1e-6).half().float()
        zeros[g] = torch.round(-low / scales[g]).clamp(0, levels).int()
    q = torch.round(weight / scales[g_idx].T + zeros[g_idx].T).clamp(0, levels).int()
    return q, zeros, scales


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed into int32 along `dim`, low bits first."""
    per_word = 32 // bits
    values = values.to(torch.int64).movedim(dim, 0)
    values = values.reshape(values.shape[0] // per_word, per_word, *values.shape[1:])
    words = torch.zeros(values.shape[0], *values.shape[2:], dtype=torch.int64)
    for k in range(per_word):
        words |= values[:, k] << (bits * k)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def write_gptq(model_dir: Path, bits: int = 4, group: int = 16, act_order: bool = False, fmt: str = "gptq") -> Path:
    """AutoGPTQ / GPTQModel layout: qweight [in*bits/32, out], qzeros [groups, out*bits/32]
    (zero - 1 for checkpoint_format gptq), scales fp16 [groups, out], g_idx [in]."""
    tensors = _load(model_dir)
    gen = torch.Generator().manual_seed(3)
    for name in _quantizable(model_dir, tensors):
        weight = tensors.pop(name).float()
        n_in = weight.shape[1]
        g_idx = torch.arange(n_in) // group
        if act_order:  # columns quantized in a permuted order: groups are scattered
            g_idx = g_idx[torch.randperm(n_in, generator=gen)]
        q, zeros, scales = _int_quantize(weight, bits, group, g_idx)
        module = name[: -len(".weight")]
        tensors[f"{module}.qweight"] = _pack(q.T, bits, dim=0)
        tensors[f"{module}.qzeros"] = _pack(zeros - (1 if fmt == "gptq" else 0), bits, dim=1)
        tensors[f"{module}.scales"] = scales.half()
        tensors[f"{module}.g_idx"] = g_idx.int()
    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
              "checkpoint_format": fmt}
    return _save(model_dir, tensors, config)


_AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing along the output dimension: word c nibble k = column 8c + order[k]."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // 8, 8)
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for k, column in enumerate(_AWQ_PACK_ORDER):
        words |= grouped[:, :, column] << (4 * k)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def write_awq(model_dir: Path, group: int = 16) -> Path:
    """AutoAWQ GEMM layout: qweight [in, out/8], qzeros [in/group, out/8], scales fp16 [in/group, out]."""
    tensors = _load(model_dir)
    for name in _quantizable(model_dir, tensors):
        weight = tensors.pop(name).float()
        g_idx = torch.arange(weight.shape[1]) // group
        q, zeros, scales = _int_quantize(weight, 4, group, g_idx)
        module = name[: -len(".weight")]
        tensors[f"{module}.qweight"] = _awq_pack(q.T)
        tensors[f"{module}.qzeros"] = _awq_pack(zeros)
        tensors[f"{module}.scales"] = scales.half()
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return _save(model_dir, tensors, config)


def write_compressed_tensors(model_dir: Path, bits: int = 4, group: int = 16) -> Path:
    """llm-compressor pack-quantized W4A16: weight_packed [out, in*bits/32] (int values stored
    with an offset of 2^(bits-1)), weight_scale [out, in/group], weight_shape [2]."""
    tensors = _load(model_dir)
    half = 1 << (bits - 1)
    for name in _quantizable(model_dir, tensors):
        weight = tensors.pop(name).float()
        out, n_in = weight.shape
        grouped = weight.reshape(out, n_in // group, group)
        scale = (grouped.abs().amax(dim=2) / (half - 1)).clamp(min=1e-6).to(torch.bfloat16)
        q = torch.round(grouped / scale.float().unsqueeze(2)).clamp(-half, half - 1).reshape(out, n_in).int()
        module = name[: -len(".weight")]
        tensors[f"{module}.weight_packed"] = _pack((q + half).T, bits, dim=0).T.contiguous()
        tensors[f"{module}.weight_scale"] = scale
        tensors[f"{module}.weight_shape"] = torch.tensor([out, n_in], dtype=torch.int64)
    config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}},
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    return _save(model_dir, tensors, config)


def write_compressed_tensors_fp8(model_dir: Path) -> Path:
    """llm-compressor FP8 W8A16, float-quantized, channel strategy: `weight` F8_E4M3 [out, in] +
    `weight_scale` F32 [out, 1]."""
    tensors = _load(model_dir)
    for name in _quantizable(model_dir, tensors):
        weight = tensors.pop(name).float()
        scale = (weight.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
        tensors[name] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[name[: -len("weight")] + "weight_scale"] = scale
    config = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None}}},
        "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"],
    }
    return _save(model_dir, tensors, config)


LAYOUTS = {
    "qwen3_moe-fp8": ("qwen3_moe", lambda d: write_fp8(d, (16, 16), ("model.layers.0.mlp.experts.5.down_proj",))),
    "deepseek_v3-fp8-partial-blocks": ("deepseek_v3", lambda d: write_fp8(d, (16, 16))),  # kv_a_proj has 24 rows
    "mixtral-fp8": ("mixtral", lambda d: write_fp8(d, (8, 16))),
    "qwen3_moe-gptq": ("qwen3_moe", lambda d: write_gptq(d)),
    "qwen3_moe-gptq-act-order-v2": ("qwen3_moe", lambda d: write_gptq(d, act_order=True, fmt="gptq_v2")),
    "qwen3_moe-gptq-int8": ("qwen3_moe", lambda d: write_gptq(d, bits=8)),
    "qwen2_moe-awq": ("qwen2_moe", lambda d: write_awq(d)),
    "olmoe-compressed-tensors": ("olmoe", lambda d: write_compressed_tensors(d)),
    "qwen3_moe-compressed-tensors-int8": ("qwen3_moe", lambda d: write_compressed_tensors(d, bits=8)),
    "mixtral-compressed-tensors-fp8-channel": ("mixtral", write_compressed_tensors_fp8),
}


# AWQ needs the group size to divide every input dimension (the tiny shared expert is 24 wide)
OVERRIDES = {"qwen2_moe-awq": dict(shared_expert_intermediate_size=32)}


def _build(case: str, root: Path, seed: int = 0) -> Path:
    family, write = LAYOUTS[case]
    model_dir = build_tiny(family, root / case, seed=seed, **OVERRIDES.get(case, {}))
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    return write(model_dir)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    built: dict = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = _build(case, tmp_path_factory.mktemp("quantized"))
        return built[case]

    return get


def _keep(arch, config, allocation: str) -> dict[int, list[int]]:
    if allocation == "uniform":
        keeps = ([1, 3, 4, 6], [0, 2, 5, 7])
    elif arch.routing_kind == "sigmoid_group":  # equal per group of 4, >= 2 per group
        keeps = ([0, 1, 2, 4, 5, 6], [0, 3, 4, 7])
    else:
        keeps = ([0, 1, 2, 5, 6, 7], [2, 5])
    return {layer_idx: keeps[i % 2] for i, layer_idx in enumerate(arch.moe_layers(config))}


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _raw(reader: CheckpointReader, name: str) -> bytes:
    return reader.read_bytes(name)


# ------------------------------------------------------------------------ the layouts are what they claim
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_dequantised_weights_are_within_half_a_step_of_the_originals(case, tmp_path):
    """The dequantiser reads each layout as the writer above packed it: every weight is within
    the quantization error of the fp32 weight it was made from (a wrong nibble order is not)."""
    family, _ = LAYOUTS[case]
    original = build_tiny(family, tmp_path / "fp32", **OVERRIDES.get(case, {}))
    quantized = _build(case, tmp_path)
    reference = _load(original)
    with CheckpointReader(quantized) as reader:
        linears = {n: q for n, q in logical_tensors(reader).items() if q is not None}
        assert linears, "nothing was quantized"
        for name, linear in linears.items():
            values = read_float32(reader, name)
            expected = reference[name].numpy()
            assert values.shape == expected.shape, name
            step = np.abs(expected).max() / (127 if "int8" in case else 15 if "fp8" in case else 7)
            error = np.abs(values - expected).max()
            assert error <= step, (name, error, step)


def test_fp8_table_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(FP8_TABLES["F8_E4M3"], expected)
    expected = codes.view(torch.float8_e5m2).float().numpy()
    np.testing.assert_array_equal(FP8_TABLES["F8_E5M2"], expected)


# ------------------------------------------------------------------------ pruning
def test_fp8_scales_follow_their_experts(tmp_path):
    """Each expert's weight_scale_inv is tagged with (layer, expert, projection); after pruning
    kept expert j carries the tag of the parent expert it came from, and no other scale exists."""
    parent = _build("qwen3_moe-fp8", tmp_path)
    tensors = _load(parent)
    config = _config(parent)
    arch = load_arch(config)
    roles = {"gate": 1, "up": 2, "down": 3}
    for layer_idx in arch.moe_layers(config):
        for expert_idx in range(8):
            for role, code in roles.items():
                name = arch.expert_part_name(layer_idx, expert_idx, role, "weight_scale_inv")
                if name in tensors:
                    tensors[name] = torch.full_like(tensors[name], 1000 * layer_idx + 10 * expert_idx + code)
    save_file(tensors, str(parent / "model.safetensors"), metadata={"format": "pt"})
    keep = _keep(arch, config, "nonuniform")
    out = prune_checkpoint(parent, Plan(model_fingerprint(parent), keep, {}), tmp_path / "pruned")
    pruned = _load(out)
    for layer_idx, kept in keep.items():
        for new_idx, old_idx in enumerate(kept):
            for role, code in roles.items():
                name = arch.expert_part_name(layer_idx, new_idx, role, "weight_scale_inv")
                if layer_idx == 0 and old_idx == 5 and role == "down":  # left unquantized in the parent
                    assert name not in pruned
                    assert pruned[arch.expert_part_name(layer_idx, new_idx, role)].dtype == torch.float32
                    continue
                assert torch.all(pruned[name] == 1000 * layer_idx + 10 * old_idx + code), name
        scales = [n for n in pruned if n.startswith(f"model.layers.{layer_idx}.mlp.experts.") and n.endswith("_scale_inv")]
        assert len(scales) == 3 * len(kept) - (1 if layer_idx == 0 and 5 in kept else 0)
    # modules_to_not_convert names the unquantized expert by its new number
    qc = _config(out)["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.experts.3.down_proj"]
    assert {k: v for k, v in qc.items() if k != "modules_to_not_convert"} == \
        {k: v for k, v in config["quantization_config"].items() if k != "modules_to_not_convert"}


@pytest.mark.parametrize("case", list(LAYOUTS))
@pytest.mark.parametrize("allocation", ["uniform", "nonuniform"])
def test_pruned_equals_masked_parent(parents, tmp_path, case, allocation):
    parent_dir = parents(case)
    config = _config(parent_dir)
    arch = load_arch(config)
    keep = _keep(arch, config, allocation)
    out = prune_checkpoint(parent_dir, Plan(model_fingerprint(parent_dir), keep, {"allocation": allocation}), tmp_path / "p")
    out_config = _config(out)
    assert out_config["quantization_config"]["quant_method"] == config["quantization_config"]["quant_method"]
    assert (PER_LAYER_COUNTS_KEY in out_config) == (allocation == "nonuniform")

    # every tensor of a kept expert is bit-identical to the parent's, dequantised weights too
    with CheckpointReader(parent_dir) as parent, CheckpointReader(out) as pruned:
        suffixes = parent.quant.suffixes()
        parent_names, pruned_names = set(parent.names()), set(pruned.names())
        for layer_idx, kept in keep.items():
            for new_idx, old_idx in enumerate(kept):
                for role in arch.expert_tensor_names(layer_idx, 0):
                    for suffix in suffixes:
                        old = arch.expert_part_name(layer_idx, old_idx, role, suffix)
                        new = arch.expert_part_name(layer_idx, new_idx, role, suffix)
                        assert (old in parent_names) == (new in pruned_names), (old, new)
                        if old in parent_names:
                            assert _raw(parent, old) == _raw(pruned, new), (old, new)
                    old, new = (arch.expert_part_name(layer_idx, i, role) for i in (old_idx, new_idx))
                    np.testing.assert_array_equal(read_float32(pruned, new), read_float32(parent, old))
            # nothing of a dropped expert survives under a number past the kept count
            scope = arch.expert_scope(layer_idx)
            numbers = {int(n[len(scope):].split(".")[0]) for n in pruned_names if n.startswith(scope)}
            assert numbers == set(range(len(kept)))

    # logits: the pruned model equals the parent with the dropped experts masked
    parent_model = load_pruned(parent_dir, dtype=torch.float32).eval()
    pruned_model = load_pruned(out, dtype=torch.float32).eval()
    x = torch.randint(8, 60, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        unmasked = parent_model(x).logits
        with expert_mask(parent_model, keep):
            masked = parent_model(x).logits
        got = pruned_model(x).logits
    assert (got - masked).abs().max().item() <= TOLERANCE
    assert (masked - unmasked).abs().max().item() > 1e-2  # the comparison can fail


# ------------------------------------------------------------------------ calibration and export
def _data(path: Path) -> Path:
    pairs = [("the house is red", "das Haus ist rot"), ("open file", "Datei neu"), ("the red window", "Fenster rot"),
             ("save the file", "Datei auf"), ("the dog is blue", "Hund ist blau")]
    path.write_text("".join(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": s, "tgt": t}) + "\n" for s, t in pairs))
    return path


@pytest.mark.parametrize("case", ["qwen3_moe-fp8", "deepseek_v3-fp8-partial-blocks", "qwen3_moe-gptq-act-order-v2",
                                  "qwen2_moe-awq", "olmoe-compressed-tensors"])
def test_calibrating_a_quantized_parent_equals_its_dequantised_copy(parents, tmp_path, case):
    from packager.calibrate import CalibrationSettings, calibrate

    parent = parents(case)
    plain = write_dequantized(parent, tmp_path / "plain")
    assert "quantization_config" not in _config(plain)
    assert model_fingerprint(plain) == model_fingerprint(parent)
    data = _data(tmp_path / "d.jsonl")
    settings = dict(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=2, max_sentences=None, device="cpu")
    ours = calibrate(parent, [data], CalibrationSettings(**settings))  # auto: a quantized parent streams
    run = ours.meta["provenance"][0]["execution"]
    assert run["mode"] == "streamed" and "dequantised on the fly" in run["reason"]
    for execution in ("whole", "streamed"):
        reference = calibrate(plain, [data], CalibrationSettings(**settings, execution=execution))
        assert sorted(ours.tensors) == sorted(reference.tensors)
        for name in reference.tensors:
            np.testing.assert_allclose(ours.tensors[name], reference.tensors[name], rtol=1e-5, atol=1e-9, err_msg=name)
    with pytest.raises(Exception, match="runs streamed"):
        calibrate(parent, [data], CalibrationSettings(**settings, execution="whole"))


def _build_for_gguf(case: str, root: Path) -> Path:
    """The layout with a byte-level BPE vocabulary, which llama.cpp needs."""
    from test_gguf import VOCAB, write_bpe_tokenizer

    family, write = LAYOUTS[case]
    model_dir = build_tiny(family, root / case, vocab_size=VOCAB, **OVERRIDES.get(case, {}))
    write_bpe_tokenizer(model_dir)
    return write(model_dir)


@pytest.mark.parametrize("case", ["qwen3_moe-fp8", "qwen3_moe-gptq", "qwen2_moe-awq", "qwen3_moe-compressed-tensors-int8"])
def test_gguf_export_dequantises_exactly(tmp_path, case):
    from gguf import GGUFReader

    from converters.gguf.export import export_gguf

    parent = _build_for_gguf(case, tmp_path)
    config = _config(parent)
    arch = load_arch(config)
    keep = _keep(arch, config, "uniform")
    pruned = prune_checkpoint(parent, Plan(model_fingerprint(parent), keep, {}), tmp_path / "pruned")
    for name, model_dir in (("parent", parent), ("pruned", pruned)):
        ours = export_gguf(model_dir, tmp_path / f"{name}.gguf", dtype="f32")
        reference = export_gguf(write_dequantized(model_dir, tmp_path / f"{name}-plain"), tmp_path / f"{name}-plain.gguf",
                                dtype="f32")
        a = {t.name: np.array(t.data) for t in GGUFReader(str(ours)).tensors}
        b = {t.name: np.array(t.data) for t in GGUFReader(str(reference)).tensors}
        assert a.keys() == b.keys()
        for tensor_name in a:
            np.testing.assert_array_equal(a[tensor_name], b[tensor_name], err_msg=tensor_name)


# ------------------------------------------------------------------------ bad input
def _corrupt_unknown_method(model_dir: Path) -> str:
    config = _config(model_dir)
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (model_dir / "config.json").write_text(json.dumps(config))
    return "quant_method = 'bitsandbytes' is not supported"


def _corrupt_missing_scale(model_dir: Path) -> str:
    tensors = _load(model_dir)
    del tensors["model.layers.1.mlp.experts.6.up_proj.weight_scale_inv"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return "'model.layers.1.mlp.experts.6.up_proj.weight' (fp8) has no weight_scale_inv"


def _corrupt_block_size(model_dir: Path) -> str:
    config = _config(model_dir)
    config["quantization_config"]["weight_block_size"] = [5, 5]  # the scales were made for 16 x 16 blocks
    (model_dir / "config.json").write_text(json.dumps(config))
    return "block size [5, 5] does not fit"


def _corrupt_extra_expert_tensor(model_dir: Path) -> str:
    tensors = _load(model_dir)
    tensors["model.layers.0.mlp.experts.3.gate_proj.bias"] = torch.zeros(16)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return "'model.layers.0.mlp.experts.3.gate_proj.bias' belongs to expert 3 of layer 0"


def _corrupt_quantized_router(model_dir: Path) -> str:
    tensors = _load(model_dir)
    tensors["model.layers.1.mlp.gate.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return "'model.layers.1.mlp.gate.weight_scale_inv'"


def _corrupt_gptq_qzeros(model_dir: Path) -> str:
    tensors = _load(model_dir)
    del tensors["model.layers.0.mlp.experts.2.down_proj.qzeros"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return "has no qzeros tensor 'model.layers.0.mlp.experts.2.down_proj.qzeros'"


BAD = {
    "unknown-quant-method": ("qwen3_moe-fp8", _corrupt_unknown_method),
    "missing-scale": ("qwen3_moe-fp8", _corrupt_missing_scale),
    "block-size-does-not-fit": ("qwen3_moe-fp8", _corrupt_block_size),
    "extra-per-expert-tensor": ("qwen3_moe-fp8", _corrupt_extra_expert_tensor),
    "quantized-router": ("qwen3_moe-fp8", _corrupt_quantized_router),
    "gptq-missing-qzeros": ("qwen3_moe-gptq", _corrupt_gptq_qzeros),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_quantized_input_is_one_error_line_and_nothing_written(monkeypatch, capsys, tmp_path, bad):
    case, corrupt = BAD[bad]
    parent = _build_for_gguf(case, tmp_path)
    config = _config(parent)
    arch = load_arch(config)
    plan = tmp_path / "plan.json"
    keep = _keep(arch, config, "uniform")
    plan.write_text(json.dumps({"model_fingerprint": model_fingerprint(parent),
                                "keep": {str(k): v for k, v in keep.items()}, "meta": {}}))
    fragment = corrupt(parent)
    work = tmp_path / "work"
    work.mkdir()
    data = _data(tmp_path / "d.jsonl")
    commands = [
        ("prune", str(parent), "--plan", str(plan), "--out", str(work / "out")),
        ("calibrate", str(parent), "--data", str(data), "--pairs", "en-de", "--teacher-forced", "--out", str(work / "s.safetensors")),
        ("export", "gguf", str(parent), "--out", str(work / "m.gguf"), "--dtype", "f32"),
    ]
    for args in commands:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args[0], err)
        assert fragment in lines[0], (args[0], lines[0])
        assert sorted(p.name for p in work.iterdir()) == [], args[0]


def test_checkpoint_errors_name_the_file(tmp_path):
    parent = _build("qwen3_moe-fp8", tmp_path)
    _corrupt_missing_scale(parent)
    with pytest.raises(CheckpointError, match=str(parent)):
        with CheckpointReader(parent) as reader:
            logical_tensors(reader)


@pytest.mark.parametrize("case", ["qwen3_moe-fp8", "qwen3_moe-gptq-act-order-v2"])
def test_onnx_export_of_a_pruned_quantized_parent_equals_the_masked_parent(parents, tmp_path, case):
    """Non-uniform plan (ONNX keeps per-layer counts): the ONNX graph of the pruned quantized
    checkpoint equals the dequantised parent with the dropped experts masked."""
    from test_onnx import VOCAB, bpe_json

    from converters.onnx.check import empty_past, open_session, run_graph
    from converters.onnx.export import MODEL_FILE, export_onnx

    family, write = LAYOUTS[case]
    parent = build_tiny(family, tmp_path / case, vocab_size=VOCAB)
    (parent / "tokenizer.json").write_text(bpe_json())
    (parent / "chat_template.jinja").write_text(TEMPLATE)
    write(parent)
    config = _config(parent)
    arch = load_arch(config)
    keep = _keep(arch, config, "nonuniform")
    pruned = prune_checkpoint(parent, Plan(model_fingerprint(parent), keep, {}), tmp_path / "pruned")
    out = export_onnx(pruned, tmp_path / "onnx", hash_inputs=False)
    ids = np.arange(3, 30)[None] % VOCAB
    logits, _ = run_graph(open_session(out / MODEL_FILE), ids, empty_past(2, 1, 16), 2)
    model = load_pruned(parent, dtype=torch.float32).eval()
    with torch.no_grad(), expert_mask(model, keep):
        masked = model(torch.tensor(ids)).logits[0].numpy()
    assert np.abs(logits[0] - masked).max() <= 1e-4
