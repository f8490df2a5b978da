"""Cost of routing capture: a decoder forward with the calibration hooks against the same
forward without them (target: routing capture <= 5% overhead). REAP capture (expert output
norms) is measured separately.

Models: the trained default (models/default) when present, plus random Qwen3-MoE models built
in memory: the default model's shape (hidden 256, 4 layers, 16 experts, top-2) and a wider
one (hidden 512, 2 layers, 64 experts, top-8). Runs are interleaved (plain, routing, REAP, in
rotating order) and timed in process CPU time; medians and minima are compared, so background
load hits all variants alike. On a busy machine that end-to-end difference is noisier than the
effect, so the recorder also times its own hooks: `*_hook_time_pct` is the time spent inside
the hooks relative to the rest of the forward (median over runs), the number the target is
judged on.

Usage: python -m bench.calibration_bench [--repeats 25] [--out bench/results/calibration.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DEFAULT_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     intermediate_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=2,
                     norm_topk_prob=True, vocab_size=12000)
WIDE_SHAPE = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  intermediate_size=1024, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                  norm_topk_prob=True, vocab_size=12000)


def random_model(shape: dict):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen3MoeForCausalLM(config).eval()
    return model, config.to_dict()


def measure(model, config: dict, batch: int, length: int, repeats: int) -> dict:
    import torch

    from packager.core.arch import load_arch
    from packager.calibrate import RoutingRecorder

    arch = load_arch(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, config["vocab_size"], (batch, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    # span slots as calibration sees them: a short prompt, the source, then the output
    slots = torch.where(mask.bool(), (torch.arange(length) >= 4).long() + (torch.arange(length) >= length // 2).long(), -1)
    pair_pos = torch.zeros(batch, dtype=torch.long)
    decoder = model.base_model

    hook_share: dict[str, list[float]] = {"routing": [], "reap": []}

    def run(variant: str) -> float:
        recorder = None
        if variant != "plain":
            recorder = RoutingRecorder(model, arch, config, n_pairs=1, reap=variant == "reap")
            recorder.set_batch(slots, pair_pos)
        start, wall_start = time.process_time(), time.perf_counter()  # CPU time: less sensitive to other jobs
        with torch.no_grad():
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        elapsed, wall = time.process_time() - start, time.perf_counter() - wall_start
        if recorder is not None:
            recorder.remove()
            hook_share[variant].append(recorder.hook_seconds / wall)
        return elapsed

    variants = ["plain", "routing", "reap"]
    for variant in variants:  # warm-up
        run(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(repeats):
        for variant in variants[i % 3:] + variants[:i % 3]:
            times[variant].append(run(variant))
    plain = statistics.median(times["plain"])
    plain_min = min(times["plain"])
    result = {"batch": batch, "length": length, "tokens": int(mask.sum()), "repeats": repeats,
              "plain_ms": round(plain * 1e3, 3), "plain_min_ms": round(plain_min * 1e3, 3)}
    for variant in ("routing", "reap"):
        median = statistics.median(times[variant])
        result[f"{variant}_ms"] = round(median * 1e3, 3)
        result[f"{variant}_overhead_pct"] = round(100 * (median / plain - 1), 2)
        result[f"{variant}_min_ms"] = round(min(times[variant]) * 1e3, 3)
        result[f"{variant}_overhead_min_pct"] = round(100 * (min(times[variant]) / plain_min - 1), 2)
        # direct: time inside the capture hooks / (wall time of the forward minus that time)
        shares = [share / (1 - share) for share in hook_share[variant][1:]]
        result[f"{variant}_hook_time_pct"] = round(100 * statistics.median(shares), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--default-model", type=Path, default=Path("models/default"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    from packager import __version__
    from runtime.atomic import atomic_write_json

    torch.set_num_threads(args.threads)
    models = []
    if (args.default_model / "config.json").is_file():
        from packager.calibrate import load_model

        loaded = load_model(args.default_model)
        models.append(("trained default (models/default)", loaded.model, loaded.config))
    models.append(("random, default shape (hidden 256, 4 layers, 16 experts, top-2)", *random_model(DEFAULT_SHAPE)))
    models.append(("random, wide (hidden 512, 2 layers, 64 experts, top-8)", *random_model(WIDE_SHAPE)))

    results = []
    for name, model, config in models:
        row = {"model": name, **measure(model, config, args.batch, args.length, args.repeats)}
        row["routing_within_target"] = row["routing_hook_time_pct"] <= 5.0
        results.append(row)
        print(f"{name}: plain {row['plain_ms']} ms; routing hooks {row['routing_hook_time_pct']}% "
              f"(end to end {row['routing_overhead_pct']:+}%); routing+REAP hooks {row['reap_hook_time_pct']}% "
              f"(end to end {row['reap_overhead_pct']:+}%)", file=sys.stderr)
    report = {
        "benchmark": "calibration capture overhead (decoder forward, no LM head, no cache)",
        "target": "routing capture <= 5% over a plain forward (judged on routing_hook_time_pct)",
        "results": results,
        "environment": {"torch_threads": args.threads, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__, "packager": __version__},
        "command": " ".join([sys.executable, "-m", "bench.calibration_bench", *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
