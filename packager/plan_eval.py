"""Mask-mode evaluation of plans on a dev split for `packager plan search`: greedy chrF++ and
error rate, and the teacher-forced proxy (KL to the parent, NLL), cached one JSON per cell."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from packager.pair_data import canonical_keep, digest, generation_bound, iter_pair_records, pad_batch
from packager.plan_budgets import SearchError, SearchSettings

CELL_VERSION = 1


# ---- dev data ------------------------------------------------------------------------------------
@dataclass
class DevSegment:
    src: str
    ref: str


def read_dev(path: Path, slugs: Sequence[str], limit: int) -> dict[str, list[DevSegment]]:
    """The first `limit` records per direction of a JSONL dev file; a test-split record is refused."""
    found: dict[str, list[DevSegment]] = {slug: [] for slug in slugs}
    for number, record in iter_pair_records(path, SearchError, "dev"):
        slug, src, ref = f"{record['src_lang']}-{record['tgt_lang']}", record["src"], record["tgt"]
        if record.get("split") == "test":
            raise SearchError(f"{path}:{number}: a test-split record; search on a dev split, never on the test split")
        if slug in found and len(found[slug]) < limit:
            found[slug].append(DevSegment(src, ref))
    empty = [slug for slug, rows in found.items() if not rows]
    if empty:
        raise SearchError(f"{path}: no records for {', '.join(empty)}")
    return found


# ---- evaluation ------------------------------------------------------------------------------------
class Evaluator:
    """Mask-mode scores of plans on the dev set, cached one JSON file per plan and measure."""

    def __init__(self, model_dir: Path, dev_path: Path, settings: SearchSettings, work_dir: Path):
        import torch

        from packager.calibrate import load_model
        from packager.calibration_data import PromptBuilder
        from packager.core.fingerprint import file_sha256

        torch.set_num_threads(settings.threads)
        self.settings, self.work_dir = settings, work_dir
        self.loaded = load_model(model_dir)
        self.fingerprint = self.loaded.fingerprint
        self.builder = PromptBuilder(model_dir, self.loaded.tokenizer, "{source}")
        self.dev_sha = file_sha256(dev_path)
        self.slugs = pack_slugs(settings.langs, settings.direction)
        self.dev = read_dev(dev_path, self.slugs, settings.dev_n)
        self.prompts = {slug: [self.builder.encode(slug, s.src)[0] for s in rows] for slug, rows in self.dev.items()}
        self.computed = self.reused = 0
        self.parent_ids = self._parent_translations()

    def _key(self, what: str, keep: dict | None) -> dict:
        s = self.settings
        return {"v": CELL_VERSION, "what": what, "model": self.fingerprint, "keep": None if keep is None else canonical_keep(keep),
                "dev_sha256": self.dev_sha, "pairs": self.slugs, "n": s.dev_n, "batch": s.batch_size,
                "max_new_tokens": s.max_new_tokens}

    def _cached(self, key: dict, compute: Callable[[], dict]) -> dict:
        from runtime.atomic import atomic_write_json

        path = self.work_dir / "cells" / f"{digest(key)[:40]}.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") == key:
                self.reused += 1
                return data["value"]
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "value": value})
        self.computed += 1
        return value

    def _generate(self, keep: dict | None) -> dict[str, list[list[int]]]:
        from packager.distill import greedy_generate
        from packager.masking import expert_mask

        out = {}
        for slug, prompts in self.prompts.items():
            def run(prompts=prompts):
                return greedy_generate(self.loaded.model, prompts, self.loaded.eos_id, self.loaded.pad_id,
                                       max_new_tokens=generation_bound(self.settings.max_new_tokens), batch_size=self.settings.batch_size)
            if keep is None:
                rows = run()
            else:
                with expert_mask(self.loaded.model, keep):
                    rows = run()
            out[slug] = [r["ids"] for r in rows]
        return out

    def _parent_translations(self) -> dict[str, list[list[int]]]:
        value = self._cached(self._key("parent-ids", None), lambda: {"ids": self._generate(None)})
        return value["ids"]

    def quality(self, keep: dict | None) -> dict:
        """chrF++, BLEU and generation-error rate of greedy translations (mean over directions)."""
        def compute():
            ids = self.parent_ids if keep is None else self._generate(keep)
            return self._score(ids)
        return self._cached(self._key("quality", keep), compute)

    def _score(self, ids: dict[str, list[list[int]]]) -> dict:
        from packager.quality import ErrorDetector, corpus_scores, error_summary, usual_length_ratio

        directions, errors_total, n_total = {}, 0, 0
        langs = sorted({lang for slug in self.slugs for lang in slug.split("-")})
        for slug, rows in ids.items():
            segments = self.dev[slug]
            hyps = [self.loaded.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
            src_lang, tgt_lang = slug.split("-")
            ratio = usual_length_ratio([s.src for s in segments], [s.ref for s in segments])
            detector = ErrorDetector(langs, {(src_lang, tgt_lang): ratio})
            errors = [detector.detect(s.src, h, src_lang, tgt_lang) for s, h in zip(segments, hyps)]
            scores = corpus_scores(hyps, [s.ref for s in segments], tgt_lang)
            rate = error_summary(errors)["rate"]
            directions[slug] = {"chrf++": scores["chrf++"], "bleu": scores["bleu"], "error_rate": rate, "n": len(segments)}
            errors_total += round(rate * len(segments))
            n_total += len(segments)
        return {"chrf++": round(float(np.mean([d["chrf++"] for d in directions.values()])), 2),
                "bleu": round(float(np.mean([d["bleu"] for d in directions.values()])), 2),
                "error_rate": round(errors_total / n_total, 4), "directions": directions}

    def proxy(self, keep: dict) -> dict:
        """Teacher-forced on the parent's translations: mean KL(parent || pruned) and pruned NLL per token."""
        return self._cached(self._key("proxy", keep), lambda: self._proxy(keep))

    def _proxy(self, keep: dict) -> dict:
        import torch

        from packager.masking import expert_mask

        model, pad = self.loaded.model, self.loaded.pad_id
        kl_sum = nll_sum = 0.0
        tokens = 0
        for slug, prompts in self.prompts.items():
            seqs = [(p, o) for p, o in zip(prompts, self.parent_ids[slug]) if o]
            for start in range(0, len(seqs), self.settings.batch_size):
                batch = seqs[start:start + self.settings.batch_size]
                ids, attn = pad_batch([p + o for p, o in batch], pad)
                target = torch.zeros(ids.shape, dtype=torch.bool)
                for row, (p, o) in enumerate(batch):
                    target[row, len(p) - 1:len(p) + len(o) - 1] = True   # positions predicting the output tokens
                labels = torch.roll(ids, -1, dims=1)
                with torch.no_grad():
                    parent = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
                    with expert_mask(model, keep):
                        pruned = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
                p_sel, q_sel = parent[target], pruned[target]
                kl_sum += float((p_sel.exp() * (p_sel - q_sel)).sum())
                nll_sum += float(-q_sel.gather(1, labels[target].unsqueeze(1)).sum())
                tokens += int(target.sum())
        return {"kl": kl_sum / max(tokens, 1), "nll": nll_sum / max(tokens, 1), "tokens": tokens}


def pack_slugs(langs: Sequence[str], direction: str) -> list[str]:
    slugs = []
    for lang in langs:
        if direction in ("en-x", "both"):
            slugs.append(f"en-{lang}")
        if direction in ("x-en", "both"):
            slugs.append(f"{lang}-en")
    return slugs

