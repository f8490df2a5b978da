"""The tokenizer of a Hugging Face checkpoint as GGUF metadata for llama.cpp.

Supported: byte-level BPE (`tokenizer.json` with a BPE model and a ByteLevel pre-tokenizer
that splits with the GPT-2 regex). llama.cpp's `gpt-2` pre-tokenizer reproduces that split
exactly, which the parity tests check on the harvested test split. Other pre-tokenizers are
refused with a clear error rather than exported with a tokenization that would silently differ.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from converters.gguf.errors import GGUFExportError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    model: str                      # tokenizer.ggml.model
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]     # "bos" / "eos" / "pad" / "unk" / "sep" -> id
    special_texts: dict[str, str]
    chat_template: str | None


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GGUFExportError(f"{path}: {what} not found; save the tokenizer next to the model (tokenizer.save_pretrained)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GGUFExportError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GGUFExportError(f"{path}: {what} must be a JSON object")
    return data


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    if pre is None:
        raise GGUFExportError(f"{path}: tokenizer has no pre-tokenizer; only byte-level BPE tokenizers can be exported to GGUF")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space", False):
            raise GGUFExportError(f"{path}: ByteLevel pre-tokenizer with add_prefix_space=true has no llama.cpp equivalent")
        return "gpt-2"
    kinds = [step.get("type") for step in steps]
    raise GGUFExportError(
        f"{path}: pre-tokenizer {kinds} is not supported for GGUF export (supported: ByteLevel with the GPT-2 split, "
        f"llama.cpp pre-tokenizer 'gpt-2'); tokenization in llama.cpp would differ from transformers"
    )


def read_vocab(model_dir: str | Path, vocab_size: int) -> GGUFVocab:
    """Read tokenizer.json / tokenizer_config.json / chat_template.jinja of `model_dir`.

    `vocab_size` is the model's embedding rows: the token list is padded to it with unused
    tokens, as the embedding may be larger than the tokenizer."""
    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER_FILE
    data = _load_json(path, "tokenizer")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF export (byte-level BPE only)")
    if data.get("normalizer") not in (None, {}):
        raise GGUFExportError(f"{path}: tokenizer normalizer {data['normalizer'].get('type')!r} has no llama.cpp equivalent")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), path)

    by_id: dict[int, str] = {}
    for token, token_id in model.get("vocab", {}).items():
        by_id[int(token_id)] = token
    types: dict[int, int] = {}
    for added in data.get("added_tokens", []):
        token_id = int(added["id"])
        by_id[token_id] = added["content"]
        types[token_id] = CONTROL if added.get("special", False) else USER_DEFINED
    if not by_id:
        raise GGUFExportError(f"{path}: tokenizer vocabulary is empty")
    n_tokens = max(by_id) + 1
    if n_tokens > vocab_size:
        raise GGUFExportError(f"{path}: tokenizer has {n_tokens} tokens but the model embeds only {vocab_size}")
    gaps = [i for i in range(n_tokens) if i not in by_id]
    if gaps:
        raise GGUFExportError(f"{path}: tokenizer ids are not contiguous (first missing id {gaps[0]})")
    tokens = [by_id[i] for i in range(n_tokens)] + [f"[PAD{i}]" for i in range(n_tokens, vocab_size)]
    token_types = [types.get(i, NORMAL) for i in range(n_tokens)] + [UNUSED] * (vocab_size - n_tokens)

    merges = []
    for merge in model.get("merges", []):
        merges.append(merge if isinstance(merge, str) else " ".join(merge))
    if not merges:
        # llama.cpp's BPE vocabulary needs the tokenizer.ggml.merges key ("cannot find tokenizer
        # merges in model file"), and gguf-py writes no empty array: such a file would not load
        raise GGUFExportError(f"{path}: the BPE tokenizer has no merges; llama.cpp cannot load a GGUF without tokenizer "
                              f"merges: train the tokenizer with a vocabulary larger than its byte alphabet")

    special_texts: dict[str, str] = {}
    config_path = model_dir / TOKENIZER_CONFIG
    tok_config = _load_json(config_path, "tokenizer config") if config_path.is_file() else {}
    for role in ("bos", "eos", "pad", "unk", "sep"):
        value = tok_config.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special_texts[role] = value
    token_ids = {token: i for i, token in enumerate(tokens)}
    special_ids = {}
    for role, text in special_texts.items():
        if text not in token_ids:
            raise GGUFExportError(f"{config_path}: {role}_token {text!r} is not in the vocabulary of {path.name}")
        special_ids[role] = token_ids[text]
    if "eos" not in special_ids:
        raise GGUFExportError(f"{config_path}: no eos_token; generation could not stop. Set eos_token in the tokenizer config")

    template = None
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        template = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    elif isinstance(tok_config.get("chat_template"), str):
        template = tok_config["chat_template"]
    logger.info("gguf: vocab %d tokens (%d padding), %d merges, pre-tokenizer %s", n_tokens, vocab_size - n_tokens, len(merges), pre)
    return GGUFVocab("gpt2", pre, tokens, token_types, merges, special_ids, special_texts, template)
