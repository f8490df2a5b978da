"""aarch64 device check (issue 19, part 1; `make device-check`, not part of `make test`).

Cross-builds the pinned llama.cpp (vendor/llama.cpp of the llama-cpp-python 0.3.36 source archive)
for aarch64 with Debian's cross toolchain, builds the same tool natively for x86-64, runs the
default model's en->de GGUF (F32 and Q8_0, exported by `packager export gguf`) through llama.cpp's
own `llama-simple` (greedy sampler, prompt from the model's chat template) under
`qemu-aarch64-static` and natively, and writes bench/results/device_check.json: identical or not
per sentence; where not, the first diverging token and the x86 logit gap at that position
(llama-cpp-python, same pinned llama.cpp, teacher-forced on the x86 output).

ONNX: the default model's fp32 ONNX export (`packager export onnx`) through the runtime's own ONNX
backend (bench/onnx_greedy_probe.py) in the venv's x86 Python and in Debian bookworm's arm64
python3.11 under qemu, with the aarch64 manylinux wheels of the venv's onnxruntime, numpy and
tokenizers. The arm64 .debs come from apt with a private state directory (the system's apt
configuration is not touched); they are unpacked with dpkg -x into a sysroot for `qemu -L`.
ONNX Runtime's cpuinfo dereferences NULL on qemu 7.2's /proc/cpuinfo (the host's x86 one), so the
probe runs in a private mount namespace (unshare -m, root) with an aarch64 /proc/cpuinfo bound over
it (two Neoverse-N1 cores).

`--bundle DIR` (repeatable) runs the same GGUF comparison on bundles instead, each in its first
en->X direction with its own template, and writes bench/results/device_check_bundles.json.

Python rather than shell because the comparison, the prompt (runtime.prompt renders the bundle's
own template) and the JSON report live in Python anyway; the build steps are plain subprocess
calls to apt-get, pip, tar and cmake. Work files go to data/device_check (gitignored); the
binaries are reused when present (--rebuild to force).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "device_check.json"
BUNDLE_RESULTS = REPO / "bench" / "results" / "device_check_bundles.json"
WORK = REPO / "data" / "device_check"
MODEL = REPO / "models" / "default"
PIN = "0.3.36"
APT_PACKAGES = ["qemu-user-static", "g++-aarch64-linux-gnu"]
TARGET = "llama-simple"
N_PREDICT = 64

# Fixed English UI strings (written for this check).
SENTENCES = [
    "Open the file.",
    "Save changes before closing?",
    "The printer is out of paper.",
    "Delete the selected items permanently.",
    "Your password must contain at least eight characters.",
    "Check for updates automatically",
    "Unable to connect to the server. Try again later.",
]

COMMON_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
]
CROSS_CMAKE = [
    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
    # static: qemu-user then needs no aarch64 sysroot (-L) for the loader and libstdc++
    "-DCMAKE_EXE_LINKER_FLAGS=-static",
]

# x86: the host's own CPU features (AVX2 etc.), as llama-cpp-python's pip build has them
NATIVE_CMAKE = ["-DGGML_NATIVE=ON"]


def log(msg: str) -> None:
    print(f"[device-check] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log(" ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def ensure_apt_tools() -> None:
    missing = [p for p, exe in zip(APT_PACKAGES, ["qemu-aarch64-static", "aarch64-linux-gnu-g++"])
               if shutil.which(exe) is None]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    run(sudo + ["apt-get", "update"])
    run(sudo + ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist (downloaded by pip once)."""
    src = WORK / "src"
    root = src / f"llama_cpp_python-{PIN}" / "vendor" / "llama.cpp"
    if (root / "CMakeLists.txt").exists():
        return root
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"llama_cpp_python-{PIN}.tar.gz"
    if not archive.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={PIN}", "-d", str(src)])
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return root


def build(source: Path, arch: str, rebuild: bool, jobs: int) -> Path:
    out = WORK / f"build-{arch}"
    binary = out / "bin" / TARGET
    if binary.exists() and not rebuild:
        return binary
    extra = CROSS_CMAKE if arch == "aarch64" else NATIVE_CMAKE
    run(["cmake", "-S", str(source), "-B", str(out), *COMMON_CMAKE, *extra], stdout=subprocess.DEVNULL)
    t0 = time.time()
    run(["cmake", "--build", str(out), "--target", TARGET, f"-j{jobs}"], stdout=subprocess.DEVNULL)
    log(f"{arch} build of {TARGET}: {time.time() - t0:.0f} s")
    return binary


def export_models() -> dict[str, Path]:
    out = WORK / "gguf"
    files = {"F32": out / "default.gguf", "Q8_0": out / "default.Q8_0.gguf"}
    if not all(f.exists() for f in files.values()):
        out.mkdir(parents=True, exist_ok=True)
        packager = Path(sys.executable).parent / "packager"
        run([str(packager), "export", "gguf", str(MODEL), "--dtype", "f32", "--quant", "Q8_0",
             "--out", str(files["F32"]), "--force"])
    return files


_SPEED = re.compile(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s*s, speed:\s*([\d.]+)\s*t/s")


def run_simple(cmd_prefix: list[str], binary: Path, model: Path, prompt: str) -> dict:
    cmd = [*cmd_prefix, str(binary), "-m", str(model), "-n", str(N_PREDICT), prompt]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    text = proc.stdout
    if not text.startswith(prompt):
        raise RuntimeError(f"llama-simple did not echo the prompt: {text[:200]!r}")
    m = _SPEED.search(proc.stderr)
    text = text[len(prompt):]
    if text.endswith("\n"):  # llama-simple ends its output with one newline of its own
        text = text[:-1]
    return {"text": text, "wall_s": round(wall, 2),
            "decoded_tokens": int(m.group(1)) if m else None,
            "tok_per_s": float(m.group(3)) if m else None}


def first_divergence(model: Path, prompt: str, x86_text: str, arm_text: str) -> dict:
    """Teacher-force the x86 output in llama-cpp-python (same pinned llama.cpp, x86) and find the
    first token whose piece no longer matches the aarch64 text; report the x86 logit gap there
    between x86's token and the token aarch64 continued with (when it is identifiable)."""
    import numpy as np
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=512, logits_all=True, verbose=False)
    p_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    # greedy x86 ids, checked against llama-simple's x86 text
    ids: list[int] = []
    llm.reset()
    llm.eval(p_ids)
    eos = llm.token_eos()
    logits_rows = []
    for _ in range(N_PREDICT):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        tok = int(row.argmax())
        if tok == eos or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tok):
            logits_rows.append(row)
            break
        ids.append(tok)
        logits_rows.append(row)
        llm.eval([tok])
    piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", errors="replace")  # noqa: E731
    info: dict = {"x86_python_text_matches_llama_simple": llm.detokenize(ids, special=True).decode("utf-8", "replace") == x86_text}
    pos_text = 0
    for i, tok in enumerate(ids + [None]):
        p = piece(tok) if tok is not None else ""
        rest = arm_text[pos_text:]
        ok = (tok is not None and rest.startswith(p)) or (tok is None and rest == "")
        if ok:
            pos_text += len(p)
            continue
        row = logits_rows[i]
        order = np.argsort(-row)
        info.update({"token_index": i, "x86_token": tok if tok is not None else "<end>",
                     "x86_piece": p if tok is not None else "<end>",
                     "aarch64_continues_with": rest[:40] or "<end>",
                     "x86_top1_minus_top2_logit": round(float(row[order[0]] - row[order[1]]), 4)})
        # the aarch64 token: the highest-ranked x86 candidate whose piece starts the aarch64 rest
        for cand in order[:50]:
            c = int(cand)
            cp = piece(c)
            if (rest == "" and llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), c)) or \
                    (cp and rest.startswith(cp)):
                info.update({"aarch64_token": c, "aarch64_piece": cp if rest else "<end>",
                             "x86_logit_gap_x86_minus_aarch64_token": round(float(row[int(order[0])] - row[c]), 4)})
                break
        return info
    return info


ARM64_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
              "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libuuid1",
              "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libdb5.3", "libnsl2",
              "libtirpc3"]
FAKE_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
    "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(2))


def arm64_python() -> tuple[Path, Path]:
    """(sysroot, site dir): Debian's arm64 python3.11 unpacked, plus aarch64 wheels of the venv's
    onnxruntime / numpy / tokenizers and links to its pure-Python jinja2 / markupsafe."""
    root, site, apt = WORK / "arm64-root", WORK / "arm64-site", WORK / "arm64-apt"
    py = root / "usr" / "bin" / "python3.11"
    if not py.exists():
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / d).mkdir(parents=True, exist_ok=True)
        (apt / "status").touch()
        opts = ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
                "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                "-o", f"Dir::State::status={apt / 'status'}"]
        run(["apt-get", *opts, "update"], stdout=subprocess.DEVNULL)
        run(["apt-get", *opts, "download", *ARM64_DEBS], cwd=apt / "debs", stdout=subprocess.DEVNULL)
        root.mkdir(parents=True, exist_ok=True)
        for deb in sorted((apt / "debs").glob("*.deb")):
            run(["dpkg", "-x", str(deb), str(root)])
    if not (site / "onnxruntime").exists():
        import importlib.metadata as md
        import zipfile
        wheels = WORK / "arm64-wheels"
        pins = [f"{p}=={md.version(p)}" for p in ("onnxruntime", "numpy", "tokenizers")]
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.11",
             "--implementation", "cp", "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
             "--platform", "manylinux2014_aarch64", "-d", str(wheels), *pins])
        site.mkdir(parents=True, exist_ok=True)
        for whl in wheels.glob("*aarch64*.whl"):
            zipfile.ZipFile(whl).extractall(site)
        import jinja2
        import markupsafe
        for mod in (jinja2, markupsafe):  # pure Python (markupsafe falls back from its x86 speedups)
            link = site / mod.__name__
            if not link.exists():
                link.symlink_to(Path(mod.__file__).parent)
    return root, site


def onnx_check(qemu: list[str]) -> dict:
    export = WORK / "onnx-fp32"
    if not (export / "model.onnx").exists():
        packager = Path(sys.executable).parent / "packager"
        run([str(packager), "export", "onnx", str(MODEL), "--out", str(export), "--no-check", "--force"])
    probe = REPO / "bench" / "onnx_greedy_probe.py"
    args = [str(probe), str(export), str(N_PREDICT), *SENTENCES]
    x86 = json.loads(subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True).stdout)
    root, site = arm64_python()
    cpuinfo = WORK / "arm64-cpuinfo"
    cpuinfo.write_text(FAKE_CPUINFO)
    inner = " ".join(shlex.quote(a) for a in [*qemu, "-L", str(root), str(root / "usr/bin/python3.11"), *args])
    t0 = time.time()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {shlex.quote(str(cpuinfo))} /proc/cpuinfo && {inner}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"aarch64 ONNX probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    arm = json.loads(proc.stdout)
    rows = []
    for a, b in zip(x86["sentences"], arm["sentences"]):
        row = {"source": a["source"], "identical": a["ids"] == b["ids"], "x86": a["text"], "aarch64": b["text"],
               "max_abs_diff_top1_minus_top2": round(max((abs(p - q) for p, q in zip(a["top1_minus_top2"], b["top1_minus_top2"])), default=0.0), 6),
               "x86_tok_per_s": a["tok_per_s"], "qemu_tok_per_s": b["tok_per_s"]}
        if not row["identical"]:
            i = next(k for k, (p, q) in enumerate(zip(a["ids"] + [None], b["ids"] + [None])) if p != q)
            row["first_divergence"] = {"token_index": i, "x86_token": a["ids"][i] if i < len(a["ids"]) else None,
                                       "aarch64_token": b["ids"][i] if i < len(b["ids"]) else None,
                                       "x86_top1_minus_top2_logit": a["top1_minus_top2"][i] if i < len(a["ids"]) else None,
                                       "aarch64_top1_minus_top2_logit": b["top1_minus_top2"][i] if i < len(b["ids"]) else None}
        log(f"ONNX fp32 {'same' if row['identical'] else 'DIFF'}: {a['source']!r} -> {b['text']!r}")
        rows.append(row)
    qs = sorted(r["qemu_tok_per_s"] for r in rows)
    return {"export": "fp32, --moe contrib (onnxruntime com.microsoft MoE)", "aarch64_python_machine": arm.get("machine"),
            "identical": sum(r["identical"] for r in rows), "of": len(rows),
            "qemu_wall_s": round(time.time() - t0, 1), "qemu_tok_per_s_median": qs[len(qs) // 2],
            "sentences": rows}


def bundle_check(bundle: Path):
    """(GGUF, prompt renderer, source, target) of a bundle's first direction (en->X: SENTENCES are English)."""
    from runtime.backends import resolve_model
    from runtime.languages import parse_pair
    from runtime.prompt import PromptRenderer

    model, config = resolve_model(bundle)
    if config.format != "gguf":
        raise SystemExit(f"error: {bundle}: a {config.format} bundle; the aarch64 llama.cpp check takes GGUF bundles")
    pair = next((p for p in map(parse_pair, config.directions) if str(p).startswith("en->")), None)
    if pair is None:
        raise SystemExit(f"error: {bundle}: no en->X direction (the check's sentences are English)")
    src, tgt = str(pair).split("->")
    return model, PromptRenderer(config.prompt_template, special_tokens=config.special_tokens), src, tgt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="rebuild llama-simple for both targets")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip-apt", action="store_true")
    ap.add_argument("--skip-onnx", action="store_true", help="GGUF only (no arm64 Python sysroot)")
    ap.add_argument("--bundle", action="append", default=[],
                    help="check these GGUF bundles (their first direction) instead of the default model's exports; "
                         f"writes {BUNDLE_RESULTS.name}, no ONNX")
    args = ap.parse_args()

    if not args.skip_apt:
        ensure_apt_tools()
    source = llama_cpp_source()
    arm_bin = build(source, "aarch64", args.rebuild, args.jobs)
    x86_bin = build(source, "x86_64", args.rebuild, args.jobs)
    from runtime.prompt import PromptRenderer
    if args.bundle:
        checks = {Path(b).name: bundle_check(Path(b)) for b in args.bundle}
    else:
        renderer = PromptRenderer.from_model_dir(MODEL)
        checks = {name: (model, renderer, "en", "de") for name, model in export_models().items()}
    qemu = [shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"]
    qemu_version = subprocess.run(qemu + ["--version"], capture_output=True, text=True).stdout.splitlines()[0]

    report: dict = {
        "what": "greedy llama-simple (pinned llama.cpp, vendor/llama.cpp of llama-cpp-python "
                f"{PIN}) on x86-64 vs aarch64 under qemu-user, "
                + ("GGUF bundles, each in its first direction" if args.bundle else "default model en->de"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "qemu": qemu_version},
        "build": {"cmake": COMMON_CMAKE, "aarch64": CROSS_CMAKE, "x86_64": NATIVE_CMAKE, "target": TARGET},
        "n_predict": N_PREDICT,
        "models": {},
    }
    for name, (model, renderer, src, tgt) in checks.items():
        rows = []
        for s in SENTENCES:
            prompt = renderer.render(s, src, tgt)
            x86 = run_simple([], x86_bin, model, prompt)
            arm = run_simple(qemu, arm_bin, model, prompt)
            row = {"source": s, "prompt": prompt, "identical": x86["text"] == arm["text"],
                   "x86": x86["text"], "aarch64": arm["text"],
                   "x86_tok_per_s": x86["tok_per_s"], "qemu_tok_per_s": arm["tok_per_s"]}
            if not row["identical"]:
                row["first_divergence"] = first_divergence(model, prompt, x86["text"], arm["text"])
            log(f"{name} {'same' if row['identical'] else 'DIFF'}: {s!r} -> {arm['text']!r}")
            rows.append(row)
        qs = [r["qemu_tok_per_s"] for r in rows if r["qemu_tok_per_s"]]
        xs = [r["x86_tok_per_s"] for r in rows if r["x86_tok_per_s"]]
        report["models"][name] = {
            "file": str(model), "direction": f"{src}->{tgt}", "bytes": model.stat().st_size,
            "identical": sum(r["identical"] for r in rows), "of": len(rows),
            "qemu_tok_per_s_median": sorted(qs)[len(qs) // 2] if qs else None,
            "x86_tok_per_s_median": sorted(xs)[len(xs) // 2] if xs else None,
            "sentences": rows,
        }
    report["onnx"] = "skipped" if args.skip_onnx or args.bundle else onnx_check(qemu)
    results = BUNDLE_RESULTS if args.bundle else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, m in report["models"].items():
        log(f"{name}: {m['identical']}/{m['of']} identical; qemu {m['qemu_tok_per_s_median']} tok/s "
            f"(sanity only), x86 {m['x86_tok_per_s_median']} tok/s")
    if isinstance(report["onnx"], dict):
        o = report["onnx"]
        log(f"ONNX fp32: {o['identical']}/{o['of']} identical; qemu {o['qemu_tok_per_s_median']} tok/s (sanity only)")
    log(f"wrote {results.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
