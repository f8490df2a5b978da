"""`export_onnx`: a (pruned) Hugging Face MoE checkpoint -> a directory the ONNX Runtime
backend loads:

    model.onnx           decoder graph with KV cache (+ model.onnx.data for large models)
    tokenizer.json       the model's tokenizer
    model.export.json    runtime.schema.ExportConfig: prompt template, stop tokens, per-layer
                         expert counts, quantization record, fingerprints, provenance

The directory appears atomically (runtime.atomic.atomic_output): everything is written into a
temporary sibling, fsynced, then renamed; a full disk or an unwritable folder is one error line
naming the output. The files carry no wall-clock time (SOURCE_DATE_EPOCH when set), so the same
inputs give byte-identical files; the export's duration and peak RSS are logged, not stored.
The graph is built node by node (converters/onnx/decoder.py) and every weight
streams from the safetensors shards into model.onnx.data one tensor (or chunk, or expert) at
a time, quantized on the way for int8 / int4: memory stays bounded whatever the model's size.
The comparison with transformers (on by default) loads the model whole, so it runs only when
the float32 weights fit CHECK_MAX_WEIGHT_BYTES and is recorded as skipped otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from converters.onnx.errors import OnnxExportError
from converters.onnx.options import DEFAULT_FORMULATION, DTYPES, FORMULATIONS, SUPPORTED_FAMILIES
from converters.onnx.quantize import check_quant
from packager.core.errors import OutputExistsError, PackagerError
from packager.core.plan_file import plan_languages
from runtime.atomic import atomic_output
from runtime.memory import proc_status
from runtime.backends import export_config_path
from runtime.backends.onnx_backend import CONTRIB_OPS_NOTE, graph_input_names, graph_output_names
from runtime.errors import EdgeError
from runtime.schema import ExportConfig
from packager.core.provenance import created_unix, versions

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
OPSET = 17
# protobuf cannot hold 2 GiB; well below that, external data also lets ORT map the weights
EXTERNAL_DATA_THRESHOLD_BYTES = 256 * 1024**2
# the transformers comparison loads the whole model in float32; above this it is skipped (recorded)
CHECK_MAX_WEIGHT_BYTES = 1024**3
# fp32 export vs transformers on probe sequences; measured ~1e-6 (tiny) and ~1e-5 (default)
CHECK_TOLERANCE = 1e-3
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "sep")


# ----------------------------------------------------------------------------- small helpers
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxExportError(f"{path}: {what} not found; MODEL_DIR must be a Hugging Face save_pretrained directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxExportError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OnnxExportError(f"{path}: {what} must be a JSON object")
    return data


class _Stages:
    """One rich progress line per stage (or plain log lines when progress is off)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("onnx: {task.description}"), TimeElapsedColumn(), transient=True)
            self.progress.start()
        return self

    @contextmanager
    def stage(self, description: str):
        logger.info("onnx: %s", description)
        task = self.progress.add_task(description, total=1) if self.progress else None
        yield
        if task is not None:
            self.progress.update(task, completed=1)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()


# ------------------------------------------------------------------------------ model inputs
def _tokenizer_facts(model_dir: Path, vocab_size: int) -> tuple[dict[str, str], list[str]]:
    """Special tokens by role and stop tokens, checked against tokenizer.json and the model."""
    from tokenizers import Tokenizer

    from runtime.prompt import special_tokens_of

    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise OnnxExportError(f"{path}: not found; the ONNX runtime tokenizes with tokenizer.json, save it with the model")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception
        raise OnnxExportError(f"{path}: not a valid tokenizers file ({' '.join(str(exc).split())[:200]})") from None
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > vocab_size:
        raise OnnxExportError(
            f"{path}: the tokenizer has {n_tokens} tokens but config.json says vocab_size {vocab_size}: "
            f"tokenizer and model do not belong together"
        )
    special = {}
    for key, token in special_tokens_of(model_dir).items():
        role = key[: -len("_token")]
        if role in SPECIAL_ROLES and tokenizer.token_to_id(token) is not None:
            special[role] = token
    stop = []
    generation = model_dir / "generation_config.json"
    eos_ids = _read_json(generation, "generation_config.json").get("eos_token_id") if generation.is_file() else None
    for token_id in ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])):
        token = tokenizer.id_to_token(int(token_id))
        if token is not None and token not in stop:
            stop.append(token)
    if "eos" in special and special["eos"] not in stop:
        stop.insert(0, special["eos"])
    if not stop:
        raise OnnxExportError(f"{model_dir}: no end-of-sequence token (tokenizer_config.json eos_token or "
                              f"generation_config.json eos_token_id); generation could not stop")
    return special, stop


def _load_model(model_dir: Path):
    import torch

    from packager import load_pruned

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line covers loading
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_pruned(model_dir, dtype=torch.float32)
    except PackagerError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise OnnxExportError(f"{model_dir}: transformers could not load the checkpoint ({' '.join(str(exc).split())[:300]})") from None
    model.eval()
    return model


def _parent_facts(model_dir: Path) -> tuple[str, str, dict | None]:
    from packager.core.fingerprint import model_fingerprint
    from packager.prune import read_provenance

    fingerprint = model_fingerprint(model_dir)
    pruned = read_provenance(model_dir) or {}
    plan = None
    if pruned:
        plan = {"sha256": pruned.get("plan", {}).get("sha256"), "meta": pruned.get("plan", {}).get("meta", {}),
                "keep": pruned.get("keep")}
    return fingerprint, pruned.get("parent_fingerprint", fingerprint), plan


def _input_files(model_dir: Path, hash_inputs: bool) -> dict:
    from packager.core.fingerprint import file_sha256

    files = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".json", ".jinja")):
            entry = {"bytes": path.stat().st_size}
            if hash_inputs or path.suffix != ".safetensors":
                entry["sha256"] = file_sha256(path)
            files[path.name] = entry
    return files


# ------------------------------------------------------------------------------ the export
def _save(model, directory: Path, data_bytes: int, threshold_bytes: int) -> list[str]:
    """Write the graph protobuf. Its weights are already in DATA_FILE; a model whose weights
    stay under `threshold_bytes` is folded back into one self-contained file."""
    import onnx

    target = directory / MODEL_FILE
    if data_bytes <= threshold_bytes:
        onnx.load_external_data_for_model(model, str(directory))
        for init in model.graph.initializer:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(model, str(target))
        (directory / DATA_FILE).unlink()
        return [MODEL_FILE]
    onnx.save_model(model, str(target))
    return [MODEL_FILE, DATA_FILE]


def _contrib_ops(model) -> list[str]:
    return sorted({node.op_type for node in model.graph.node if node.domain == "com.microsoft"})


def _check_budget(model_dir: Path) -> tuple[int, int]:
    """(float32 bytes of the weights, the most the transformers comparison may load)."""
    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.execution import weight_bytes

    with CheckpointReader(model_dir) as reader:
        config = dict(reader.config)
        total = weight_bytes(reader, load_arch(config), config, "float32")["total"]
    return total, CHECK_MAX_WEIGHT_BYTES


def build_graph(model_dir: Path, staging: Path, quant: str, dtype: str, formulation: str, progress=None):
    """Stream `model_dir` into staging/DATA_FILE and return (ModelProto, shape, record, data bytes)."""
    from converters.onnx.decoder import DecoderBuilder
    from converters.onnx.graph_writer import ExternalData, GraphBuilder
    from converters.onnx.weights import CheckpointWeights

    weights = CheckpointWeights(model_dir)
    data = ExternalData(staging / DATA_FILE, DATA_FILE)
    try:
        builder = DecoderBuilder(GraphBuilder(data), weights, quant, dtype, formulation)
        shape = builder.build(progress)
    finally:
        data.close()
        weights.close()
    return builder.g.model("decoder", OPSET), shape, builder, data.bytes_written


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: str = "fp32",
    *,
    dtype: str = "fp32",
    formulation: str = DEFAULT_FORMULATION,
    force: bool = False,
    progress: bool = False,
    hash_inputs: bool = True,
    check: bool = True,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Export `model_dir` to the directory `out_dir` (see the module docstring); returns it."""
    started = time.monotonic()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config, arch, special, stop, template = _check_inputs(model_dir, out_dir, quant, dtype, formulation, force)
    precision = quant if quant != "fp32" else dtype
    with atomic_output(out_dir, directory=True) as staging:
        with _Stages(progress) as stages:
            with stages.stage(f"stream weights into the graph ({precision}, {formulation} MoE)"):
                fingerprint, parent_fingerprint, plan = _parent_facts(model_dir)
                onnx_model, shape, builder, data_bytes = build_graph(model_dir, staging, quant, dtype, formulation)
            with stages.stage("write model"):
                model_files = _save(onnx_model, staging, data_bytes, external_data_threshold_bytes)
                contrib = _contrib_ops(onnx_model)
                del onnx_model
            export_check = _check_against_transformers(stages, model_dir, staging, shape, precision) if check else None
            shutil.copyfile(model_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
            memory = proc_status()
            quantization = _quantization_record(quant, dtype, builder.record)
            quantization["bytes"] = {name: (staging / name).stat().st_size for name in model_files}
            export_config = ExportConfig(
                format="onnx",
                model_files=model_files,
                family=arch.family,
                prompt_template=template,
                stop_tokens=stop,
                special_tokens=special,
                tokenizer=TOKENIZER_FILE,
                top_k=shape.top_k,
                n_experts=dict(shape.n_experts),
                parent_n_experts=None if plan else max(shape.n_experts.values()),
                quantization=quantization,
                parent_fingerprint=parent_fingerprint,
                plan=plan,
                languages=plan_languages(plan),
                provenance={
                    "model_fingerprint": fingerprint,
                    "source": {"model_dir": str(model_dir.absolute()), "files": _input_files(model_dir, hash_inputs)},
                    "command": sys.argv,
                    "versions": versions("torch", "transformers", "onnx", "onnxruntime"),
                    **created_unix(),  # SOURCE_DATE_EPOCH or nothing: same inputs, same bytes
                },
                extra=_graph_facts(config, arch, shape, formulation, contrib, export_check),
            )
            export_config.save(export_config_path(staging / MODEL_FILE))
    logger.info("onnx: wrote %s (%s) in %.1fs, peak RSS %s bytes", out_dir, ", ".join(model_files),
                time.monotonic() - started, memory.get("VmHWM"))
    return out_dir


def _check_inputs(model_dir: Path, out_dir: Path, quant: str, dtype: str, formulation: str, force: bool):
    """The settings, the model's config, architecture, special and stop tokens and chat template, and the
    output path, all checked before anything is written."""
    from packager.core.arch import load_arch
    from runtime.prompt import PromptRenderer

    check_quant(quant)
    if dtype not in DTYPES:
        raise OnnxExportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if formulation not in FORMULATIONS:
        raise OnnxExportError(f"MoE formulation {formulation!r} unknown; choose one of {', '.join(FORMULATIONS)}")
    if not model_dir.is_dir():
        raise OnnxExportError(f"{model_dir}: not a directory; MODEL_DIR must be a Hugging Face checkpoint directory")
    config = _read_json(model_dir / "config.json", "config.json")
    arch = load_arch(config)
    if arch.family not in SUPPORTED_FAMILIES:
        raise OnnxExportError(
            f"{model_dir}: the ONNX exporter supports {', '.join(SUPPORTED_FAMILIES)}, not {arch.family}; "
            f"use `packager export gguf` for this model"
        )
    vocab_size = int(config.get("vocab_size") or 0)
    special, stop = _tokenizer_facts(model_dir, vocab_size)
    try:
        template = PromptRenderer.from_model_dir(model_dir).template_text
    except EdgeError as exc:
        raise OnnxExportError(str(exc)) from None
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir}: output exists; choose another directory or pass --force")
    if not out_dir.parent.is_dir():
        raise OnnxExportError(f"{out_dir.parent}: output parent directory does not exist")
    return config, arch, special, stop, template


def _check_against_transformers(stages, model_dir: Path, staging: Path, shape, precision: str) -> dict:
    """The exported graph against transformers on probe sequences (skipped for a model over the float32
    budget); an fp32 graph that differs beyond the tolerance is an exporter bug and stops the export."""
    from converters.onnx.check import compare_with_transformers, open_session, probe_sequences

    weight_total, budget = _check_budget(model_dir)
    if weight_total > budget:
        return {"skipped": f"float32 weights {weight_total} bytes exceed the {budget}-byte budget of "
                           "the whole-model transformers comparison; the graph pieces are tested "
                           "against transformers on tiny models of every family"}
    with stages.stage(f"check {precision} graph against transformers"):
        model = _load_model(model_dir)
        report = compare_with_transformers(open_session(staging / MODEL_FILE), model,
                                           probe_sequences(shape.vocab_size), shape.n_layers,
                                           shape.n_kv_heads, shape.head_dim)
        del model
    if precision == "fp32" and not report.max_abs <= CHECK_TOLERANCE:
        raise OnnxExportError(
            f"{model_dir}: the exported graph differs from transformers by {report.max_abs:.3g} "
            f"(tolerance {CHECK_TOLERANCE}); this is an exporter bug, please report it"
        )
    return {precision: report.as_dict(), "tolerance": CHECK_TOLERANCE}


def _graph_facts(config: dict, arch, shape, formulation: str, contrib: list, export_check: dict | None) -> dict:
    """The export config's `extra`: what the runtime needs of the graph, and how it was made."""
    from converters.onnx.families import CONTRIB_ROUTING_NOTE

    scores = "Sigmoid, group-limited TopK" if arch.routing_kind == "sigmoid_group" else "Softmax/TopK"
    routing = (f"standard ONNX ops ({scores}, ScatterElements)" if formulation != "contrib"
               else CONTRIB_ROUTING_NOTE.get(arch.routing_kind, arch.routing_kind))
    return {
        "n_layers": shape.n_layers,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": int(config.get("max_position_embeddings") or 2048),
        "inputs": graph_input_names(shape.n_layers),
        "outputs": graph_output_names(shape.n_layers),
        "opset": OPSET,
        "exporter": "converters.onnx.decoder (graph built with onnx.helper, weights streamed from the shards)",
        "moe_formulation": formulation,
        "routing": routing,
        "contrib_ops": contrib,
        "portability": CONTRIB_OPS_NOTE if contrib else "standard ONNX operators only",
        "export_check": export_check,
        # top_k (above) is the largest; a per-layer k (packager.topk) is each layer's TopK / MoE node
        **({"top_k_per_layer": {str(i): k for i, k in sorted(shape.top_k_per_layer.items())}}
           if len(set(shape.top_k_per_layer.values())) > 1 else {}),
    }


def _quantization_record(quant: str, dtype: str, record) -> dict:
    storage = "float16 storage, cast to float32 at load (ONNX Runtime folds the casts)" if dtype == "fp16" else "float32"
    method = {"float_weights": storage}
    if quant == "int8":
        method.update({"matmul": "int8 symmetric per-output-channel weights, MatMulInteger with dynamic uint8 activations",
                       "embedding": "int8 symmetric per-row table, Gather + Mul",
                       "experts": "com.microsoft QMoE, 8-bit symmetric per-row"})
    elif quant == "int4":
        method.update({"matmul": "com.microsoft MatMulNBits, 4-bit symmetric blocks along the input axis (weight-only)",
                       "embedding": "com.microsoft GatherBlockQuantized, 4-bit blocks along the hidden axis",
                       "experts": "com.microsoft QMoE, 4-bit symmetric block-wise (weight-only)"})
    return {"type": quant, "dtype": dtype, "method": method, "tensors": dict(record.tensors),
            "kept_fp32": sorted(set(record.kept_fp32))}


__all__ = ["export_onnx", "build_graph", "MODEL_FILE", "DATA_FILE", "TOKENIZER_FILE"]
