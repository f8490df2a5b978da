"""llama.cpp backend through llama-cpp-python's low-level C API (stock llama.cpp, unpatched).

`parity=True` gives the settings under which llama.cpp matches transformers' fp32 logits
within 1e-4 (tests/test_gguf.py, tiny models; measured 1e-6 to 4e-6): F32 KV cache and flash
attention off. Without it the KV cache is F16,
as llama.cpp users run it.

`max_batch=N` lets `generate_batch` decode up to N sequences together: one llama_batch holds
every prompt (distinct seq ids), then each step holds one token per live sequence. The
sequences share the context's KV cells (kv_unified: no more memory than one sequence), so a
group holds as many prompts as fit n_ctx with their generation budgets. Greedy output is the
same as one at a time up to float rounding: llama.cpp multiplies several rows with another
kernel than one row (its sgemm only takes 2+ rows), so logits differ in the last bits (up to
4e-3 measured, F16 KV cache) and a near-tie between the top two tokens can flip
(tests/test_translate_text.py, bench/translate_bench.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.backends.base import GREEDY, Backend, Sampling
from runtime.errors import BackendError
from runtime.schema import ExportConfig

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_N_CTX = 2048
MAX_SEQUENCES = 64  # per context; llama.cpp allows 256 (LLAMA_MAX_SEQ), more buys nothing on a CPU


_LOG_CALLBACK = None  # keeps the ctypes callback alive while llama.cpp holds it
_ERRORS: deque[str] = deque(maxlen=4)  # llama.cpp's last error lines, quoted in our errors
GGML_LOG_LEVEL_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


def _last_llama_error() -> str:
    """The most telling recent llama.cpp error line ('' if none)."""
    for line in reversed(_ERRORS):
        if "error loading model" in line or "check_tensor" in line:
            return line.split("error loading model:", 1)[-1].strip()
    return _ERRORS[-1] if _ERRORS else ""


def _route_llama_log(llama_cpp) -> None:
    """llama.cpp's own log goes to this module's logger at debug level (-vv shows it), not to
    stderr: its warnings are about internals, and our errors are raised as BackendError."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        line = text.decode("utf-8", "replace").rstrip()
        if level == GGML_LOG_LEVEL_ERROR and line:
            _ERRORS.append(line)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("llama.cpp: %s", line)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def llama_module():
    """llama-cpp-python's low-level ctypes binding (`llama_cpp.llama_cpp`): the C API is all the
    runtime uses. Importing the package would also run its high-level half (Llama, chat formats,
    diskcache, ...): 2.6 MiB of RSS on every start, and 52 ms against 8 ms for the import itself
    (warm, numpy already loaded; bench/runtime_baseline_bench.py)."""
    module = sys.modules.get("llama_cpp.llama_cpp")
    if module is None:
        try:
            module = _import_low_level()
        except ImportError as exc:  # pragma: no cover - base dependency
            raise BackendError(f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python") from None
    _route_llama_log(module)
    return module


def _import_low_level():
    """Import `llama_cpp.llama_cpp` without executing the package's __init__: a stand-in package
    object is registered only for the import, then removed, so a later `import llama_cpp` runs
    the real __init__, which reuses the binding already loaded (one copy of the library)."""
    import importlib
    import importlib.util

    if "llama_cpp" in sys.modules:
        return importlib.import_module("llama_cpp.llama_cpp")
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        raise ImportError("No module named 'llama_cpp'")
    stand_in = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = stand_in
    try:
        return importlib.import_module("llama_cpp.llama_cpp")
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]


def check_gguf_header(path: Path) -> None:
    """Refuse what is not a GGUF file before llama.cpp sees it (its errors are not user-facing)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise BackendError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BackendError(f"{path}: is a directory, expected a .gguf file") from None
    if magic != GGUF_MAGIC:
        raise BackendError(f"{path}: not a GGUF file (magic {magic!r}); export it with `packager export gguf`")


class _Model:
    """Owns a llama_model pointer."""

    def __init__(self, path: Path, *, vocab_only: bool = False):
        llama_cpp = llama_module()
        check_gguf_header(path)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        params.use_mmap = True
        _ERRORS.clear()
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self.ptr:
            reason = _last_llama_error()
            raise BackendError(
                f"{path}: llama.cpp could not load this GGUF ({reason or 'truncated, corrupt, or an unknown architecture'}); "
                f"re-export it with `packager export gguf`"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def metadata(self) -> dict[str, str]:
        llama_cpp = llama_module()
        out = {}
        buf = ctypes.create_string_buffer(1 << 20)
        for i in range(llama_cpp.llama_model_meta_count(self.ptr)):
            n = llama_cpp.llama_model_meta_key_by_index(self.ptr, i, buf, len(buf))
            key = buf.value[:n].decode("utf-8", "replace") if n >= 0 else ""
            n = llama_cpp.llama_model_meta_val_str_by_index(self.ptr, i, buf, len(buf))
            out[key] = buf.raw[: min(n, len(buf) - 1)].decode("utf-8", "replace") if n >= 0 else ""
        return out

    def free(self) -> None:
        if self.ptr:
            llama_module().llama_model_free(self.ptr)
            self.ptr = None


class LlamaCppBackend(Backend):
    format = "gguf"

    def __init__(
        self,
        model_path: Path,
        config: ExportConfig,
        n_threads: int | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        parity: bool = False,
        flash_attn: bool = False,
        max_batch: int = 1,
    ):
        super().__init__(config, n_threads=n_threads or max(1, os.cpu_count() or 1))
        llama_cpp = llama_module()
        self.path = Path(model_path)
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = min(max_batch, MAX_SEQUENCES)  # larger batches go in groups
        self._model = _Model(self.path)
        self._ctx = None
        self._batch = None
        train_ctx = llama_cpp.llama_model_n_ctx_train(self._model.ptr)
        self._n_ctx = min(n_ctx, train_ctx) if train_ctx > 0 else n_ctx

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self._n_ctx
        params.n_batch = self._n_ctx  # a whole group of prompts in one llama_decode call
        params.n_ubatch = min(512, self._n_ctx)
        # the sequences of a batch share the n_ctx cells (split streams would need n_ctx each)
        params.n_seq_max = self.max_batch
        params.kv_unified = self.max_batch > 1  # one sequence: the same single stream either way
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn and not parity else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if parity:
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        self._ctx = llama_cpp.llama_init_from_model(self._model.ptr, params)
        if not self._ctx:
            self.close()
            raise BackendError(f"{self.path}: llama.cpp could not create a context (n_ctx={self._n_ctx}); try a smaller context")
        self._batch = llama_cpp.llama_batch_init(self._n_ctx, 0, 1)
        self._n_past = 0
        logger.debug("llama.cpp: %s loaded, n_ctx=%d, parity=%s", self.path, self._n_ctx, parity)

    # -- primitives --------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    def metadata(self) -> dict[str, str]:
        return self._model.metadata()

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return tokenize_with(self._model, text, special=special)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        llama_cpp = llama_module()
        pieces = bytearray()
        buf = ctypes.create_string_buffer(256)
        for token in token_ids:
            n = llama_cpp.llama_token_to_piece(self._model.vocab, int(token), buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._model.vocab, int(token), buf, len(buf), 0, False)
            pieces += buf.raw[:n]
        return pieces.decode("utf-8", errors="replace")

    def _clear(self) -> None:
        llama_cpp = llama_module()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0

    def _submit(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                wanted: Sequence[bool]) -> np.ndarray:
        """One llama_decode of tokens (each with its position and sequence id); the logits of the
        `wanted` entries, in order."""
        llama_cpp = llama_module()
        vocab_bad = [t for t in tokens if not 0 <= int(t) < self.n_vocab]
        if vocab_bad:
            raise BackendError(f"token id(s) {vocab_bad[:5]} outside the vocabulary of {self.n_vocab}")
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, want) in enumerate(zip(tokens, positions, seqs, wanted)):
            batch.token[i] = int(token)
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want else 0
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise BackendError(f"{self.path}: llama_decode failed with code {rc}")
        rows = [i for i, want in enumerate(wanted) if want]
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for row, i in enumerate(rows):
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
            out[row] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def _decode(self, token_ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Append tokens to sequence 0; logits of every new position or of the last one."""
        if self._n_past + len(token_ids) > self._n_ctx:
            raise BackendError(f"sequence of {self._n_past + len(token_ids)} tokens exceeds the context of {self._n_ctx}")
        n = len(token_ids)
        out = self._submit(token_ids, range(self._n_past, self._n_past + n), [0] * n,
                           [all_logits or i == n - 1 for i in range(n)])
        self._n_past += n
        return out

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("logits of an empty sequence")
        self._clear()
        return self._decode(list(token_ids), all_logits=True)

    def _start(self, token_ids: Sequence[int]) -> np.ndarray:
        self._clear()
        return self._decode(list(token_ids), all_logits=False)[0]

    def _step(self, token_id: int) -> np.ndarray:
        return self._decode([token_id], all_logits=False)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                       sampling: Sampling = GREEDY) -> list[list[int]]:
        """Prompts decoded together in groups (see the module doc): in order, up to `max_batch`
        per group and as many as fit the context with their whole generation budget."""
        if self.max_batch == 1 or len(prompts) <= 1:
            return super().generate_batch(prompts, budgets, sampling)
        out: list[list[int]] = []
        start = 0
        while start < len(prompts):
            end, used = start, 0
            while end < len(prompts) and end - start < self.max_batch:
                need = len(prompts[end]) + max(0, min(budgets[end], self._n_ctx - len(prompts[end])))
                if end > start and used + need > self._n_ctx:
                    break
                used += need
                end += 1
            out += self._generate_group(prompts[start:end], budgets[start:end], sampling)
            start = end
        return out

    def _generate_group(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                        sampling: Sampling) -> list[list[int]]:
        """`generate_ids` for each prompt (same stops, budgets and per-prompt random stream),
        prompt i in sequence i: every prompt in one batch, then one token per live sequence."""
        limits, rngs, outputs = self._group_start(prompts, budgets, sampling)
        stop = self.stop_ids
        self._clear()  # the next _start clears again: sequence 0 is one of ours meanwhile
        live = [seq for seq, limit in enumerate(limits) if limit > 0]
        tokens, positions, seqs, wanted = [], [], [], []
        for seq in live:
            n = len(prompts[seq])
            tokens += prompts[seq]
            positions += range(n)
            seqs += [seq] * n
            wanted += [False] * (n - 1) + [True]
        started = time.perf_counter()
        logits = self._submit(tokens, positions, seqs, wanted) if live else None
        self.timings.prefill_seconds += time.perf_counter() - started
        self.timings.prefill_tokens += len(tokens)
        while live:
            going = self._group_step(logits, live, sampling, rngs, stop, outputs, limits)
            if not going:
                break
            live = [live[row] for row in going]
            started = time.perf_counter()
            logits = self._submit([outputs[s][-1] for s in live], [len(prompts[s]) + len(outputs[s]) - 1 for s in live],
                                  live, [True] * len(live))
            self.timings.decode_seconds += time.perf_counter() - started
            self.timings.decode_tokens += len(live)
        return outputs

    def close(self) -> None:
        llama_cpp = llama_module()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self._model.free()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def tokenize_with(model: _Model, text: str, *, special: bool) -> list[int]:
    llama_cpp = llama_module()
    data = text.encode("utf-8")
    capacity = len(data) + 8
    tokens = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(model.vocab, data, len(data), tokens, capacity, False, special)
    if n < 0:
        capacity = -n
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(model.vocab, data, len(data), tokens, capacity, False, special)
        if n < 0:
            raise BackendError(f"llama.cpp failed to tokenize {text[:40]!r}")
    return list(tokens[:n])


def read_gguf_metadata(path: str | Path) -> dict[str, str]:
    """All metadata of a GGUF as strings (arrays are summarised by llama.cpp), vocab-only load."""
    model = _Model(Path(path), vocab_only=True)
    try:
        return model.metadata()
    finally:
        model.free()


def file_type_name(file_type: str | None) -> str:
    """llama.cpp's file type number as the quantizer names it ("1" -> "F16", "7" -> "Q8_0"),
    so a bare GGUF compares with the exports of the same type."""
    llama_cpp = llama_module()
    for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
        for name in dir(llama_cpp):
            if name.startswith(prefix) and str(getattr(llama_cpp, name)) == str(file_type).strip():
                return name[len(prefix):]
    return "unknown" if file_type is None else str(file_type)


def config_from_gguf(path: str | Path) -> ExportConfig:
    """An ExportConfig for a bare .gguf (no export JSON beside it), from its own metadata."""
    path = Path(path)
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    template = meta.get("tokenizer.chat_template")
    if not arch or not template:
        raise BackendError(
            f"{path}: GGUF has no {'general.architecture' if not arch else 'tokenizer.chat_template'}; "
            f"re-export it with `packager export gguf` or put its export config beside it"
        )
    model = _Model(path, vocab_only=True)
    try:
        llama_cpp = llama_module()
        buf = ctypes.create_string_buffer(512)

        def text_of(token: int) -> str:
            n = llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
            return buf.raw[:max(n, 0)].decode("utf-8", "replace")

        eos = llama_cpp.llama_vocab_eos(model.vocab)
        stop = [text_of(eos)] if eos >= 0 else []
        bos = llama_cpp.llama_vocab_bos(model.vocab)
        special = {"eos": text_of(eos)} if eos >= 0 else {}
        if bos >= 0:
            special["bos"] = text_of(bos)
    finally:
        model.free()
    if not stop:
        raise BackendError(f"{path}: GGUF defines no end-of-sequence token; re-export it with `packager export gguf`")
    n_layers = int(meta.get(f"{arch}.block_count", "0"))
    n_dense = int(meta.get(f"{arch}.leading_dense_block_count", "0"))
    n_experts = int(meta.get(f"{arch}.expert_count", "0"))
    top_k = int(meta.get(f"{arch}.expert_used_count", "1"))
    if n_experts <= 0 or n_layers <= 0:
        raise BackendError(f"{path}: GGUF is not a mixture-of-experts model ({arch}.expert_count missing)")
    return ExportConfig(
        format="gguf",
        model_files=[path.name],
        family=arch,
        prompt_template=template,
        stop_tokens=stop,
        special_tokens=special,
        top_k=top_k,
        n_experts={layer_idx: n_experts for layer_idx in range(n_dense, n_layers)},
        quantization={"type": file_type_name(meta.get("general.file_type"))},
        parent_fingerprint=meta.get("packager.parent_fingerprint") or None,
        provenance={"source": "GGUF metadata (no export config beside the file)"},
    )
