"""Tiny random MoE checkpoints of every supported family, built in the tests (no hub).

    build_tiny("qwen3_moe", tmp_path / "parent", num_hidden_layers=3) -> Path

Seeded and fp32. Weights are drawn here (not by transformers' init) with a large enough scale
that every expert changes the logits visibly and routing is decisive, so a test comparing
pruned and masked models can fail. The directory also holds a small word-level tokenizer, a
chat template and a generation config, like a real checkpoint. Helpers rewrite the experts
on disk into the fused 3D layout or GPT-OSS MXFP4 blocks/scales."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v3")

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>", "<|unk|>", "<|en|>", "<|de|>", "<|fr|>"]
WORDS = ("the a house cat dog is on in red blue file open save close window new edit view help "
         "das ein Haus Katze Hund ist auf im rot blau Datei neu Fenster le la maison chat chien est "
         "sur rouge bleu fichier ouvrir nouveau").split()
# Same shape as the embedded default's template: the renderer passes source_lang / target_lang.
CHAT_TEMPLATE = (
    "{{ bos_token }}<|{{ source_lang }}|><|{{ target_lang }}|>"
    "{{ messages[0]['content'] }}<|sep|>"
)

_COMMON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    vocab_size=64, intermediate_size=32, max_position_embeddings=128, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
)

_FAMILY_CONFIG = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=16),
    "deepseek_v3": dict(
        num_hidden_layers=3, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    if family not in _FAMILY_CONFIG:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    values = {**_COMMON, **_FAMILY_CONFIG[family], **overrides}
    if family == "deepseek_v3":
        values.pop("head_dim", None)
    config = AutoConfig.for_model(family, **values)
    config.dtype = "float32"
    return config


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights independent of transformers' init: scale 0.2, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = model.state_dict()
        for name in sorted(state):
            tensor = state[name]
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and tensor.ndim == 1:
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.ndim == 1 or "bias" in name:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(0.2 * noise)


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = SPECIAL_TOKENS + [w for w in WORDS if w not in SPECIAL_TOKENS]
    tokens = tokens[:vocab_size]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "unk_token": "<|unk|>", "model_max_length": 128,
    }, indent=2))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def byte_bpe(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (what the GGUF exporter accepts) with the special tokens above,
    trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def build_tiny(family: str, out_dir, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random fp32 checkpoint of `family` (config overrides as keyword args)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=8).save_pretrained(out_dir)
    _write_tokenizer(out_dir, config.vocab_size)
    return out_dir


# ---------------------------------------------------------------- on-disk layouts
def _load_all(model_dir: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = sorted(model_dir.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    return tensors, files


def _save_single(model_dir: Path, tensors: dict[str, torch.Tensor], old_files: list[Path]) -> None:
    for path in old_files:
        path.unlink()
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def write_fused_layout(model_dir) -> Path:
    """Rewrite per-expert keys as fused 3D tensors ([E, 2I, H] gate_up, [E, H, I] down)."""
    from packager.core.arch import load_arch

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    tensors, files = _load_all(model_dir)
    for layer_idx in arch.moe_layers(config):
        n_experts = arch.n_experts(config, layer_idx)
        per_expert = [arch.expert_tensor_names(layer_idx, e) for e in range(n_experts)]
        gate = torch.stack([tensors.pop(names["gate"]) for names in per_expert])
        up = torch.stack([tensors.pop(names["up"]) for names in per_expert])
        down = torch.stack([tensors.pop(names["down"]) for names in per_expert])
        fused = arch.fused_expert_names(layer_idx)
        tensors[fused["gate_up"]] = torch.cat([gate, up], dim=1)
        tensors[fused["down"]] = down
    _save_single(model_dir, tensors, files)
    return model_dir


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] float -> (blocks uint8 [..., R, C/32, 16], scales uint8 [..., R, C/32])."""
    *prefix, cols = weight.shape
    if cols % 32:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {cols}")
    groups = weight.float().reshape(*prefix, cols // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    magnitude_idx = (scaled.abs().unsqueeze(-1) - FP4_GRID).abs().argmin(dim=-1)
    nibbles = (magnitude_idx + 8 * (scaled < 0)).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def write_mxfp4_layout(model_dir) -> Path:
    """Rewrite GPT-OSS fused experts as MXFP4 `*_blocks` / `*_scales` (as published checkpoints)."""
    from packager.core.arch import load_arch

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    arch = load_arch(config)
    if arch.family != "gpt_oss":
        raise ValueError("MXFP4 expert layout exists for gpt_oss only")
    tensors, files = _load_all(model_dir)
    for layer_idx in arch.moe_layers(config):
        names = arch.fused_expert_names(layer_idx)
        for proj in ("gate_up", "down"):
            # in memory [E, in, out]; MXFP4 on disk is [E, out, in/32, 16]
            weight = tensors.pop(names[proj]).transpose(1, 2)
            tensors[names[f"{proj}_blocks"]], tensors[names[f"{proj}_scales"]] = quantize_mxfp4(weight)
    _save_single(model_dir, tensors, files)
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def copy_model(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)
