"""Calibration of a GGUF parent inside llama.cpp (llama-cpp-python's low-level API, stock
llama.cpp): the same settings, data, prompts and STATS file as packager.calibrate, with
neither torch nor transformers.

How a run works:
1. The GGUF is checked with gguf-py before llama.cpp sees it (packager's family table,
   routers present, F32 routers for the fingerprint, one expert count); its chat template
   and vocabulary come from the file itself.
2. Prompts are built by packager.calibration_data.PromptBuilder; tokens come from llama.cpp's
   own tokenizer (special tokens parsed, as the transformers path does), and the byte pieces
   of the tokens give the character offsets that split the prompt span from the source span.
   Text whose pieces do not give back the input (bytes the vocabulary cannot represent, an
   unknown token) is refused: the model cannot encode that language.
3. Outputs: teacher-forced appends the reference tokens plus the end token; generate decodes
   greedily in a context without the callback (at most `max_new_tokens`, cut after the
   first end token).
4. Capture: prompt + output of several sequences in one `llama_decode` (distinct sequence ids
   in a unified KV cache, so ubatches keep the batch order), logits requested for every
   token so the last layer's FFN runs for every token (those logits are the run's largest
   buffer: a decode holds at most LOGITS_BUDGET_BYTES of them). The context's eval callback
   (`cb_eval`) asks the scheduler only for the router tensors of each MoE layer, named
   `NAME-{layer}` by llama.cpp's graph (llm_graph_context::build_moe_ffn):
   - `ffn_moe_topk`: selected experts [k, tokens] (a strided view of the argsort);
   - the applied weights, the last one the graph builds of `ffn_moe_weights` (probabilities
     of the selected experts), `ffn_moe_weights_softmax` (GPT-OSS: softmax over the k
     logits), `ffn_moe_weights_norm` (top-k renormalised), `ffn_moe_weights_scaled`;
   - REAP: the expert outputs before weighting, `ffn_moe_down` (or `ffn_moe_down_biased`
     when the experts have a down bias) [n_embd, k, tokens]: their L2 norms.
   and copies each with ggml_backend_tensor_get when the scheduler reports it computed.
   Routing mass renormalises the applied weights over the top k, REAP multiplies the applied
   weight by the norm: the definitions of packager.core.stats, as in the transformers path.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from packager.calibration_data import (
    CalibrationError, CalibrationSettings, Example, NullContext, PromptBuilder, SpanAccumulator, char_offsets_from_pieces,
    check_settings, output_span, progress_bar, read_examples, stats_for_run,
)
from packager.core.stats import RoutingStats
from packager.core.provenance import versions

logger = logging.getLogger(__name__)

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26
_NUMPY_OF_GGML = {GGML_TYPE_F32: np.float32, GGML_TYPE_I32: np.int32}

TOPK = "ffn_moe_topk"
# applied weights, in the order the graph builds them: the last one present is what the model uses
WEIGHT_NAMES = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
# expert outputs before weighting, same rule
DOWN_NAMES = ("ffn_moe_down", "ffn_moe_down_scaled", "ffn_moe_down_biased")
TOKEN_BUDGET = 1024  # at most this many tokens per capture decode (several sequences share it)
LOGITS_BUDGET_BYTES = 128 * 1024**2  # every token's logits are kept per decode: n_tokens x n_vocab x 4 bytes
N_UBATCH = 512  # tokens per graph evaluation (a decode of more runs in several ubatches, in order)


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml (ggml/include/ggml.h); only read, never written."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_NAME_OFFSET = _GGMLTensor.name.offset
_TENSOR_GET = None


def _tensor_get():
    """ggml_backend_tensor_get from the ggml library llama-cpp-python ships."""
    global _TENSOR_GET
    if _TENSOR_GET is None:
        from llama_cpp import _ggml

        function = _ggml.libggml.ggml_backend_tensor_get
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        function.restype = None
        _TENSOR_GET = function
    return _TENSOR_GET


def read_tensor(address: int) -> np.ndarray:
    """A copy of a computed F32/I32 graph tensor (views too), numpy order (ne reversed)."""
    tensor = _GGMLTensor.from_address(address)
    dtype = _NUMPY_OF_GGML.get(tensor.type)
    if dtype is None:
        raise CalibrationError(f"graph tensor {tensor.name.decode(errors='replace')!r} has ggml type {tensor.type}, expected F32 or I32")
    ne, nb = list(tensor.ne), list(tensor.nb)
    itemsize = np.dtype(dtype).itemsize
    nbytes = itemsize + sum((n - 1) * stride for n, stride in zip(ne, nb))
    raw = np.empty(nbytes, dtype=np.uint8)
    _tensor_get()(address, raw.ctypes.data, 0, nbytes)
    contiguous = [itemsize * int(np.prod(ne[:i])) for i in range(GGML_MAX_DIMS)]
    if nb == contiguous:
        return raw.view(dtype).reshape(ne[::-1])
    view = np.lib.stride_tricks.as_strided(raw, shape=ne[::-1] + [itemsize], strides=nb[::-1] + [1], writeable=False)
    return np.ascontiguousarray(view).view(dtype)[..., 0]


class RouterTap:
    """The eval callback: asks the scheduler for the router tensors of the MoE layers only and
    keeps copies of them per layer, ubatch after ubatch, while `active`."""

    def __init__(self, llama_cpp, moe_layers: Sequence[int], reap: bool):
        self.positions = {layer_idx: pos for pos, layer_idx in enumerate(moe_layers)}
        self.wanted: dict[bytes, tuple[str, int]] = {}
        for layer_idx, pos in self.positions.items():
            for name in (TOPK,) + WEIGHT_NAMES + (DOWN_NAMES if reap else ()):
                self.wanted[f"{name}-{layer_idx}".encode()] = (name, pos)
        self.reap = reap
        self.active = False
        self.error: BaseException | None = None
        self.seconds = 0.0  # time spent in the callback (copying and asking)
        self.reset()
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def reset(self) -> None:
        self.seen: dict[tuple[str, int], list[np.ndarray]] = {}

    def _callback(self, address, ask, user_data):
        if not self.active:
            return not ask  # ask: "no"; otherwise keep computing
        started = time.perf_counter()
        try:
            key = self.wanted.get(ctypes.string_at(address + _NAME_OFFSET))
            if ask:
                return key is not None
            if key is not None:
                name, pos = key
                data = read_tensor(address)
                if name in DOWN_NAMES:
                    data = np.sqrt(np.einsum("...i,...i->...", data, data, dtype=np.float64))  # [tokens, k]
                self.seen.setdefault(key, []).append(data)
            return True
        except BaseException as exc:  # never let an exception cross the C boundary
            self.error = exc
            return False
        finally:
            self.seconds += time.perf_counter() - started

    def layer_routing(self, pos: int, n_tokens: int, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(top-k ids [T, k], applied weights [T, k], expert-output norms [T, k] or None)."""
        def joined(name: str) -> np.ndarray | None:
            parts = self.seen.get((name, pos))
            if not parts:
                return None
            return np.concatenate([part.reshape(-1, top_k) for part in parts])

        idx = joined(TOPK)
        weights = next((w for w in (joined(n) for n in reversed(WEIGHT_NAMES)) if w is not None), None)
        norms = next((d for d in (joined(n) for n in reversed(DOWN_NAMES)) if d is not None), None) if self.reap else None
        for what, value in (("selected experts (ffn_moe_topk)", idx), ("expert weights (ffn_moe_weights)", weights)) + (
                (("expert outputs (ffn_moe_down)", norms),) if self.reap else ()):
            if value is None or value.shape != (n_tokens, top_k):
                got = "nothing" if value is None else f"shape {value.shape}"
                raise CalibrationError(
                    f"llama.cpp's graph gave {got} for the {what} of MoE layer {list(self.positions)[pos]}, expected "
                    f"{n_tokens} tokens x top-k {top_k}: this architecture's routing is not one the eval callback knows"
                )
        return idx, weights, norms


@dataclass
class GGUFParent:
    path: Path
    family: str
    gguf_arch: str
    moe_layers: list[int]
    n_experts: int
    top_k: int
    fingerprint: str
    chat_template: str


def inspect_gguf(path: Path) -> GGUFParent:
    """Family, MoE layers, counts, fingerprint and chat template of a GGUF parent, or one
    clear error (not a GGUF, truncated, dense, unknown architecture, pruned, no template)."""
    from converters.gguf.gguf_file import field_value, gguf_fingerprint, model_facts, open_gguf
    from packager.core.errors import PackagerError

    reader = open_gguf(path)
    try:
        facts = model_facts(reader, path)
    except PackagerError as exc:
        raise CalibrationError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    counts = {facts.n_experts[layer_idx] for layer_idx in facts.moe_layers}
    if len(counts) != 1:
        raise CalibrationError(f"{path}: expert counts differ between layers (a pruned model): calibrate the parent")
    n_experts = counts.pop()
    if n_experts <= facts.top_k:
        raise CalibrationError(f"{path}: {n_experts} experts with top-k {facts.top_k}: nothing to rank (a dense or fully pruned model)")
    template = field_value(reader, "tokenizer.chat_template")
    if not isinstance(template, str) or not template.strip():
        raise CalibrationError(f"{path}: GGUF has no tokenizer.chat_template: export it with `packager export gguf` from a model with chat_template.jinja")
    fingerprint = gguf_fingerprint(reader, path)
    return GGUFParent(Path(path), facts.family, facts.gguf_arch, list(facts.moe_layers), n_experts, facts.top_k, fingerprint, template)


class LlamaCalibrationModel:
    """llama.cpp model and two contexts: one plain (generation), one with the router tap."""

    def __init__(self, parent: GGUFParent, reap: bool, n_threads: int | None = None):
        from runtime.backends.llama_cpp_backend import _Model, llama_module
        from runtime.errors import BackendError

        self.llama_cpp = llama_module()
        self.parent = parent
        self.n_threads = n_threads or _default_threads()
        try:
            self.model = _Model(parent.path)
        except BackendError as exc:
            raise CalibrationError(str(exc)) from None
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab
        self.tap = RouterTap(self.llama_cpp, parent.moe_layers, reap)
        self._contexts: dict[str, tuple] = {}
        self.eos_id = int(self.llama_cpp.llama_vocab_eos(self.vocab))
        if self.eos_id < 0:
            raise CalibrationError(f"{parent.path}: GGUF defines no end-of-sequence token")
        self._piece_buffer = ctypes.create_string_buffer(256)
        # logits of every token are requested (so the last layer runs for every token): bound them
        self.token_budget = max(64, min(TOKEN_BUDGET, LOGITS_BUDGET_BYTES // (4 * max(self.n_vocab, 1))))

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        from runtime.backends.llama_cpp_backend import tokenize_with

        return tokenize_with(self.model, text, special=True)

    def piece(self, token: int) -> bytes:
        buf = self._piece_buffer
        n = self.llama_cpp.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.llama_cpp.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, True)
        return buf.raw[:n]

    def special_tokens(self) -> dict[str, str]:
        """`bos_token`, `eos_token`, ... as the chat template sees them (from the GGUF vocabulary)."""
        out = {}
        for role in ("bos", "eos", "pad", "sep"):
            token = int(getattr(self.llama_cpp, f"llama_vocab_{role}")(self.vocab))
            if token >= 0:
                out[f"{role}_token"] = self.piece(token).decode("utf-8", "replace")
        return out

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.tokenize(text)
        offsets = char_offsets_from_pieces(text, [self.piece(t) for t in ids])
        if offsets is None:
            raise _NotEncodable(text)
        return ids, offsets

    # -- contexts ----------------------------------------------------------------------------
    def _context(self, kind: str, n_ctx: int, n_seq: int):
        """A context ('plain' or 'tap') with room for n_ctx tokens of up to n_seq sequences."""
        current = self._contexts.get(kind)
        if current is not None and current[1] >= n_ctx and current[2] >= n_seq:
            return current[0], current[3]
        if current is not None:
            self._free_context(kind)
        llama_cpp = self.llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(N_UBATCH, n_ctx)
        params.n_seq_max = n_seq
        params.kv_unified = True  # one KV stream: ubatches keep the batch order
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        # the settings under which llama.cpp matches transformers fp32 (tests/test_gguf.py parity tests)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        if kind == "tap":
            params.cb_eval = self.tap.callback
            params.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise CalibrationError(f"{self.parent.path}: llama.cpp could not create a context of {n_ctx} tokens")
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._contexts[kind] = (ctx, n_ctx, n_seq, batch)
        return ctx, batch

    def _free_context(self, kind: str) -> None:
        ctx, _, _, batch = self._contexts.pop(kind)
        self.llama_cpp.llama_batch_free(batch)
        self.llama_cpp.llama_free(ctx)

    def _decode(self, ctx, batch, sequences: Sequence[Sequence[int]], *, start: int = 0, all_logits: bool) -> None:
        """Decode several sequences (sequence i gets seq id i) from position `start`."""
        n = 0
        for seq_id, tokens in enumerate(sequences):
            for i, token in enumerate(tokens):
                batch.token[n] = int(token)
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 1 if (all_logits or i == len(tokens) - 1) else 0
                n += 1
        batch.n_tokens = n
        rc = self.llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise CalibrationError(f"{self.parent.path}: llama_decode failed with code {rc}")

    def _clear(self, ctx) -> None:
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(ctx), True)

    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt`, cut after the first end token."""
        ctx, batch = self._context("plain", _round_up(len(prompt) + max_new_tokens), 1)
        self._clear(ctx)
        self._decode(ctx, batch, [prompt], all_logits=False)
        out: list[int] = []
        position = len(prompt)
        while True:
            logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
            token = int(np.argmax(logits))
            out.append(token)
            if token == self.eos_id or len(out) >= max_new_tokens:
                return out
            self._decode(ctx, batch, [[token]], start=position, all_logits=False)
            position += 1

    def capture(self, sequences: Sequence[list[int]]) -> list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]]:
        """Routing of every token of each sequence: per sequence, per MoE layer (ids, weights, norms)."""
        total = sum(len(s) for s in sequences)
        ctx, batch = self._context("tap", _round_up(max(total, self.token_budget)), max(len(sequences), 1))
        self._clear(ctx)
        tap = self.tap
        tap.reset()
        tap.error = None
        tap.active = True
        try:
            self._decode(ctx, batch, sequences, all_logits=True)
        finally:
            tap.active = False
        if tap.error is not None:
            raise tap.error
        top_k = self.parent.top_k
        layers = [tap.layer_routing(pos, total, top_k) for pos in range(len(self.parent.moe_layers))]
        tap.reset()
        out = []
        start = 0
        for tokens in sequences:
            end = start + len(tokens)
            out.append(([ids[start:end] for ids, _, _ in layers], [w[start:end] for _, w, _ in layers],
                        [d[start:end] for _, _, d in layers] if self.tap.reap else None))
            start = end
        return out

    def close(self) -> None:
        for kind in list(self._contexts):
            self._free_context(kind)
        self.model.free()


class _NotEncodable(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _round_up(n: int, step: int = 256) -> int:
    return max(step, -(-n // step) * step)


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _packs(lengths: Sequence[int], batch_size: int, budget: int) -> list[list[int]]:
    """Indices of sequences decoded together: at most batch_size sequences and `budget` tokens
    (a longer sequence goes alone), similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    packs: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        if current and (len(current) >= batch_size or tokens + lengths[i] > budget):
            packs.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        packs.append(current)
    return packs


def _check_transformers_only_settings(settings: CalibrationSettings, path: Path) -> None:
    """Options of the transformers backend that a GGUF run cannot honour are refused, not ignored."""
    given = []
    if getattr(settings, "device", "auto") not in ("auto", "cpu"):
        given.append(f"--device {settings.device}")
    if getattr(settings, "execution", "auto") != "auto":
        given.append(f"--execution {settings.execution}")
    for option, name in (("--max-activation-mb", "max_activation_mb"), ("--spill-dir", "spill_dir"), ("--generator", "generator")):
        if getattr(settings, name, None) is not None:
            given.append(option)
    if given:
        raise CalibrationError(f"{path}: {', '.join(given)} apply to Hugging Face models only; a GGUF runs in llama.cpp on the CPU "
                               f"(memory-mapped, generating with itself): drop them")


def calibrate_gguf(model_path: str | Path, data: Sequence[str | Path], settings: CalibrationSettings,
                   command: str | None = None, show_progress: bool = False, n_threads: int | None = None) -> RoutingStats:
    """Routing statistics of the GGUF `model_path` on `data` for `settings.pairs` (module docstring)."""
    from runtime.prompt import PromptRenderer

    check_settings(settings)
    _check_transformers_only_settings(settings, Path(model_path))
    examples = read_examples([Path(p) for p in data], settings)
    parent = inspect_gguf(Path(model_path))
    model = LlamaCalibrationModel(parent, settings.reap, n_threads)
    try:
        from runtime.errors import PromptError

        try:
            renderer = PromptRenderer(parent.chat_template, source=f"{parent.path} (tokenizer.chat_template)",
                                      special_tokens=model.special_tokens())
        except PromptError as exc:
            raise CalibrationError(str(exc)) from None
        builder = PromptBuilder(None, None, settings.prompt_template, renderer=renderer, encode=model.encode_with_offsets)
        flat = [(pair_pos, ex) for pair_pos, slug in enumerate(settings.pairs) for ex in examples[slug]]
        names = ", ".join(str(p) for p in data)

        def refuse(ex: Example, text: str) -> CalibrationError:
            return CalibrationError(
                f"{names}: the tokenizer of {parent.path} cannot encode {ex.pair} text {text[:40]!r} (characters lost or "
                f"mapped to an unknown token): the model does not cover this language or script; drop it from --pairs"
            )

        encoded = []
        for _, ex in flat:
            try:
                encoded.append(builder.encode(ex.pair, ex.source))
            except _NotEncodable:
                raise refuse(ex, ex.source) from None
        bar = progress_bar(show_progress)
        started = time.perf_counter()
        with bar if bar is not None else NullContext():
            if settings.teacher_forced:
                outputs = []
                for _, ex in flat:
                    try:
                        ids, _ = model.encode_with_offsets(ex.target)
                    except _NotEncodable:
                        raise refuse(ex, ex.target) from None
                    outputs.append(ids + [model.eos_id])
            else:
                task = bar.add_task("generating", total=len(flat)) if bar else None
                outputs = []
                for ids, _ in encoded:
                    outputs.append(model.generate(ids, settings.max_new_tokens))
                    if bar:
                        bar.advance(task)
            sequences = [(ids + out, slots + [2] * len(out), pair_pos)
                         for (ids, slots), out, (pair_pos, _) in zip(encoded, outputs, flat)]
            accumulator = SpanAccumulator(len(parent.moe_layers), parent.n_experts, len(settings.pairs), settings.reap)
            task = bar.add_task("recording routing", total=len(sequences)) if bar else None
            for pack in _packs([len(s[0]) for s in sequences], settings.batch_size, model.token_budget):
                routed = model.capture([sequences[i][0] for i in pack])
                for i, (idx, weights, norms) in zip(pack, routed):
                    _, slots, pair_pos = sequences[i]
                    terms = [w * d for w, d in zip(weights, norms)] if norms is not None else None
                    accumulator.add_sequence(pair_pos, slots, idx, weights, terms)
                if bar:
                    bar.advance(task, len(pack))
        elapsed = time.perf_counter() - started
        logger.info("calibrate: %.3f s in the eval callback of %.3f s", model.tap.seconds, elapsed)
        execution = {"mode": "llama.cpp", "device": "cpu", "reason": "GGUF parent (llama-cpp-python eval callback)",
                     "threads": model.n_threads, "callback_seconds": round(model.tap.seconds, 3)}
    finally:
        model.close()

    return stats_for_run(
        fingerprint=parent.fingerprint, family=parent.family, moe_layers=parent.moe_layers, n_experts=parent.n_experts,
        top_k=parent.top_k, settings=settings, chat_template=parent.chat_template, reap=settings.reap,
        model_path=parent.path, data=data, examples=examples, command=command, versions=versions("llama-cpp-python", "gguf"), seconds=elapsed,
        execution=execution, fill=lambda stats: accumulator.to_stats(stats, settings.pairs, output_span(settings)),
    )
