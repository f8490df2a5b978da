"""Train the embedded default parent: a small Qwen3-MoE translator, from scratch, on CPU.

Steps (each resumable; state lives under --work, outside git):
  1. byte-level BPE tokenizer on the harvested training split (`tokenizers`), GPT-2 pre-split
     so llama.cpp's `gpt-2` pre-tokenizer reproduces it exactly;
  2. Qwen3MoeForCausalLM trained as a decoder-only translator on all 12 directions
     (en<->de,fr,es,ru,ja,zh), loss on target tokens only, length-bucketed batches,
     AdamW with warmup + cosine driven by elapsed wall time, Switch-style balance loss;
  3. the final weights (bf16 safetensors), tokenizer and chat template go to --out.

Checkpoints are safetensors (model, optimizer moments, EMA weights) plus JSON: no pickle. A run
resumes from --work/ckpt whenever it is started again with the same --work; keep --work outside
the repository for long runs (e.g. /work/train-default/phase3).

Schedules:
  time-cosine  (phases 1-2 of the shipped weights) warmup + cosine over --minutes of step time;
  wsd          warmup, a constant learning rate, then a linear decay over the last --decay-fraction
               of --max-tokens. The rate depends on tokens seen, not wall time, so a run can stop
               (--stop-minutes) and resume in any later session; --max-tokens may be raised on resume
               while the run is still in the constant part. An exponential moving average of the
               weights (--ema) is kept as a cheap checkpoint average; --export-weights ema ships it.

Usage: python -m models.train_default --minutes 80 [--work data/train_default] [--out models/default]
       python -m models.train_default --schedule wsd --init models/default --max-tokens 150e6 \
           --stop-minutes 90 --work /work/train-default/phase3 --out /work/train-default/phase3-model
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from packager.batching import collate, token_batches

MODEL_LANGS = ("en", "de", "fr", "es", "ru", "ja", "zh")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"] + [f"<|{code}|>" for code in MODEL_LANGS]
CHAT_TEMPLATE = (
    "{#- Translation prompt. Languages come from, in order: the source_lang / target_lang variables, a first system message 'en->de' (source->target codes), the default direction below (written per export). -#}"
    "{%- set default_direction = 'en->de' -%}"
    '{%- set direction = default_direction -%}'
    "{%- if messages and messages[0]['role'] == 'system' and '->' in messages[0]['content'] -%}"
    "{%- set direction = messages[0]['content'] -%}"
    '{%- endif -%}'
    "{%- set pair = direction.split('->') -%}"
    '{%- set src = pair[0] | trim -%}'
    '{%- set tgt = pair[1] | trim -%}'
    '{%- if source_lang is defined and source_lang -%}{%- set src = source_lang -%}{%- endif -%}'
    '{%- if target_lang is defined and target_lang -%}{%- set tgt = target_lang -%}{%- endif -%}'
    '{%- for message in messages -%}'
    "{%- if message['role'] == 'user' -%}"
    "<|bos|><|{{ src }}|><|{{ tgt }}|>{{ message['content'] }}<|sep|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] }}<|eos|>"
    '{%- endif -%}'
    '{%- endfor -%}'
)
MAX_TOKENS = 160


def model_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=256,
        num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=True, max_position_embeddings=512,
        rms_norm_eps=1e-6, router_aux_loss_coef=0.01, output_router_logits=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0,
    )


def read_pairs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def directions(records: list[dict]):
    """Each en->X record also serves as X->en."""
    for r in records:
        yield r["src_lang"], r["tgt_lang"], r["src"], r["tgt"]
        yield r["tgt_lang"], r["src_lang"], r["tgt"], r["src"]


def train_tokenizer(records: list[dict], out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        for r in records:
            yield r["src"]
            yield r["tgt"]

    tokenizer.train_from_iterator(texts(), trainer=trainer, length=2 * len(records))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", sep_token="<|sep|>",
                                   additional_special_tokens=[f"<|{c}|>" for c in MODEL_LANGS])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(token) == index, token


def encode_examples(tokenizer, records: list[dict], both_ways: bool = True, weights: list | None = None) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per direction; prompts are masked out of the loss. When `weights`
    is a list, the length weight of each kept example is appended to it."""
    rows = list(directions(records)) if both_ways else [(r["src_lang"], r["tgt_lang"], r["src"], r["tgt"]) for r in records]
    src_ids = tokenizer([r[2] for r in rows], add_special_tokens=False)["input_ids"]
    tgt_ids = tokenizer([r[3] for r in rows], add_special_tokens=False)["input_ids"]
    bos, eos, sep = (tokenizer.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|eos|>", "<|sep|>"))
    examples = []
    for (s_lang, t_lang, s_text, t_text), s, t in zip(rows, src_ids, tgt_ids):
        prompt = [bos, tokenizer.convert_tokens_to_ids(f"<|{s_lang}|>"), tokenizer.convert_tokens_to_ids(f"<|{t_lang}|>")] + s + [sep]
        ids = prompt + t + [eos]
        if len(ids) <= MAX_TOKENS:
            examples.append((ids, len(prompt)))
            if weights is not None:
                weights.append(length_weight(s_text if s_lang == "en" else t_text))
    return examples


def length_weight(english: str) -> float:
    """How often a pair is seen per epoch, by the length of its English side: UI labels of one or
    two words are plentiful and easy, sentences are rare and where the model fails."""
    words = len(english.split())
    if words <= 2:
        return 0.6
    if words <= 7:
        return 1.0
    if words <= 15:
        return 1.6
    return 2.2


def epoch_order(weights: list[float] | None, n: int, rng: random.Random) -> list[int]:
    """Example indices of one epoch: each example floor(w) times plus once more with probability frac(w)."""
    if weights is None:
        return list(range(n))
    order = []
    for i, w in enumerate(weights):
        copies = int(w) + (1 if rng.random() < w - int(w) else 0)
        order.extend([i] * copies)
    return order


def bucketed_batches(examples, tokens_per_batch: int, rng: random.Random, weights: list[float] | None = None):
    """One epoch's batches: the weighted order, sorted by length inside large random windows, cut into
    ~equal-token batches, shuffled."""
    order = epoch_order(weights, len(examples), rng)
    return token_batches(examples, tokens_per_batch, rng, order=order, window=20000)


def save_checkpoint(work: Path, model, optimizer, state: dict, ema: dict | None = None) -> None:
    from safetensors.torch import save_file, save_model

    tmp = work / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
    if ema is not None:
        save_file({name: t.contiguous() for name, t in ema.items()}, str(tmp / "ema.safetensors"))
    moments = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                moments[f"{names[id(p)]}::exp_avg"] = st["exp_avg"]
                moments[f"{names[id(p)]}::exp_avg_sq"] = st["exp_avg_sq"]
                state.setdefault("adam_step", {})[names[id(p)]] = float(st["step"])
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    final = work / "ckpt"
    old = work / "ckpt.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_ema(work: Path) -> dict | None:
    from safetensors.torch import load_file

    path = work / "ckpt" / "ema.safetensors"
    return load_file(str(path)) if path.exists() else None


def init_from(model, source: Path) -> None:
    """Warm start: the weights of an exported model directory (same shape and vocabulary). Loaded
    through transformers, which fuses the per-expert tensors of the file into the in-memory layout."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    loaded = Qwen3MoeForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in loaded or loaded[name].shape != tensor.shape:
            found = tuple(loaded[name].shape) if name in loaded else "nothing"
            raise SystemExit(f"error: --init {source}: {name} is {found}, this recipe builds {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(loaded[name])


def load_checkpoint(work: Path, model, optimizer) -> dict | None:
    import torch
    from safetensors.torch import load_file, load_model

    final = work / "ckpt"
    if not (final / "state.json").exists():
        return None
    load_model(model, str(final / "model.safetensors"))
    state = json.loads((final / "state.json").read_text())
    moments = load_file(str(final / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in moments:
            optimizer.state[p] = {"step": torch.tensor(state["adam_step"][name]),
                                  "exp_avg": moments[f"{name}::exp_avg"],
                                  "exp_avg_sq": moments[f"{name}::exp_avg_sq"]}
    return state


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (floor + (1 - floor) * cosine)


def lr_wsd(tokens: float, peak: float, max_tokens: float, warmup_tokens: float, decay_fraction: float,
           floor: float = 0.1) -> float:
    """Warmup-stable-decay by tokens seen: linear warmup, constant, linear decay to floor * peak."""
    if tokens < warmup_tokens:
        return peak * max(tokens, 1.0) / warmup_tokens
    decay_start = max_tokens * (1 - decay_fraction)
    if tokens < decay_start:
        return peak
    progress = min(1.0, (tokens - decay_start) / max(1.0, max_tokens - decay_start))
    return peak * (1 - (1 - floor) * progress)


def target_loss(model, ids, labels, mask):
    """Cross-entropy on target tokens only, with the LM head applied only where a target is
    predicted (the prompt half of every row skips the 12k-way projection), plus the Switch-style
    balance loss of the routers. Returns (total loss, cross-entropy)."""
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    out = model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    shifted = labels[:, 1:]
    where = shifted != -100
    hidden = out.last_hidden_state[:, :-1][where]
    logits = model.lm_head(hidden)
    ce = torch.nn.functional.cross_entropy(logits.float(), shifted[where])
    config = model.config
    aux = load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok, mask)
    return ce + config.router_aux_loss_coef * aux, ce


def dev_loss(model, examples, pad_id: int, limit: int = 1500) -> float:
    """Mean cross-entropy per target token over the first `limit` examples (LM head on targets only)."""
    import torch

    model.eval()
    subset = examples[:limit]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(subset), 64):
            batch = list(range(start, min(start + 64, len(subset))))
            ids, labels, mask = collate(subset, batch, pad_id)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            shifted = labels[:, 1:]
            where = shifted != -100
            logits = model.lm_head(hidden[where])
            total += float(torch.nn.functional.cross_entropy(logits.float(), shifted[where], reduction="sum"))
            count += int(where.sum())
    model.train()
    return total / max(count, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="train the embedded default MoE translator")
    parser.add_argument("--data", type=Path, default=Path("data/harvest"))
    parser.add_argument("--work", type=Path, default=Path("data/train_default"))
    parser.add_argument("--out", type=Path, default=Path("models/default"))
    parser.add_argument("--minutes", type=float, default=80.0,
                        help="time-cosine: wall-time budget of the whole schedule (step time, summed over resumes)")
    parser.add_argument("--schedule", choices=("time-cosine", "wsd"), default="time-cosine")
    parser.add_argument("--max-tokens", type=float, default=150e6, help="wsd: tokens (prompt + target) of the whole run")
    parser.add_argument("--warmup-tokens", type=float, default=1e6, help="wsd: linear warmup length")
    parser.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: final share of --max-tokens that decays")
    parser.add_argument("--stop-minutes", type=float, default=None,
                        help="stop (checkpoint, export) after this many wall minutes of this invocation; resume later")
    parser.add_argument("--init", type=Path, default=None,
                        help="warm start from an exported model directory (its tokenizer and weights); "
                             "used only when --work holds no checkpoint yet")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay per step of the averaged weights (0 = off)")
    parser.add_argument("--export-weights", choices=("live", "ema"), default="live")
    parser.add_argument("--length-weighting", action="store_true",
                        help="see pairs by the length of their English side: 1-2 words 0.6x, 8-15 1.6x, 16+ 2.2x per epoch")
    parser.add_argument("--monitor", type=Path, default=None,
                        help="also log the loss on this JSONL (e.g. unseen.jsonl) at checkpoints; never trained on")
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--tokens-per-batch", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--focus", default="",
                        help="comma-separated en->X targets (e.g. de,fr,es) whose en->X pairs are seen extra times")
    parser.add_argument("--focus-repeat", type=int, default=2,
                        help="extra copies per epoch of each focus pair in the en->X direction")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--eval-minutes", type=float, default=None,
                        help="log dev (and monitor) losses at most this often (default: at every checkpoint)")
    parser.add_argument("--eval-examples", type=int, default=1500, help="examples per dev / monitor loss")
    parser.add_argument("--export-only", action="store_true",
                        help="write the latest checkpoint to --out without training (e.g. to try an intermediate model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    say = _logger(args.work / "train.log")
    say("command: " + " ".join(sys.argv))
    run = TrainingRun(args, say)
    if args.export_only:
        if run.state is None:
            raise SystemExit(f"error: no checkpoint in {args.work / 'ckpt'}; train first")
        run.export()
        return 0
    run.start()
    run.prepare_examples()
    run.train()
    run.checkpoint("finished" if run.finished() else "stopped")
    run.export()
    return 0


def _logger(path: Path):
    log = path.open("a")

    def say(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=sys.stderr, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


class TrainingRun:
    """One invocation of a resumable run: the model, optimizer, EMA and `state` (steps, tokens,
    elapsed step time, epoch and batch position, loss history) that the checkpoint holds."""

    def __init__(self, args, say):
        import torch
        from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

        self.args, self.say = args, say
        tok_dir = args.work / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            if args.init is not None:
                AutoTokenizer.from_pretrained(args.init).save_pretrained(tok_dir)
                say(f"tokenizer from {args.init}")
            else:
                train = read_pairs(args.data / "train.jsonl")
                say(f"training tokenizer (vocab {args.vocab}) on {len(train)} pairs")
                train_tokenizer(train, tok_dir, args.vocab)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.pad_id = self.tokenizer.pad_token_id
        self.model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**model_config(len(self.tokenizer))))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.state = load_checkpoint(args.work, self.model, self.optimizer)
        self.ema = load_ema(args.work) if self.state is not None else None
        self.last_eval = time.time()

    def start(self) -> None:
        args, say = self.args, self.say
        if self.state is None:
            self.state = {"elapsed": 0.0, "epoch": 0, "batch": 0, "step": 0, "tokens": 0}
            if args.init is not None:
                init_from(self.model, args.init)
                self.state["init"] = str(args.init)
                init_record = args.init / "training.json"
                if init_record.is_file():  # kept: --init may be overwritten by this run's own export
                    self.state["init_training"] = json.loads(init_record.read_text())
                say(f"warm start from {args.init}")
        else:
            state = self.state
            say(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min, {state['tokens'] / 1e6:.1f}M tokens)")
        self.state["recipe"] = recipe_record(args)  # the training's settings, for a later --export-only
        if args.ema and self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def prepare_examples(self) -> None:
        args, say, tokenizer = self.args, self.say, self.tokenizer
        train = read_pairs(args.data / "train.jsonl")
        dev = read_pairs(args.data / "dev.jsonl")
        say("encoding examples")
        weights: list[float] | None = [] if args.length_weighting else None
        train_examples = encode_examples(tokenizer, train, weights=weights)
        focus = [code for code in args.focus.split(",") if code]
        if focus:
            # The quality bar is on en->de/fr/es: those directions get extra passes, the rest keep one.
            unknown = sorted(set(focus) - set(MODEL_LANGS[1:]))
            if unknown:
                raise SystemExit(f"error: --focus {','.join(unknown)}: not a target language of the model {MODEL_LANGS[1:]}")
            focus_records = [r for r in train if r["src_lang"] == "en" and r["tgt_lang"] in focus]
            extra_weights: list[float] | None = [] if weights is not None else None
            extra = encode_examples(tokenizer, focus_records, both_ways=False, weights=extra_weights)
            train_examples += extra * args.focus_repeat
            if weights is not None:
                weights += extra_weights * args.focus_repeat
        dev_examples = encode_examples(tokenizer, dev)
        random.Random(args.seed).shuffle(dev_examples)
        monitor_examples = []
        if args.monitor is not None:
            monitor_records = read_pairs(args.monitor)
            monitor_records = random.Random(args.seed).sample(monitor_records, min(len(monitor_records), args.eval_examples))
            monitor_examples = encode_examples(tokenizer, monitor_records)
            random.Random(args.seed).shuffle(monitor_examples)
        per_epoch = sum(weights) if weights is not None else len(train_examples)
        say(f"{len(train_examples)} training examples ({per_epoch:.0f} per epoch after weighting), "
            f"{len(dev_examples)} dev examples, {len(monitor_examples)} monitor examples")
        n_params = sum(p.numel() for p in self.model.parameters())
        say(f"model: {n_params / 1e6:.2f}M parameters; schedule {args.schedule}, {args.threads} thread(s)")
        self.train_examples, self.weights = train_examples, weights
        self.dev_examples, self.monitor_examples = dev_examples, monitor_examples

    def learning_rate(self) -> float:
        args, state = self.args, self.state
        if args.schedule == "wsd":
            return lr_wsd(state["tokens"], args.lr, args.max_tokens, args.warmup_tokens, args.decay_fraction)
        return lr_at(state["elapsed"] / (args.minutes * 60), args.lr)

    def finished(self) -> bool:
        if self.args.schedule == "wsd":
            return self.state["tokens"] >= self.args.max_tokens
        return self.state["elapsed"] >= self.args.minutes * 60

    def _losses(self, prefix: str) -> tuple[str, str]:
        """Dev (and monitor) loss of the model's current weights, stored in state under `prefix`."""
        n, state = self.args.eval_examples, self.state
        state[f"{prefix}dev_loss"] = dev_loss(self.model, self.dev_examples, self.pad_id, n)
        monitor = ""
        if self.monitor_examples:
            state[f"{prefix}monitor_loss"] = dev_loss(self.model, self.monitor_examples, self.pad_id, n)
            monitor = f"{state[f'{prefix}monitor_loss']:.3f}"
        return f"{state[f'{prefix}dev_loss']:.3f}", monitor

    def checkpoint(self, reason: str, evaluate: bool = True) -> None:
        import torch

        state, model, ema = self.state, self.model, self.ema
        if not evaluate:
            save_checkpoint(self.args.work, model, self.optimizer, state, ema)
            self.say(f"{reason} step {state['step']} tokens {state['tokens'] / 1e6:.2f}M (losses not evaluated)")
            return
        self.last_eval = time.time()
        dev, monitor = self._losses("")
        line = f"{reason} step {state['step']} tokens {state['tokens'] / 1e6:.2f}M dev loss {dev}"
        if monitor:
            line += f" monitor loss {monitor}"
        if ema is not None:
            live = {name: p.detach().clone() for name, p in model.named_parameters()}
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(ema[name])
            dev, monitor = self._losses("ema_")
            line += f" | ema dev loss {dev}" + (f" monitor {monitor}" if monitor else "")
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(live[name])
        state.setdefault("history", []).append({k: state.get(k) for k in (
            "step", "tokens", "elapsed", "dev_loss", "monitor_loss", "ema_dev_loss", "ema_monitor_loss")})
        save_checkpoint(self.args.work, model, self.optimizer, state, ema)
        self.say(line)

    def train(self) -> None:
        """Step through epochs of length-bucketed batches until the schedule ends or --stop-minutes."""
        args, state = self.args, self.state
        if state["step"] == 0:  # the starting point (a warm start's losses on the new data)
            n = args.eval_examples
            start_line = f"start dev loss {dev_loss(self.model, self.dev_examples, self.pad_id, n):.3f}"
            if self.monitor_examples:
                start_line += f" monitor loss {dev_loss(self.model, self.monitor_examples, self.pad_id, n):.3f}"
            self.say(start_line)
        self.model.train()
        invocation_start = last_ckpt = time.time()
        self.window_tokens, self.window_time = 0, 0.0
        while not self.finished():
            batches = bucketed_batches(self.train_examples, args.tokens_per_batch,
                                       random.Random(args.seed + state["epoch"]), self.weights)
            while state["batch"] < len(batches) and not self.finished():
                if args.stop_minutes is not None and time.time() - invocation_start > args.stop_minutes * 60:
                    return
                self.step(batches[state["batch"]])
                if time.time() - last_ckpt > args.checkpoint_minutes * 60:
                    due = args.eval_minutes is None or time.time() - self.last_eval > args.eval_minutes * 60
                    self.checkpoint("checkpoint", evaluate=due)
                    last_ckpt = time.time()
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0

    def step(self, batch) -> None:
        import torch

        args, state, model = self.args, self.state, self.model
        started = time.time()
        ids, labels, mask = collate(self.train_examples, batch, self.pad_id)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, ce = target_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    self.ema[n].lerp_(p.detach(), 1 - args.ema)
        state["batch"] += 1
        state["step"] += 1
        tokens = int(mask.sum())
        state["tokens"] += tokens
        spent = time.time() - started
        state["elapsed"] += spent
        self.window_tokens += tokens
        self.window_time += spent
        if state["step"] % 100 == 0:
            self.say(f"step {state['step']} epoch {state['epoch']} ce {ce.item():.3f} lr {lr:.2e} "
                     f"tokens {state['tokens'] / 1e6:.2f}M elapsed {state['elapsed'] / 60:.1f}m "
                     f"{self.window_tokens / max(self.window_time, 1e-9):.0f} tok/s")
            self.window_tokens, self.window_time = 0, 0.0

    def export(self) -> None:
        export(self.model, self.tokenizer, self.args.out, self.state, self.args, self.ema)
        self.say(f"exported step {self.state['step']} ({self.args.export_weights} weights) to {self.args.out}")


def recipe_record(args) -> dict:
    """The settings of a training invocation, as training.json records them."""
    record = {"seed": args.seed, "lr": args.lr, "tokens_per_batch": args.tokens_per_batch, "threads": args.threads,
              "focus": args.focus, "focus_repeat": args.focus_repeat, "schedule": args.schedule}
    if args.schedule == "wsd":
        record.update(max_tokens=args.max_tokens, warmup_tokens=args.warmup_tokens, decay_fraction=args.decay_fraction,
                      ema=args.ema, length_weighting=args.length_weighting)
    record["command"] = " ".join(sys.argv)
    return record


def export(model, tokenizer, out: Path, state: dict, args, ema: dict | None = None) -> None:
    """Write the shipped model: bf16 safetensors, tokenizer, chat template, training record."""
    import shutil

    import torch

    live = None
    if getattr(args, "export_weights", "live") == "ema":
        if ema is None:
            raise SystemExit("error: --export-weights ema: the checkpoint holds no EMA weights (train with --ema)")
        live = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(ema[n])
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(tmp)
    # the current prompt template, not the one a warm start's tokenizer was saved with
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes only num_local_experts; 4.x readers need num_experts.
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # --export-only runs with its own arguments; the settings that trained the weights are the
    # ones the last training invocation stored in the checkpoint
    recipe = state.get("recipe") or recipe_record(args)
    record = {"steps": state["step"], "tokens": state["tokens"], "train_minutes": round(state["elapsed"] / 60, 1),
              "dev_loss": state.get("ema_dev_loss" if live is not None else "dev_loss"),
              **{k: v for k, v in recipe.items() if k != "command"},
              "weights": getattr(args, "export_weights", "live"), "init": state.get("init"), "command": recipe["command"]}
    if getattr(args, "export_only", False):
        record["export_command"] = " ".join(sys.argv)
    if state.get("init_training"):
        record["init_training"] = state["init_training"]
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    model.to(torch.float32)
    if live is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(live[n])


if __name__ == "__main__":
    sys.exit(main())
