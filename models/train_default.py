"""Train the embedded default parent: a small Qwen3-MoE translator, from scratch, on CPU.

Steps (each resumable; state lives under --work, outside git):
  1. byte-level BPE tokenizer on the harvested training split (`tokenizers`), GPT-2 pre-split
     so llama.cpp's `gpt-2` pre-tokenizer reproduces it exactly;
  2. Qwen3MoeForCausalLM trained as a decoder-only translator on all 12 directions
     (en<->de,fr,es,ru,ja,zh), loss on target tokens only, length-bucketed batches,
     AdamW with warmup + cosine driven by elapsed wall time, Switch-style balance loss;
  3. the final weights (bf16 safetensors), tokenizer and chat template go to --out.

Checkpoints are safetensors (model and optimizer moments) plus JSON: no pickle.

Usage: python -m models.train_default --minutes 80 [--work data/train_default] [--out models/default]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

MODEL_LANGS = ("en", "de", "fr", "es", "ru", "ja", "zh")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>"] + [f"<|{code}|>" for code in MODEL_LANGS]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ message['content'] }}<|sep|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] }}<|eos|>"
    "{%- endif -%}"
    "{%- endfor -%}"
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


def encode_examples(tokenizer, records: list[dict], both_ways: bool = True) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per direction; prompts are masked out of the loss."""
    rows = list(directions(records)) if both_ways else [(r["src_lang"], r["tgt_lang"], r["src"], r["tgt"]) for r in records]
    src_ids = tokenizer([r[2] for r in rows], add_special_tokens=False)["input_ids"]
    tgt_ids = tokenizer([r[3] for r in rows], add_special_tokens=False)["input_ids"]
    bos, eos, sep = (tokenizer.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|eos|>", "<|sep|>"))
    examples = []
    for (s_lang, t_lang, _, _), s, t in zip(rows, src_ids, tgt_ids):
        prompt = [bos, tokenizer.convert_tokens_to_ids(f"<|{s_lang}|>"), tokenizer.convert_tokens_to_ids(f"<|{t_lang}|>")] + s + [sep]
        ids = prompt + t + [eos]
        if len(ids) <= MAX_TOKENS:
            examples.append((ids, len(prompt)))
    return examples


def bucketed_batches(examples, tokens_per_batch: int, rng: random.Random):
    """Sort by length inside large random windows, cut into ~equal-token batches, shuffle."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = 20000
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i][0]))
        batch, longest = [], 0
        for i in chunk:
            length = len(examples[i][0])
            if batch and max(longest, length) * (len(batch) + 1) > tokens_per_batch:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def collate(examples, batch, pad_id: int):
    import torch

    longest = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, i in enumerate(batch):
        tokens, prompt_len = examples[i]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, prompt_len:len(tokens)] = torch.tensor(tokens[prompt_len:])
        mask[row, :len(tokens)] = 1
    return ids, labels, mask


def save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    from safetensors.torch import save_file, save_model

    tmp = work / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
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


def dev_loss(model, examples, pad_id: int, limit: int = 1500) -> float:
    import torch

    model.eval()
    subset = examples[:limit]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(subset), 64):
            batch = list(range(start, min(start + 64, len(subset))))
            ids, labels, mask = collate(subset, batch, pad_id)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the embedded default MoE translator")
    parser.add_argument("--data", type=Path, default=Path("data/harvest"))
    parser.add_argument("--work", type=Path, default=Path("data/train_default"))
    parser.add_argument("--out", type=Path, default=Path("models/default"))
    parser.add_argument("--minutes", type=float, default=80.0, help="wall-time budget of the whole schedule")
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
    parser.add_argument("--export-only", action="store_true",
                        help="write the latest checkpoint to --out without training (e.g. to try an intermediate model)")
    args = parser.parse_args(argv)

    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log = (args.work / "train.log").open("a")

    def say(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=sys.stderr, flush=True)
        log.write(line + "\n")
        log.flush()

    train = read_pairs(args.data / "train.jsonl")
    dev = read_pairs(args.data / "dev.jsonl")
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        say(f"training tokenizer (vocab {args.vocab}) on {len(train)} pairs")
        train_tokenizer(train, tok_dir, args.vocab)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if args.export_only:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**model_config(len(tokenizer))))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        state = load_checkpoint(args.work, model, optimizer)
        if state is None:
            raise SystemExit(f"error: no checkpoint in {args.work / 'ckpt'}; train first")
        export(model, tokenizer, args.out, state, args)
        say(f"exported step {state['step']} to {args.out}")
        return 0
    say("encoding examples")
    train_examples = encode_examples(tokenizer, train)
    focus = [code for code in args.focus.split(",") if code]
    if focus:
        # The quality bar is on en->de/fr/es: those directions get extra passes, the rest keep one.
        unknown = sorted(set(focus) - set(MODEL_LANGS[1:]))
        if unknown:
            raise SystemExit(f"error: --focus {','.join(unknown)}: not a target language of the model {MODEL_LANGS[1:]}")
        focus_records = [r for r in train if r["src_lang"] == "en" and r["tgt_lang"] in focus]
        train_examples += encode_examples(tokenizer, focus_records, both_ways=False) * args.focus_repeat
    dev_examples = encode_examples(tokenizer, dev)
    random.Random(args.seed).shuffle(dev_examples)
    say(f"{len(train_examples)} training examples, {len(dev_examples)} dev examples")

    config = Qwen3MoeConfig(**model_config(len(tokenizer)))
    model = Qwen3MoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    state = load_checkpoint(args.work, model, optimizer) or {"elapsed": 0.0, "epoch": 0, "batch": 0, "step": 0, "tokens": 0}
    if state["step"]:
        say(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters")

    budget = args.minutes * 60
    pad_id = tokenizer.pad_token_id
    model.train()
    last_ckpt = time.time()
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("train", total=budget, completed=state["elapsed"], info="")
        while state["elapsed"] < budget:
            batches = bucketed_batches(train_examples, args.tokens_per_batch, random.Random(args.seed + state["epoch"]))
            while state["batch"] < len(batches) and state["elapsed"] < budget:
                started = time.time()
                ids, labels, mask = collate(train_examples, batches[state["batch"]], pad_id)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["elapsed"] / budget, args.lr)
                out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["batch"] += 1
                state["step"] += 1
                state["tokens"] += int(mask.sum())
                state["elapsed"] += time.time() - started
                progress.update(task, completed=state["elapsed"], info=f"step {state['step']} loss {float(out.loss):.3f}")
                if state["step"] % 100 == 0:
                    say(f"step {state['step']} epoch {state['epoch']} loss {float(out.loss):.3f} "
                        f"lr {optimizer.param_groups[0]['lr']:.2e} tokens {state['tokens']} elapsed {state['elapsed'] / 60:.1f}m")
                if time.time() - last_ckpt > args.checkpoint_minutes * 60:
                    state["dev_loss"] = dev_loss(model, dev_examples, pad_id)
                    say(f"checkpoint step {state['step']} dev loss {state['dev_loss']:.3f}")
                    save_checkpoint(args.work, model, optimizer, state)
                    last_ckpt = time.time()
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    state["dev_loss"] = dev_loss(model, dev_examples, pad_id)
    save_checkpoint(args.work, model, optimizer, state)
    say(f"finished: step {state['step']} tokens {state['tokens']} dev loss {state['dev_loss']:.3f}")
    export(model, tokenizer, args.out, state, args)
    return 0


def export(model, tokenizer, out: Path, state: dict, args) -> None:
    """Write the shipped model: bf16 safetensors, tokenizer, chat template, training record."""
    import torch

    tmp = out.with_name(out.name + ".tmp")
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes only num_local_experts; 4.x readers need num_experts (DESIGN.md).
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    record = {"steps": state["step"], "tokens": state["tokens"], "train_minutes": round(state["elapsed"] / 60, 1),
              "dev_loss": state["dev_loss"], "seed": args.seed, "lr": args.lr, "tokens_per_batch": args.tokens_per_batch,
              "threads": args.threads, "focus": args.focus, "focus_repeat": args.focus_repeat, "command": " ".join(sys.argv)}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    model.to(torch.float32)


if __name__ == "__main__":
    sys.exit(main())
