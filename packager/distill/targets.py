"""Training targets: source sentences, and the parent's translations of them, cached on disk.

With `targets="parent"` the parent translates the sampled source sentences (greedy or beam search,
batched) and the pruned model learns the parent's token ids. The parent's outputs are cached under a
key made of the parent fingerprint, the data files' sha256, the pairs, the sentence count, the
sampling seed and the decoding settings, so re-runs reuse them without loading the parent. Outputs
that a weak parent gets wrong are dropped by the caller (`flagged_outputs` names them)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from packager.distill.settings import DistillError, DistillSettings

logger = logging.getLogger(__name__)

CACHE_FORMAT = "edge-packager-parent-outputs/1"


@dataclass
class Sample:
    pair: str
    source: str
    reference: str | None
    target_ids: list[int] | None = None   # filled from the parent or the reference


def read_sources(data: Sequence[Path], settings: DistillSettings) -> list[Sample]:
    """Seeded sample of at most `settings.sentences` per direction (calibration's reader)."""
    from packager.calibrate import CalibrationError, CalibrationSettings, read_examples

    calib = CalibrationSettings(pairs=settings.pairs, teacher_forced=settings.targets == "references",
                                max_sentences=settings.sentences, seed=settings.seed, text_lang=settings.text_lang)
    try:
        examples = read_examples([Path(p) for p in data], calib)
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    samples = [Sample(ex.pair, ex.source, ex.target) for slug in settings.pairs for ex in examples[slug]]
    samples = [s for s in samples if s.source.strip()]
    if not samples:
        raise DistillError(f"{', '.join(map(str, data))}: no usable source sentences (empty data)")
    return samples


def cache_key(parent_fingerprint: str, data: Sequence[Path], settings: DistillSettings, chat_template_sha: str | None) -> dict:
    from runtime.file_hash import file_sha256

    return {
        "format": CACHE_FORMAT,
        "parent_fingerprint": parent_fingerprint,
        "data_sha256": [file_sha256(p) for p in data],
        "pairs": list(settings.pairs),
        "sentences": settings.sentences,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "dtype": settings.dtype,
        "prompt_template": settings.prompt_template,
        "text_lang": settings.text_lang,
        "chat_template_sha256": chat_template_sha,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def load_cached_outputs(cache_file: Path, key: dict, samples: list[Sample]) -> list[dict] | None:
    """The cached parent outputs for exactly these samples, or None."""
    if not cache_file.is_file():
        return None
    try:
        lines = cache_file.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexError) as exc:
        logger.warning("ignoring unreadable parent-output cache %s (%s)", cache_file, exc)
        return None
    if head.get("key") != key or len(rows) != len(samples):
        logger.warning("parent-output cache %s does not match these inputs; translating again", cache_file)
        return None
    if any(row.get("pair") != s.pair or row.get("source") != s.source for row, s in zip(rows, samples)):
        logger.warning("parent-output cache %s holds other sentences; translating again", cache_file)
        return None
    return rows


def write_cached_outputs(cache_file: Path, key: dict, rows: list[dict], seconds: float) -> None:
    from runtime.atomic import atomic_write_text

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    head = {"key": key, "n": len(rows), "seconds": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = "\n".join(json.dumps(obj, ensure_ascii=False) for obj in [head] + rows) + "\n"
    atomic_write_text(cache_file, text)


def greedy_generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, *, max_new_tokens: int | Callable[[int], int],
                    batch_size: int = 32, num_beams: int = 1, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Batched decoding (left padding, similar prompt lengths together) of token-id prompts.

    `max_new_tokens` is a bound or a function of the longest prompt length in the batch (keeps
    looping outputs of damaged models from costing the full bound). Returns, per prompt,
    {"ids": new token ids cut after the first end token (included), "finished": bool}."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    results: list[dict] = [{} for _ in prompts]
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        bound = max_new_tokens(longest) if callable(max_new_tokens) else max_new_tokens
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, longest - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=bound,
                                 do_sample=False, num_beams=num_beams, eos_token_id=eos_id, pad_token_id=pad_id,
                                 temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            finished = eos_id in new
            if finished:
                new = new[:new.index(eos_id) + 1]
            else:
                while new and new[-1] == pad_id and pad_id != eos_id:
                    new.pop()
            results[i] = {"ids": new, "finished": finished}
        if progress is not None:
            progress(len(batch))
    return results


def _load_parent(parent_dir: Path, dtype: str = "float32"):
    """The parent for translation (a seam: tests assert a cached re-run never calls it)."""
    from packager.calibrate import load_model

    return load_model(parent_dir, dtype)


def parent_outputs(parent_dir: Path, samples: list[Sample], settings: DistillSettings, progress=None) -> list[dict]:
    """Translate every sample with the parent: rows {pair, source, ids, text, finished}."""
    from packager.calibrate import CalibrationError, PromptBuilder

    loaded = _load_parent(parent_dir, settings.dtype)
    if settings.device != "cpu":
        loaded.model.to(settings.device)
    try:
        builder = PromptBuilder(loaded.model_dir, loaded.tokenizer, settings.prompt_template)
        prompts = [builder.encode(s.pair, s.source)[0] for s in samples]
    except CalibrationError as exc:
        raise DistillError(str(exc)) from None
    outputs = greedy_generate(loaded.model, prompts, loaded.eos_id, loaded.pad_id, max_new_tokens=settings.max_new_tokens,
                              batch_size=settings.gen_batch_size, num_beams=settings.num_beams, progress=progress)
    rows = []
    for sample, out in zip(samples, outputs):
        text = loaded.tokenizer.decode(out["ids"], skip_special_tokens=True).strip()
        rows.append({"pair": sample.pair, "source": sample.source, "ids": out["ids"], "text": text, "finished": out["finished"]})
    del loaded
    return rows


def flagged_outputs(samples: list[Sample], rows: list[dict]) -> list[list[str]]:
    """The generation-error kinds of each parent output (packager.quality's detectors, with the
    usual target/source length ratio of each direction taken from its references)."""
    from packager.quality import ErrorDetector, usual_length_ratio
    from runtime.languages import parse_pair

    pairs = {s.pair: parse_pair(s.pair) for s in samples}
    ratios = {}
    for slug, pair in pairs.items():
        with_refs = [s for s in samples if s.pair == slug and s.reference]
        ratios[(pair.src.code, pair.tgt.code)] = usual_length_ratio([s.source for s in with_refs], [s.reference for s in with_refs])
    detector = ErrorDetector(sorted({p.src.code for p in pairs.values()} | {p.tgt.code for p in pairs.values()}), ratios)
    return [detector.detect(s.source, row["text"], pairs[s.pair].src, pairs[s.pair].tgt) if row["text"] else []
            for s, row in zip(samples, rows)]


