"""The export config (runtime.schema.ExportConfig) written beside every GGUF this packager
produces: FILE.gguf -> FILE.export.json. It is built from the GGUF's own metadata, so the
exported, quantized and GGUF-pruned files are described the same way."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from converters.gguf.families import KEY_FINGERPRINT, KEY_PARENT_FINGERPRINT, KEY_PLAN, KEY_SOURCE
from converters.gguf.gguf_file import field_value, model_facts, open_gguf
from packager.core.plan_file import plan_languages
from runtime.backends import export_config_path
from runtime.schema import ExportConfig

logger = logging.getLogger(__name__)

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "sep")


def build_export_config(gguf_path: str | Path, quantization: dict[str, Any], provenance_extra: dict | None = None) -> ExportConfig:
    gguf_path = Path(gguf_path)
    reader = open_gguf(gguf_path)
    facts = model_facts(reader, gguf_path)
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    special = {}
    for role in SPECIAL_ROLES:
        token_id = field_value(reader, f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[role] = tokens[token_id]
    plan_text = field_value(reader, KEY_PLAN)
    plan = json.loads(plan_text) if plan_text else None
    source_text = field_value(reader, KEY_SOURCE)
    provenance = {"source": json.loads(source_text) if source_text else None, "model_fingerprint": field_value(reader, KEY_FINGERPRINT)}
    provenance.update(provenance_extra or {})
    parent = field_value(reader, KEY_PARENT_FINGERPRINT)
    parent_n = max(facts.n_experts.values()) if plan is None else None
    template = field_value(reader, "tokenizer.chat_template") or ""
    del reader
    return ExportConfig(
        format="gguf",
        model_files=[gguf_path.name],
        family=facts.family,
        prompt_template=template,
        stop_tokens=[special["eos"]],
        special_tokens=special,
        top_k=facts.top_k,
        n_experts=dict(facts.n_experts),
        parent_n_experts=parent_n,
        quantization=quantization,
        parent_fingerprint=parent,
        plan=plan,
        languages=plan_languages(plan),
        provenance=provenance,
        extra={"gguf_arch": facts.gguf_arch},
    )


def write_export_config(gguf_path: str | Path, quantization: dict[str, Any], provenance_extra: dict | None = None) -> Path:
    """Write FILE.export.json beside the just-written `gguf_path`. The two are one output: when the
    config cannot be written (a full disk, Ctrl-C) the GGUF and any older config are removed too, so
    no GGUF is left that the runtime would refuse for want of its config."""
    path = export_config_path(gguf_path)
    try:
        config = build_export_config(gguf_path, quantization, provenance_extra)
        config.save(path)
    except BaseException:
        Path(gguf_path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    logger.info("gguf: export config %s", path)
    return path
