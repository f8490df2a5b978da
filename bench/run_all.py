"""`make bench`: every benchmark except the multi-GB prune one (`make bench-prune`; the streamed
calibration one builds 6-11 GB checkpoints under data/bench), each in
its own process so their memory figures do not mix. Results land in bench/results/*.json."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("bench.calibration_bench", "bench.calibration_stream_bench", "bench.calibration_gguf_bench", "bench.gguf_bench",
              "bench.onnx_bench", "bench.onnx_stream_bench", "bench.translate_bench",
              "bench.runtime_baseline_bench")


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    failed = []
    for module in BENCHMARKS:
        if not (root / (module.replace(".", "/") + ".py")).exists():
            print(f"bench: {module} is not present; skipped", file=sys.stderr)
            continue
        print(f"bench: running {module}", file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, "-m", module], cwd=root).returncode != 0:
            failed.append(module)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"bench: results in {root / 'bench' / 'results'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
