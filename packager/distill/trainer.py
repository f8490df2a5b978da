"""Training: a full fine-tune of the pruned model, resumable.

Every parameter is trained (embeddings, attention, norms, routers, kept experts, LM head); nothing
is frozen and no load-balancing loss is added. Loss = token-level cross-entropy on the target tokens
only (prompt and padding masked), AdamW, linear warmup then cosine decay over the step or time
budget. Training stops at the step or time budget, or when the dev loss has not improved for
`patience` evaluations, and the model is left holding the weights with the best dev loss.

The state (weights, AdamW moments, best weights, counters) is saved as safetensors plus JSON in a
work directory at intervals and on interruption; a re-run with the same inputs continues from it.
No pickle anywhere."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

from packager.batching import collate, token_batches
from packager.core.checkpoint import safetensors_write_errors
from packager.distill.settings import DistillSettings

if TYPE_CHECKING:
    from packager.distill.targets import Sample

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
WEIGHTS_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"


class Example(NamedTuple):  # a tuple, as packager.batching takes it
    ids: list[int]
    prompt_len: int


def build_examples(samples: list[Sample], prompts: list[list[int]], eos_id: int, max_tokens: int) -> tuple[list[Example], dict]:
    examples, dropped = [], {"too_long": 0}
    for sample, prompt in zip(samples, prompts):
        ids = prompt + sample.target_ids
        if len(ids) > max_tokens:
            dropped["too_long"] += 1
            continue
        examples.append(Example(ids, len(prompt)))
    return examples, dropped


def batch_loss(model, ids, labels, mask):
    """(sum of target-token cross-entropy, number of target tokens)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def mean_loss(model, examples: list[Example], pad_id: int, batch_tokens: int, device: str = "cpu") -> float:
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = token_batches(examples, batch_tokens, random.Random(0))
    with torch.no_grad():
        for batch in batches:
            loss, n = batch_loss(model, *collate(examples, batch, pad_id, device))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def lr_at(step: int, progress: float, settings: DistillSettings, warmup: int) -> float:
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return settings.lr * (0.1 + 0.9 * cosine)


class WorkDir:
    """Resumable training state: weights, AdamW moments, best weights, counters (no pickle)."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        self.key = json.loads(json.dumps(key))  # as stored (tuples become lists)

    def load(self, model, optimizer) -> dict | None:
        import torch
        from safetensors.torch import load_file, load_model

        state_file = self.path / STATE_NAME
        if not state_file.is_file():
            return None
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: unreadable (%s); starting over", state_file, exc)
            return None
        if state.get("key") != self.key:
            logger.warning("%s holds a run with other inputs or settings; starting over", self.path)
            return None
        load_model(model, str(self.path / WEIGHTS_NAME), device=str(next(model.parameters()).device))
        moments = load_file(str(self.path / OPTIMIZER_NAME), device=str(next(model.parameters()).device))
        for name, param in model.named_parameters():
            if f"{name}::exp_avg" in moments:
                optimizer.state[param] = {"step": torch.tensor(float(state["adam_step"][name])),
                                          "exp_avg": moments[f"{name}::exp_avg"],
                                          "exp_avg_sq": moments[f"{name}::exp_avg_sq"]}
        return state

    def save(self, model, optimizer, state: dict) -> None:
        from safetensors.torch import save_file, save_model

        from runtime.atomic import atomic_output, atomic_write_json

        self.path.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in model.named_parameters()}
        moments, steps = {}, {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                st = optimizer.state.get(param)
                if st:
                    moments[f"{names[id(param)]}::exp_avg"] = st["exp_avg"].contiguous()
                    moments[f"{names[id(param)]}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                    steps[names[id(param)]] = float(st["step"])
        with atomic_output(self.path / OPTIMIZER_NAME) as tmp_moments, atomic_output(self.path / WEIGHTS_NAME) as tmp_weights:
            with safetensors_write_errors():
                save_model(model, str(tmp_weights))
                save_file(moments, str(tmp_moments))
        atomic_write_json(self.path / STATE_NAME, {**state, "key": self.key, "adam_step": steps})

    def save_best(self, model) -> None:
        from safetensors.torch import save_model

        from runtime.atomic import atomic_output

        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path / BEST_NAME) as tmp, safetensors_write_errors():
            save_model(model, str(tmp))

    def load_best(self, model) -> bool:
        from safetensors.torch import load_model

        best = self.path / BEST_NAME
        if not best.is_file():
            return False
        load_model(model, str(best), device=str(next(model.parameters()).device))
        return True



class _Run:
    """One training run's model, optimizer, counters and budget (the loop of `train`, in steps)."""

    def __init__(self, model, train_set: list[Example], dev_set: list[Example], pad_id: int,
                 settings: DistillSettings, work: WorkDir):
        import torch

        self.model, self.train_set, self.dev_set, self.pad_id = model, train_set, dev_set, pad_id
        self.settings, self.work = settings, work
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=(0.9, 0.98),
                                           weight_decay=settings.weight_decay)
        self.state: dict = {}
        self.budget_seconds = settings.minutes * 60 if settings.minutes is not None else None
        self.warmup = min(settings.warmup_steps, max(1, (settings.max_steps or 10**9) // 10))
        self.running, self.running_n = 0.0, 0

    def mean_loss(self, examples: list[Example]) -> float:
        return mean_loss(self.model, examples, self.pad_id, self.settings.batch_tokens, self.settings.device)

    def start(self, probe_set: list[Example]) -> int | None:
        """Resume from the work directory, or measure the initial losses; the step resumed from."""
        self.state = self.work.load(self.model, self.optimizer)
        if self.state is not None:
            logger.info("resuming distillation at step %d (%.1f min)", self.state["step"], self.state["elapsed"] / 60)
            return self.state["step"]
        dev0, probe0 = self.mean_loss(self.dev_set), self.mean_loss(probe_set)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "tokens": 0, "best_dev_loss": dev0,
                      "best_step": 0, "bad_evals": 0, "dev_loss_initial": dev0, "probe_loss_initial": probe0,
                      "history": [{"step": 0, "dev_loss": dev0, "train_loss": None, "elapsed": 0.0}], "stopped": None}
        self.work.save_best(self.model)
        self.work.save(self.model, self.optimizer, self.state)
        return None

    def progress(self) -> float:
        parts = []
        if self.settings.max_steps:
            parts.append(self.state["step"] / self.settings.max_steps)
        if self.budget_seconds:
            parts.append(self.state["elapsed"] / self.budget_seconds)
        return max(parts)

    def out_of_budget(self) -> bool:
        return self.progress() >= 1.0 or self.state["stopped"] is not None

    def step(self, batch: list[int]) -> float:
        """One optimizer step on `batch`; its mean loss."""
        import torch

        state, started = self.state, time.monotonic()
        lr = lr_at(state["step"], self.progress(), self.settings, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids, labels, mask = collate(self.train_set, batch, self.pad_id, self.settings.device)
        loss_sum, n_tokens = batch_loss(self.model, ids, labels, mask)
        loss = loss_sum / max(n_tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["batch"] += 1
        state["step"] += 1
        state["tokens"] += int(mask.sum())
        state["elapsed"] += time.monotonic() - started
        self.running += float(loss.detach()) * n_tokens
        self.running_n += n_tokens
        return float(loss.detach())

    def evaluate(self) -> None:
        """Dev loss into the history; keep the best weights; stop after `patience` bad evaluations."""
        state, started = self.state, time.monotonic()
        dev = self.mean_loss(self.dev_set)
        state["history"].append({"step": state["step"], "dev_loss": dev, "train_loss": self.running / max(self.running_n, 1),
                                 "elapsed": round(state["elapsed"], 2)})
        self.running, self.running_n = 0.0, 0
        if dev < state["best_dev_loss"]:
            state.update(best_dev_loss=dev, best_step=state["step"], bad_evals=0)
            self.work.save_best(self.model)
        else:
            state["bad_evals"] += 1
            if state["bad_evals"] >= self.settings.patience:
                state["stopped"] = f"dev loss did not improve for {self.settings.patience} evaluations"
        state["elapsed"] += time.monotonic() - started

    def save(self) -> None:
        self.work.save(self.model, self.optimizer, self.state)


def train(model, train_set: list[Example], dev_set: list[Example], probe_set: list[Example], pad_id: int,
          settings: DistillSettings, work: WorkDir, bar=None, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune `model` in place; on return it holds the best weights. Returns the run record."""
    import torch

    torch.manual_seed(settings.seed)
    model.train()
    run = _Run(model, train_set, dev_set, pad_id, settings, work)
    resumed_from = run.start(probe_set)
    state = run.state
    last_save = time.monotonic()
    task = bar.add_task("distill", total=1000) if bar is not None else None
    try:
        while not run.out_of_budget():
            batches = token_batches(train_set, settings.batch_tokens, random.Random(f"{settings.seed}:{state['epoch']}"))
            while state["batch"] < len(batches) and not run.out_of_budget():
                loss = run.step(batches[state["batch"]])
                if state["step"] % settings.eval_every == 0 or run.out_of_budget():
                    run.evaluate()
                if bar is not None:
                    bar.update(task, completed=int(1000 * min(1.0, run.progress())),
                               description=f"distill step {state['step']} loss {loss:.3f}")
                if on_step is not None:
                    on_step(state["step"], loss)
                if time.monotonic() - last_save > settings.checkpoint_minutes * 60:
                    run.save()
                    last_save = time.monotonic()
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    except KeyboardInterrupt:
        run.save()
        logger.warning("distillation interrupted at step %d; state saved in %s (run again to resume)", state["step"], work.path)
        raise
    if state["stopped"] is None:
        state["stopped"] = "step budget" if settings.max_steps and state["step"] >= settings.max_steps else "time budget"
    run.save()
    work.load_best(model)
    state["probe_loss_final"] = run.mean_loss(probe_set)
    state["resumed_from_step"] = resumed_from
    return state
