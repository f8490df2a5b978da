"""Build and run tests/llama_jinja_render.cpp: llama.cpp's own Jinja engine (common/jinja of the
pinned llama-cpp-python source) on a chat template. Used by tests/test_chat_template.py.

The source is the unpacked llama-cpp-python sdist (`pip download --no-binary :all:
llama-cpp-python==0.3.36`, then untar), found through LLAMA_CPP_PYTHON_SRC. The binary is cached
under ~/.cache/edge-translate (built once; well under a minute of one core here).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "llama_jinja_render.cpp"
DEFAULT_SOURCE = Path("/tmp/lcp_src/llama_cpp_python-0.3.36")
SOURCES = ["common/jinja/lexer.cpp", "common/jinja/parser.cpp", "common/jinja/runtime.cpp", "common/jinja/value.cpp",
           "common/jinja/string.cpp", "common/jinja/caps.cpp", "common/json.cpp", "common/unicode.cpp"]


def llama_source() -> Path | None:
    root = Path(os.environ.get("LLAMA_CPP_PYTHON_SRC", DEFAULT_SOURCE)) / "vendor" / "llama.cpp"
    return root if all((root / name).is_file() for name in SOURCES) else None


def ggml_base_lib() -> Path | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    return lib if lib.is_file() else None


def build(root: Path) -> Path:
    """The harness binary (built once, cached by the hash of its inputs)."""
    lib = ggml_base_lib()
    digest = hashlib.sha256(HARNESS.read_bytes())
    for name in SOURCES:
        digest.update((root / name).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-translate"
    binary = cache / f"llama-jinja-render-{digest.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        objects = []
        for source in [HARNESS] + [root / name for name in SOURCES]:
            obj = Path(tmp) / (source.name.replace("/", "_") + f".{len(objects)}.o")
            subprocess.run(["g++", "-std=c++17", "-O1", "-c", str(source), "-o", str(obj), f"-I{root / 'common'}",
                            f"-I{root / 'vendor'}", f"-I{root / 'ggml' / 'include'}"], check=True)
            objects.append(str(obj))
        link = ["g++", "-o", str(Path(tmp) / "out"), *objects]
        if lib is not None:
            link += [str(lib), f"-Wl,-rpath,{lib.parent}"]
        subprocess.run(link, check=True)
        os.replace(Path(tmp) / "out", binary)
    return binary


def render(binary: Path, template: str, variables: dict) -> tuple[str, bool]:
    """(prompt, supports_system_role as llama.cpp's capability probe sees the template)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.jinja").write_text(template, encoding="utf-8")
        (Path(tmp) / "v.json").write_text(json.dumps(variables), encoding="utf-8")
        done = subprocess.run([str(binary), str(Path(tmp) / "t.jinja"), str(Path(tmp) / "v.json")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp jinja failed: {done.stderr.strip()}")
    first, _, prompt = done.stdout.partition("\n")
    return prompt, first.strip() == "supports_system_role=1"


def available() -> bool:
    return llama_source() is not None and shutil.which("g++") is not None


if __name__ == "__main__":
    print(build(llama_source()))
