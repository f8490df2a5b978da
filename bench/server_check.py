"""Stock llama-server against `edge-translate` (issue 19, part 2; `make server-check`, not in `make test`).

Builds llama.cpp's `llama-server` from the same pinned source as bench/device_check.py
(vendor/llama.cpp of the llama-cpp-python sdist), in device_check's native x86-64 build folder
(its cmake cache, with LLAMA_BUILD_SERVER switched on; only the llama-server target), then for
each GGUF (the default model's F32 export and demo bundles) starts the server and asks, greedy:
- `/v1/chat/completions` with messages only (the template's default direction), and with a
  first system message `en->de` naming each direction to check;
- `/completion` with the raw prompt (the bundle's template rendered by runtime.prompt, as
  `edge-translate` renders it);
and compares every answer with `edge-translate`'s greedy output (its CLI, --threads 1, one
string at a time: --batch-size 1, as the server gets them; the CLI's default batch of 8, decoded
together, is recorded beside it) on the same 32 English UI strings, with the token budget edge-translate gives each (max_tokens /
n_predict). Each server configuration is one line of flags (SERVER_CONFIGS): llama-server's own
defaults, the defaults with flash attention off, the settings `edge-translate` uses, and the
README's command. Where llama-server's defaults differ, the same sentences also go through the
runtime with flash attention on, to tell whether that setting is the whole difference.
Results: bench/results/server_check.json; server logs in data/device_check/server-logs.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.device_check import SENTENCES, WORK, export_models, llama_cpp_source, log, run  # noqa: E402
from runtime.translator import DEFAULT_BATCH_SIZE  # noqa: E402  (edge-translate's --batch-size default)

RESULTS = REPO / "bench" / "results" / "server_check.json"
DEMO_BUNDLES = REPO / "runs" / "demo" / "bundles"
DEFAULT_BUNDLES = ["en-de-gguf-Q8_0-d50-uniform", "en-fr-es-gguf-F16-d50-uniform"]
THREADS = 1  # the machine is shared; edge-translate gets the same count
# device_check's 7 UI strings plus 25 more (written for this check), so that a setting that flips
# a near-tie shows up in the counts
MORE_SENTENCES = [
    "Print the current page.", "The document has been modified.", "Do you want to save your changes?",
    "Close all open windows.", "Insert a new row above the selection.", "The file could not be found.",
    "Select a language for the user interface.", "Show hidden files and folders.", "Undo the last action.",
    "The connection was lost.", "Enter your user name.", "Copy the selected text to the clipboard.",
    "Export the table as a spreadsheet.", "Restart the application to apply the changes.",
    "This field is required.", "Search the whole document.", "Rename the folder.", "The disk is almost full.",
    "Add a comment to this cell.", "Sort the list in ascending order.", "The update was installed successfully.",
    "Move the item to the trash.", "Zoom in on the picture.", "Choose a color for the background.",
    "Check the spelling of the document.",
]
ALL_SENTENCES = SENTENCES + MORE_SENTENCES

# name -> llama-server flags besides -m/--host/--port. Requests carry "temperature": 0, except
# under the README's command, where the server's --temp 0 is the default a client that sends no
# temperature gets.
README_CONFIG = "README command: -fa off --temp 0, requests without temperature"
SERVER_CONFIGS = {
    # what a user types: only the model; llama-server picks threads, context, slots, flash attention
    "llama-server defaults": [],
    # the one default that changed answers on our sentences: llama-server's -fa auto turns flash
    # attention on for the CPU; edge-translate runs without it
    "llama-server defaults + -fa off": ["-fa", "off"],
    # edge-translate's settings (runtime/backends/llama_cpp_backend.py): context 2048, batch =
    # context, ubatch 512, flash attention off, one sequence
    "edge-translate settings": ["-c", "2048", "-b", "2048", "-ub", "512", "-fa", "off", "-np", "1", "-t", str(THREADS)],
    README_CONFIG: ["-fa", "off", "--temp", "0"],
}


def build_server(source: Path, jobs: int, rebuild: bool) -> Path:
    out = (WORK / "build-x86_64").resolve()  # device_check's native build folder and cmake cache
    binary = out / "bin" / "llama-server"
    if binary.exists() and not rebuild:
        return binary
    run(["cmake", "-S", str(source), "-B", str(out), "-DLLAMA_BUILD_SERVER=ON"], stdout=subprocess.DEVNULL)
    t0 = time.time()
    run(["cmake", "--build", str(out), "--target", "llama-server", f"-j{jobs}"], stdout=subprocess.DEVNULL)
    log(f"x86_64 build of llama-server: {time.time() - t0:.0f} s")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


class Server:
    """llama-server in the background, stopped on exit; its log kept for the report."""

    def __init__(self, binary: Path, model: Path, flags: list[str], log_path: Path):
        self.port = free_port()
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log_path = log_path
        self.proc = None

    def __enter__(self) -> "Server":
        log(" ".join(self.cmd))
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not become ready; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()

    def settings(self) -> list[str]:
        """The server's own report of the settings that can change a greedy answer."""
        keys = ("n_threads", "n_ctx", "n_batch", "n_ubatch", "flash_attn", "n_slots", "causal_attn", "type_k")
        return [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()
                if any(k in line for k in keys)][:20]


def edge_translate(model: Path, src: str, tgt: str, sentences: list[str], batch_size: int) -> list[str]:
    """`edge-translate`'s greedy output, one line per sentence (its CLI, --threads THREADS)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "runtime.cli", str(model), "--from", src, "--to", tgt,
                               "--file", f.name, "--threads", str(THREADS), "--batch-size", str(batch_size)],
                              capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.unlink(f.name)
    lines = proc.stdout.split("\n")
    return lines[:len(sentences)]


def edge_translate_flash_attn(model: Path, src: str, tgt: str, sentences: list[str]) -> list[str]:
    """The same greedy translation with the runtime's llama.cpp backend option flash_attn=True
    (the CLI has no flag for it): tells whether flash attention alone explains a difference."""
    from runtime.translator import Translator

    with Translator(model, THREADS, src=src, tgt=tgt, batch_size=1, flash_attn=True) as translator:
        return [translator.translate(s) for s in sentences]


def model_facts(model: Path) -> dict:
    """Template, default direction, prompt renderer and token budgets of a GGUF or bundle."""
    from runtime.backends.llama_cpp_backend import LlamaCppBackend, config_from_gguf
    from runtime.translator import DEFAULT_MAX_NEW_TOKENS, generation_budget

    gguf = model if model.suffix == ".gguf" else next(model.glob("*.gguf"))
    config = config_from_gguf(gguf)
    backend = LlamaCppBackend(gguf, config, n_threads=1, n_ctx=256)
    try:
        budgets = {s: generation_budget(len(backend.tokenize(s)), DEFAULT_MAX_NEW_TOKENS) for s in ALL_SENTENCES}
        renderer = backend.prompt
    finally:
        backend.close()
    default = config.prompt_template.split("set default_direction = '", 1)[-1].split("'", 1)[0]
    return {"gguf": gguf, "renderer": renderer, "budgets": budgets, "default_direction": default}


def check_model(binary: Path, model: Path, directions: list[str], logs: Path) -> dict:
    facts = model_facts(model)
    # one string at a time, as the server gets them; and the CLI's default batch (decoded together)
    reference = {d: edge_translate(model, *d.split("->"), ALL_SENTENCES, 1) for d in directions}
    batched = {d: edge_translate(model, *d.split("->"), ALL_SENTENCES, DEFAULT_BATCH_SIZE) for d in directions}
    out: dict = {"model": str(model), "gguf_bytes": facts["gguf"].stat().st_size,
                 "template_default_direction": facts["default_direction"],
                 "edge_translate_default_batch_vs_one_at_a_time": {
                     d: {"batch_size": DEFAULT_BATCH_SIZE, "identical": sum(a == b for a, b in zip(batched[d], reference[d])),
                         "of": len(ALL_SENTENCES),
                         "different": [{"source": x, "one_at_a_time": b, "batched": a}
                                       for x, a, b in zip(ALL_SENTENCES, batched[d], reference[d]) if a != b]}
                     for d in directions},
                 "configs": {}}
    for name, flags in SERVER_CONFIGS.items():
        log_path = logs / f"{model.name}.{name.replace(' ', '_')}.log"
        with Server(binary, facts["gguf"], flags, log_path) as server:
            cases = []
            for direction in directions:
                src, tgt = direction.split("->")
                asks = [("chat, system message", "chat", [{"role": "system", "content": direction}]),
                        ("completion, raw prompt", "completion", None)]
                if direction == facts["default_direction"]:
                    asks.insert(0, ("chat, messages only", "chat", []))
                for label, kind, system in asks:
                    rows = []
                    sampling = {} if name == README_CONFIG else {"temperature": 0}
                    for sentence, expected in zip(ALL_SENTENCES, reference[direction]):
                        budget = facts["budgets"][sentence]
                        if kind == "chat":
                            body = {"messages": [*system, {"role": "user", "content": sentence}],
                                    "max_tokens": budget, **sampling}
                            got = post(server.port, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
                        else:
                            body = {"prompt": facts["renderer"].render(sentence, src, tgt), "n_predict": budget,
                                    **sampling}
                            got = post(server.port, "/completion", body)["content"]
                        rows.append({"source": sentence, "edge_translate": expected, "server": got, "same": got == expected,
                                     "same_as_batched": got == batched[direction][ALL_SENTENCES.index(sentence)]})
                    same = sum(r["same"] for r in rows)
                    log(f"{model.name} [{name}] {direction} {label}: {same}/{len(rows)} identical")
                    cases.append({"direction": direction, "request": label, "identical": same, "of": len(rows),
                                  "identical_to_batched": sum(r["same_as_batched"] for r in rows), "rows": rows})
            if name == "llama-server defaults":  # is flash attention (-fa auto) the whole difference?
                for case in cases:
                    src, tgt = case["direction"].split("->")
                    with_fa = edge_translate_flash_attn(model, src, tgt, [r["source"] for r in case["rows"]])
                    case["identical_to_edge_translate_with_flash_attn"] = sum(
                        fa == r["server"] for fa, r in zip(with_fa, case["rows"]))
            out["configs"][name] = {"flags": flags, "server_settings": server.settings(),
                                    "identical": sum(c["identical"] for c in cases), "of": sum(c["of"] for c in cases),
                                    "identical_to_batched": sum(c["identical_to_batched"] for c in cases),
                                    "cases": cases}
    return out


def slim(model_report: dict) -> dict:
    """Keep edge-translate's outputs once per direction and, per case, only the answers that differ."""
    outputs: dict[str, list[str]] = {}
    for config in model_report["configs"].values():
        for case in config["cases"]:
            rows = case.pop("rows", None)
            if rows is None:
                continue
            outputs.setdefault(case["direction"], [r["edge_translate"] for r in rows])
            case["different"] = [{"source": r["source"], "edge_translate": r["edge_translate"], "server": r["server"]}
                                 for r in rows if not r["same"]]
    model_report.setdefault("edge_translate_outputs", outputs)
    return model_report


def pick_bundles(given: list[str]) -> list[Path]:
    if given:
        return [Path(b) for b in given]
    found = [DEMO_BUNDLES / name for name in DEFAULT_BUNDLES if (DEMO_BUNDLES / name / "manifest.json").is_file()]
    if not found:
        raise SystemExit(f"error: no demo GGUF bundle under {DEMO_BUNDLES}; run `make demo` or pass --bundle DIR")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=[], help="GGUF bundle directory (repeatable); "
                    f"default: {', '.join(DEFAULT_BUNDLES)} under runs/demo/bundles")
    ap.add_argument("--jobs", type=int, default=1, help="build jobs for llama-server")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()

    bundles = pick_bundles(args.bundle)
    binary = build_server(llama_cpp_source(), args.jobs, args.rebuild)
    logs = WORK / "server-logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "what": "llama-server built from the pinned llama.cpp (vendor/llama.cpp of llama-cpp-python's sdist) vs "
                f"edge-translate --threads {THREADS}, greedy (temperature 0 in the request, or the server's --temp 0 "
                "under the README command), token budget per sentence as edge-translate's (max_tokens / n_predict)",
        "sentences": ALL_SENTENCES,
        "server_configs": SERVER_CONFIGS,
        "models": [],
    }
    default_gguf = export_models()["F32"]
    report["models"].append(slim(check_model(binary, default_gguf, ["en->de", "en->fr"], logs)))
    for bundle in bundles:
        from runtime.bundle import load_bundle

        directions = [str(d) for d in load_bundle(bundle).directions]
        report["models"].append(slim(check_model(binary, bundle, directions, logs)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for m in report["models"]:
        for name, c in m["configs"].items():
            fa = sum(case.get("identical_to_edge_translate_with_flash_attn", 0) for case in c["cases"])
            log(f"{Path(m['model']).name} [{name}]: {c['identical']}/{c['of']} answers identical to edge-translate "
                f"--batch-size 1, {c['identical_to_batched']}/{c['of']} to --batch-size {DEFAULT_BATCH_SIZE}"
                + (f"; {fa}/{c['of']} to edge-translate with flash attention on" if name == "llama-server defaults" else ""))
    log(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
