"""Calibration (step 1 of the pipeline): run the parent in transformers on translation prompts and
record routing statistics per layer and expert, per direction and span (packager.core.stats).

How a run works:
1. Data: JSONL records {src_lang, tgt_lang, src, tgt} (the harvest format; each record also
   serves the reverse direction), TSV with a header line naming the two column languages, or
   plain text (one source sentence per line, `text_lang` says its language; generation only).
   Each requested direction takes up to `max_sentences` pairs (seeded shuffle).
2. Prompts: the user message is `prompt_template` filled with the source text (placeholders
   {source}, {source_lang}, {target_lang}, {source_name}, {target_name}), rendered through
   the model's chat template (runtime.prompt). Token offsets split the prompt into the
   `prompt` span (template tokens) and the `source` span (tokens overlapping the text).
3. Output: teacher-forced mode appends the reference tokens plus the end token (`target`
   span); generation mode decodes greedily, batched with left padding, at most
   `max_new_tokens`, cut after the first end token (`generated` span).
4. Capture: one forward of the decoder (no LM head, no cache) over prompt + output, with
   forward hooks on every router module the architecture adapter names. A router returns
   (logits, applied top-k weights, top-k indices) in transformers 5; a router that returns
   bare logits is routed with `arch.route`. Routing is causal, so this pass sees exactly the
   routing of generation, at a fraction of its cost. For REAP, a pre-hook on the experts
   module feeds it every (token, chosen expert) row with weight 1 and a post-hook takes the
   row norms, then combines the rows with the real gate weights: the layer output is the
   same (up to summation order) and no expert runs twice.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


# the torch-free pieces shared with the llama.cpp backend (packager.calibrate_gguf), re-exported here
from packager.calibration_data import (  # noqa: F401
    SLOTS, CalibrationError, CalibrationSettings, PromptBuilder, check_prompt_template, read_examples,
)
from packager.core.errors import PackagerError
from packager.core.stats import MODE_SPAN, SEQUENCE, RoutingStats, empty_stats
from packager.core.provenance import versions

logger = logging.getLogger(__name__)

# ---- capture ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    token_group: object  # LongTensor [B*S]: b * 3 + slot, padding -> B * 3
    counts: object       # [B, 4] tokens per (sequence, slot), slot 3 = whole sequence
    keys: object         # LongTensor [B, 4]: pair_pos * 4 + slot
    token_keys: object   # LongTensor [2, B*S]: key of the token's slot and of its sequence (padding -> dummy)


class RoutingRecorder:
    """Forward hooks that accumulate routing statistics of every MoE layer (see module docstring)."""

    def __init__(self, model, arch, config, n_pairs: int, reap: bool, expert_hooks: bool = True):
        """expert_hooks=False: REAP sums are allocated but fed by `add_reap` (a streamed run
        computes expert outputs itself, in expert groups) instead of hooks on the experts."""
        import torch

        self.arch = arch
        self.config = config
        self.layers = arch.moe_layers(config)
        self.routing = [arch.routing_settings(config, layer) for layer in self.layers]  # resolved once: hooks run on every forward pass
        self.n_experts = arch.n_experts(config)
        self.n_keys = n_pairs * len(SLOTS)
        shape = (len(self.layers), self.n_keys + 1, self.n_experts)  # +1: dummy key for padding
        self.mass = torch.zeros(shape, dtype=torch.float64)
        self.selected = torch.zeros(shape, dtype=torch.float64)
        self.reap_sum = torch.zeros(shape, dtype=torch.float64) if reap else None
        self.reap_tokens = torch.zeros(shape, dtype=torch.float64) if reap else None
        self.tokens = torch.zeros(self.n_keys + 1, dtype=torch.float64)
        self.sequences = torch.zeros(self.n_keys + 1, dtype=torch.float64)
        self.batch: Batch | None = None
        self.hook_seconds = 0.0  # time spent inside the hooks (the capture's own cost)
        self._pending: dict[int, tuple] = {}
        self.handles = []
        for pos, layer_idx in enumerate(self.layers):
            router = model.get_submodule(arch.router_module(layer_idx))
            self.handles.append(router.register_forward_hook(self._router_hook(pos)))
            if reap and expert_hooks:
                experts = model.get_submodule(arch.experts_module(layer_idx))
                self.handles.append(experts.register_forward_pre_hook(self._experts_pre_hook(pos), with_kwargs=True))
                self.handles.append(experts.register_forward_hook(self._experts_hook(pos)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def set_batch(self, slots, pair_pos) -> None:
        """slots: LongTensor [B, S] (0 prompt, 1 source, 2 output, -1 padding); pair_pos: [B]."""
        self.batch = self.make_batch(slots, pair_pos)

    def make_batch(self, slots, pair_pos) -> Batch:
        """The bookkeeping of one batch; counts its tokens and sequences once (a streamed run
        reuses the Batch for every layer)."""
        import torch

        n_seq = slots.shape[0]
        valid = slots >= 0
        group = torch.where(valid, torch.arange(n_seq).unsqueeze(1) * 3 + slots, torch.full_like(slots, n_seq * 3))
        per_slot = torch.bincount(group.reshape(-1), minlength=n_seq * 3 + 1)[:-1].view(n_seq, 3).double()
        counts = torch.cat([per_slot, per_slot.sum(1, keepdim=True)], dim=1)
        keys = pair_pos.unsqueeze(1) * len(SLOTS) + torch.arange(len(SLOTS))
        dummy = torch.full_like(slots, self.n_keys)
        slot_key = torch.where(valid, pair_pos.unsqueeze(1) * len(SLOTS) + slots, dummy)
        seq_key = torch.where(valid, (pair_pos * len(SLOTS) + len(SLOTS) - 1).unsqueeze(1).expand_as(slots), dummy)
        batch = Batch(group.reshape(-1), counts, keys, torch.stack([slot_key.reshape(-1), seq_key.reshape(-1)]))
        present = counts > 0
        self.tokens.index_add_(0, keys[present], counts[present])
        self.sequences.index_add_(0, keys[present], torch.ones_like(counts[present]))
        return batch

    def _routing(self, output, pos: int):
        if isinstance(output, tuple) and len(output) == 3:
            _, weights, idx = output
            return idx, weights
        # a router that returns bare logits: route at the layer's own top-k
        idx, weights = self.arch.route(output, self.config, settings=self.routing[pos])
        return idx.reshape(-1, idx.shape[-1]), weights.reshape(-1, weights.shape[-1])

    def _router_hook(self, pos: int):
        import torch

        def hook(module, args, output):
            if self.batch is None:
                return
            started = time.perf_counter()
            idx, weights = self._routing(output, pos)
            batch = self.batch
            idx, weights = idx.cpu(), weights.float().cpu()  # statistics live on the CPU whatever the device
            normalised = weights / weights.sum(dim=-1, keepdim=True)
            n_tokens, n_experts = idx.shape[0], self.n_experts
            per_token = torch.zeros(n_tokens, 2 * n_experts)
            per_token.scatter_(1, idx, normalised)
            per_token.scatter_(1, idx + n_experts, 1.0)
            n_seq = batch.counts.shape[0]
            grouped = torch.zeros(n_seq * 3 + 1, 2 * n_experts).index_add_(0, batch.token_group, per_token)[:-1]
            grouped = grouped.view(n_seq, 3, 2 * n_experts)
            grouped = torch.cat([grouped, grouped.sum(dim=1, keepdim=True)], dim=1).double()
            present = batch.counts > 0
            keys = batch.keys[present]
            means = grouped[..., :n_experts][present] / batch.counts[present].unsqueeze(1)
            self.mass[pos].index_add_(0, keys, means)
            self.selected[pos].index_add_(0, keys, grouped[..., n_experts:][present])
            self.hook_seconds += time.perf_counter() - started

        return hook

    def _experts_pre_hook(self, pos: int):
        import torch

        def hook(module, args, kwargs):
            if self.batch is None:
                return None
            started = time.perf_counter()
            hidden, idx, weights = args[0], args[1], args[2]
            top_k = idx.shape[-1]
            idx, weights = idx.reshape(-1, top_k), weights.reshape(-1, top_k)
            self._pending[pos] = (idx, weights, hidden.shape)
            rows = hidden.reshape(-1, hidden.shape[-1]).repeat_interleave(top_k, dim=0)
            row_idx = idx.reshape(-1, 1)
            ones = torch.ones(row_idx.shape, dtype=weights.dtype, device=weights.device)
            self.hook_seconds += time.perf_counter() - started
            return (rows, row_idx, ones), kwargs

        return hook

    def _experts_hook(self, pos: int):
        import torch

        def hook(module, args, output):
            if self.batch is None or pos not in self._pending:
                return None
            started = time.perf_counter()
            idx, weights, hidden_shape = self._pending.pop(pos)
            n_tokens, top_k = idx.shape
            rows = output.view(n_tokens, top_k, -1)
            token_idx = torch.arange(n_tokens).repeat_interleave(top_k)
            self.add_reap(pos, token_idx, idx.reshape(-1), weights.reshape(-1), rows.reshape(n_tokens * top_k, -1))
            combined = (rows * weights.unsqueeze(-1).to(rows.dtype)).sum(dim=1).reshape(hidden_shape)
            self.hook_seconds += time.perf_counter() - started
            return combined

        return hook

    def add_reap(self, pos: int, token_idx, expert_idx, weights, outputs) -> None:
        """REAP sums of (token, expert) rows of the current batch: gate weight x ||expert output||.
        token_idx, expert_idx, weights: [R]; outputs: [R, H] unweighted expert outputs."""
        import torch

        terms = (weights.float() * outputs.float().norm(dim=-1)).double().cpu()
        token_idx, expert_idx = token_idx.cpu(), expert_idx.cpu()
        for keys in self.batch.token_keys:
            flat = keys[token_idx] * self.n_experts + expert_idx
            self.reap_sum[pos].view(-1).index_add_(0, flat, terms)
            self.reap_tokens[pos].view(-1).index_add_(0, flat, torch.ones_like(terms))

    def to_stats(self, stats: RoutingStats, pair_slugs: Sequence[str], output_span: str) -> None:
        from packager.calibration_data import add_span_stats

        reap = None if self.reap_sum is None else self.reap_sum.numpy()
        add_span_stats(stats, pair_slugs, output_span, mass=self.mass.numpy(), selected=self.selected.numpy(),
                       tokens=self.tokens.numpy(), sequences=self.sequences.numpy(), reap=reap,
                       reap_tokens=None if reap is None else self.reap_tokens.numpy())


# ---- model -----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object          # a transformers causal LM, or None when the run streams layers from disk
    tokenizer: object
    config: dict
    arch: object
    model_dir: Path
    fingerprint: str
    eos_id: int
    pad_id: int
    device: str = "cpu"


def load_tokenizer(model_dir: Path, dtype: str = "float32") -> LoadedModel:
    """Everything calibration needs from `model_dir` except the weights (model=None)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from packager.core.arch import load_arch
    from packager.core.checkpoint import CheckpointReader
    from packager.core.fingerprint import model_fingerprint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(f"{model_dir}: no config.json: give a Hugging Face save_pretrained directory")
    reader = CheckpointReader(model_dir)
    try:
        config = dict(reader.config)
        arch = load_arch(config)
        fingerprint = model_fingerprint(reader)
    finally:
        reader.close()
    if not arch.is_uniform(config):
        raise CalibrationError(f"{model_dir}: expert counts differ between layers (a pruned model): calibrate the parent")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CalibrationError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{model_dir}: cannot load the tokenizer ({exc}): save it next to the model") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationError(f"{model_dir}: needs a fast tokenizer (tokenizer.json) for token offsets")
    eos_id = None
    if (model_dir / "generation_config.json").is_file():
        eos_id = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos_id is None:
        eos_id = config.get("eos_token_id", tokenizer.eos_token_id)
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is None:
        raise CalibrationError(f"{model_dir}: no end-of-sequence token in the tokenizer or generation config")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    del torch
    return LoadedModel(None, tokenizer, config, arch, model_dir, fingerprint, int(eos_id), int(pad_id))


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """The whole parent in memory on `device` (plus tokenizer and facts)."""
    import torch
    import transformers

    from packager.core.execution import torch_dtype
    from packager.core.pruned_model import load_pruned

    loaded = load_tokenizer(model_dir, dtype)
    transformers.utils.logging.disable_progress_bar()  # our own progress bar covers the run
    # load_pruned: plain from_pretrained plus MXFP4 experts dequantised where transformers needs that
    model = load_pruned(loaded.model_dir, dtype=torch_dtype(dtype), trust_remote_code=False, use_safetensors=True)
    model.eval()
    if device != "cpu":
        model.to(device)
    loaded.model, loaded.device = model, device
    del torch
    return loaded


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_outputs(loaded: LoadedModel, prompts: list[list[int]], settings: CalibrationSettings, progress=None) -> list[list[int]]:
    """Greedy, batched (left padding, similar lengths together), bounded, cut after the end token."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outputs: list[list[int]] = [[] for _ in prompts]
    for batch in _batches(order, settings.batch_size):
        longest = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), longest), loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]):] = 1
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                        max_new_tokens=settings.max_new_tokens,
                                        do_sample=False, num_beams=1, eos_token_id=loaded.eos_id,
                                        pad_token_id=loaded.pad_id, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            if loaded.eos_id in new:
                new = new[:new.index(loaded.eos_id) + 1]
            outputs[i] = new
        if progress is not None:
            progress(len(batch))
    return outputs


def gguf_generate_outputs(gguf_path: Path, loaded: LoadedModel, prompts: list[list[int]], settings: CalibrationSettings,
                          progress=None) -> list[list[int]]:
    """The same greedy translations from a GGUF of the parent in llama.cpp: one sequence at a
    time, the prompt token ids of the HF tokenizer fed as they are (the GGUF carries the same
    vocabulary), cut after the end token like generate_outputs."""
    from converters.gguf.gguf_file import gguf_fingerprint
    from runtime.backends.llama_cpp_backend import LlamaCppBackend, check_gguf_header, config_from_gguf
    from runtime.errors import BackendError

    gguf_path = Path(gguf_path)
    try:
        check_gguf_header(gguf_path)
        from gguf import GGUFReader

        fingerprint = gguf_fingerprint(GGUFReader(str(gguf_path)), gguf_path)
    except (BackendError, PackagerError, ValueError, OSError) as exc:
        raise CalibrationError(f"--generator {gguf_path}: {exc}") from None
    if fingerprint != loaded.fingerprint:
        raise CalibrationError(f"--generator {gguf_path}: a GGUF of another model (fingerprint {fingerprint[:12]}, "
                               f"the parent's is {loaded.fingerprint[:12]}): export the parent itself to GGUF")
    longest = max(len(p) for p in prompts) + settings.max_new_tokens + 1
    backend = LlamaCppBackend(gguf_path, config_from_gguf(gguf_path), n_ctx=max(64, longest))
    outputs = []
    try:
        for prompt in prompts:
            new = list(backend.generate_ids(prompt, max_new_tokens=settings.max_new_tokens, stop_ids={loaded.eos_id}))
            if len(new) < settings.max_new_tokens:  # stopped by the end token (not yielded)
                new.append(loaded.eos_id)
            outputs.append(new)
            if progress is not None:
                progress(1)
    finally:
        backend.close()
    return outputs


def _sequence_batches(loaded: LoadedModel, sequences: list[tuple[list[int], list[int], int]], batch_size: int):
    """Right-padded batches, similar lengths together: (ids, mask, slots, pair positions)."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    for batch in _batches(order, batch_size):
        longest = max(len(sequences[i][0]) for i in batch)
        ids = torch.full((len(batch), longest), loaded.pad_id, dtype=torch.long)
        slots = torch.full((len(batch), longest), -1, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens, token_slots, _ = sequences[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            slots[row, :len(tokens)] = torch.tensor(token_slots)
            mask[row, :len(tokens)] = 1
        yield ids, mask, slots, torch.tensor([sequences[i][2] for i in batch])


def capture(loaded: LoadedModel, recorder: RoutingRecorder, sequences: list[tuple[list[int], list[int], int]],
            batch_size: int, progress=None) -> None:
    """One decoder forward per batch (right padding) with the recorder's hooks active.
    sequences: (token ids, span slots 0/1/2, pair position)."""
    import torch

    decoder = loaded.model.base_model
    for ids, mask, slots, pair_pos in _sequence_batches(loaded, sequences, batch_size):
        recorder.set_batch(slots, pair_pos)
        try:
            with torch.no_grad():
                decoder(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
        finally:
            recorder.batch = None
        if progress is not None:
            progress(len(ids))


def capture_streamed(streamed, loaded: LoadedModel, recorder: RoutingRecorder,
                     sequences: list[tuple[list[int], list[int], int]], settings: CalibrationSettings, progress=None) -> dict:
    """The same capture, one decoder layer at a time from the checkpoint (packager.core.layer_stream)."""
    batches, bookkeeping = [], []
    for ids, mask, slots, pair_pos in _sequence_batches(loaded, sequences, settings.batch_size):
        batches.append((ids, mask))
        bookkeeping.append(recorder.make_batch(slots, pair_pos))

    def before_layer(layer_idx: int, batch_idx: int) -> None:
        recorder.batch = bookkeeping[batch_idx]

    positions = {layer_idx: pos for pos, layer_idx in enumerate(recorder.layers)}

    def expert_rows(layer_idx: int, batch_idx: int, token_idx, expert_idx, weights, outputs) -> None:
        if recorder.reap_sum is not None:
            recorder.batch = bookkeeping[batch_idx]
            recorder.add_reap(positions[layer_idx], token_idx, expert_idx, weights, outputs)

    budget = None if settings.max_activation_mb is None else settings.max_activation_mb * 1024**2
    if budget is None:
        import psutil

        from packager.core.execution import RAM_RESERVE_BYTES

        # what is left once the running weights (one expert group or a layer's other tensors) and a reserve are set aside
        budget = max(0, psutil.virtual_memory().available - streamed.resident_weight_bytes() - RAM_RESERVE_BYTES)
    try:
        report = streamed.run(batches, before_layer, expert_rows=expert_rows, hidden_budget_bytes=budget,
                              spill_dir=Path(settings.spill_dir) if settings.spill_dir else None,
                              progress=(lambda layer_idx, n: progress(1)) if progress else None)
    finally:
        recorder.batch = None
    return report.as_dict()


# ---- generated translations, cached ------------------------------------------------------------------
OUTPUT_CACHE_FORMAT = "calibration-outputs/1"


def output_cache_key(loaded: LoadedModel, data: Sequence[Path], settings: CalibrationSettings, chat_template_sha: str,
                     generator: str) -> dict:
    """What the parent's greedy translations depend on (like distill's parent-output cache)."""
    from packager.core.fingerprint import file_sha256

    return {
        "format": OUTPUT_CACHE_FORMAT,
        "parent_fingerprint": loaded.fingerprint,
        "data_sha256": [file_sha256(p) for p in data],
        "pairs": list(settings.pairs),
        "max_sentences": settings.max_sentences,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "prompt_template": settings.prompt_template,
        "text_lang": settings.text_lang,
        "chat_template_sha256": chat_template_sha,
        "generator": generator,
    }


def parent_translations(loaded: LoadedModel, data: Sequence[Path], flat: list, prompts: list[list[int]],
                        settings: CalibrationSettings, chat_template_sha: str, bar=None) -> tuple[list[list[int]], dict]:
    """The parent's greedy translations of every prompt: from the cache, from the whole model in
    transformers, or from a GGUF of the parent in llama.cpp (streamed runs). Returns the token
    ids and where they came from."""
    from packager.distill.targets import key_digest, load_cached_outputs, write_cached_outputs

    if settings.generator:
        generator = f"llama.cpp:{Path(settings.generator).name}"
    elif loaded.model is not None:
        generator = f"transformers:{settings.dtype}"
    else:
        raise CalibrationError(
            "streamed calibration cannot generate token by token: pass --generator PARENT.gguf (a GGUF of the "
            "parent translates once, then its output is teacher-forced), use --teacher-forced, or --execution whole"
        )
    key = output_cache_key(loaded, data, settings, chat_template_sha, generator)
    cache_file = Path(settings.cache_dir) / f"calibration-outputs-{key_digest(key)[:16]}.jsonl" if settings.cache_dir else None
    examples = [ex for _, ex in flat]
    if cache_file is not None:
        rows = load_cached_outputs(cache_file, key, examples)
        if rows is not None:
            logger.info("parent translations from the cache %s", cache_file)
            return [row["output_ids"] for row in rows], {"generator": generator, "cache": str(cache_file), "cached": True}
    task = bar.add_task("translating (parent)", total=len(prompts)) if bar else None
    advance = (lambda n: bar.advance(task, n)) if bar else None
    started = time.perf_counter()
    if settings.generator:
        outputs = gguf_generate_outputs(Path(settings.generator), loaded, prompts, settings, advance)
    else:
        outputs = generate_outputs(loaded, prompts, settings, advance)
    if cache_file is not None:
        rows = [{"pair": ex.pair, "source": ex.source, "output_ids": out} for ex, out in zip(examples, outputs)]
        write_cached_outputs(cache_file, key, rows, time.perf_counter() - started)
    return outputs, {"generator": generator, "cache": str(cache_file) if cache_file else None, "cached": False}


# ---- the whole run -----------------------------------------------------------------------------------

def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)


def _record_routing(loaded: LoadedModel, execution, sequences: list, settings: CalibrationSettings, bar):
    """Run `sequences` through the model, whole or streamed layer by layer, recording the routing;
    returns the recorder and the streamed run's record (None when whole)."""
    from packager.core.layer_stream import StreamedModel

    if execution.mode == "whole":
        recorder = RoutingRecorder(loaded.model, loaded.arch, loaded.config, len(settings.pairs), settings.reap)
        try:
            task = bar.add_task("recording routing", total=len(sequences)) if bar else None
            capture(loaded, recorder, sequences, settings.batch_size, (lambda n: bar.advance(task, n)) if bar else None)
        finally:
            recorder.remove()
        return recorder, None
    streamed = StreamedModel(loaded.model_dir, settings.dtype, execution.device,
                             expert_group_bytes=settings.expert_group_bytes)
    recorder = RoutingRecorder(streamed.model, loaded.arch, loaded.config, len(settings.pairs), settings.reap,
                               expert_hooks=False)
    try:
        task = bar.add_task("recording routing, layer by layer", total=len(streamed.layers)) if bar else None
        streaming = capture_streamed(streamed, loaded, recorder, sequences, settings,
                                     (lambda n: bar.advance(task, n)) if bar else None)
    finally:
        recorder.remove()
        streamed.close()
    return recorder, streaming


def calibrate(model_dir: str | Path, data: Sequence[str | Path], settings: CalibrationSettings,
              command: str | None = None, show_progress: bool = False, loaded: LoadedModel | None = None) -> RoutingStats:
    """Routing statistics of `model_dir` on `data` for `settings.pairs` (see module docstring).

    The model runs whole in memory or streamed layer by layer from the checkpoint
    (packager.core.execution.choose_execution; `settings.execution` forces either). Both give
    the same statistics; the choice is recorded in the provenance."""
    from packager.core.fingerprint import file_sha256
    from packager.core.execution import Execution, choose_execution

    if not settings.pairs:
        raise CalibrationError("--pairs: give at least one direction, e.g. en-de,de-en")
    if settings.batch_size < 1 or settings.max_new_tokens < 1 or (settings.max_sentences is not None and settings.max_sentences < 1):
        raise CalibrationError("--batch-size, --max-new-tokens and --max-sentences must be at least 1")
    check_prompt_template(settings.prompt_template)
    examples = read_examples([Path(p) for p in data], settings)
    if loaded is not None and loaded.model is not None:
        execution = Execution("whole", loaded.device, "model given in memory", 0, 0, 0)
    else:
        execution = choose_execution(Path(model_dir), settings.dtype, settings.device, settings.execution)
    if loaded is None:
        if execution.mode == "whole":
            loaded = load_model(Path(model_dir), settings.dtype, execution.device)
        else:
            loaded = load_tokenizer(Path(model_dir), settings.dtype)
            loaded.device = execution.device
    builder = PromptBuilder(loaded.model_dir, loaded.tokenizer, settings.prompt_template)
    chat_template_sha = hashlib.sha256(builder.renderer.template_text.encode("utf-8")).hexdigest()

    flat = [(pair_pos, ex) for pair_pos, slug in enumerate(settings.pairs) for ex in examples[slug]]
    encoded = [builder.encode(ex.pair, ex.source) for _, ex in flat]
    bar = _progress_bar(show_progress)
    started = time.perf_counter()
    translations = None
    with bar if bar is not None else contextlib.nullcontext():
        if settings.teacher_forced:
            outputs = [loaded.tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [loaded.eos_id] for _, ex in flat]
        else:
            outputs, translations = parent_translations(loaded, [Path(p) for p in data], flat, [ids for ids, _ in encoded],
                                                        settings, chat_template_sha, bar)
        sequences = [(ids + out, slots + [2] * len(out), pair_pos)
                     for (ids, slots), out, (pair_pos, _) in zip(encoded, outputs, flat)]
        recorder, streaming = _record_routing(loaded, execution, sequences, settings, bar)
    elapsed = time.perf_counter() - started

    arch, config = loaded.arch, loaded.config
    stats = empty_stats({
        "model_fingerprint": loaded.fingerprint,
        "family": arch.family,
        "moe_layers": arch.moe_layers(config),
        "n_experts": arch.n_experts(config),
        "top_k": arch.top_k(config),
        "mode": settings.mode,
        "prompt_template": settings.prompt_template,
        "chat_template_sha256": chat_template_sha,
        "max_new_tokens": None if settings.teacher_forced else settings.max_new_tokens,
        "reap": settings.reap,
    })
    routing = arch.routing_settings(config)
    if routing.kind == "sigmoid_group" and routing.n_group > 1:
        stats.meta["routing_groups"] = {
            "n_group": routing.n_group, "topk_group": routing.topk_group, "group_score_top": routing.group_score_top,
        }
    recorder.to_stats(stats, settings.pairs, MODE_SPAN[settings.mode])
    run_settings = {k: v for k, v in asdict(settings).items() if k not in ("pairs", "cache_dir", "spill_dir")}
    stats.meta["provenance"] = [{
        "command": command,
        "model": {"path": str(loaded.model_dir), "fingerprint": loaded.fingerprint},
        "inputs": [{"path": str(p), "sha256": file_sha256(p)} for p in data],
        "sentences": {slug: len(examples[slug]) for slug in settings.pairs},
        "tokens": {slug: int(stats.get("tokens", slug, SEQUENCE)[0, 0]) for slug in settings.pairs},
        "settings": run_settings,
        "execution": execution.as_dict(),
        "streaming": streaming,
        "translations": translations,
        "versions": versions("torch", "transformers", "safetensors"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 3),
    }]
    return stats
