"""The runtime imports only what a bundle's format needs (issue 19, part 4): a GGUF model never
imports onnxruntime (nor llama-cpp-python's high-level half), an ONNX model never llama_cpp."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
WATCH = ["onnxruntime", "tokenizers", "llama_cpp", "llama_cpp.llama", "llama_cpp.llama_cpp", "torch", "transformers", "gguf"]


def _modules_after(code: str) -> dict:
    script = code + f"\nimport json, sys\nprint(json.dumps([m for m in {WATCH!r} if m in sys.modules]))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not (DEFAULT / "config.json").is_file(), reason="models/default is not trained")
def test_gguf_translation_imports_only_the_llama_cpp_binding(tmp_path):
    from converters.gguf.export import export_gguf

    gguf = export_gguf(DEFAULT, tmp_path / "default.gguf", dtype="f16")
    loaded = _modules_after(
        "from runtime.backends import open_backend\n"
        f"b = open_backend({str(gguf)!r}, n_threads=1)\n"
        "assert b.translate('Open the file.', 'en', 'de', max_new_tokens=16)\n")
    assert loaded == {"llama_cpp.llama_cpp"}
    # the package imported afterwards is whole and shares the binding
    both = _modules_after(
        "from runtime.backends.llama_cpp_backend import llama_module\n"
        "low = llama_module()\n"
        "import llama_cpp\n"
        "assert llama_cpp.llama_cpp is low and llama_cpp.Llama and llama_cpp.llama_backend_init\n")
    assert {"llama_cpp", "llama_cpp.llama", "llama_cpp.llama_cpp"} <= both


def test_onnx_backend_imports_no_llama_cpp():
    loaded = _modules_after(
        "import runtime.cli\n"
        "from runtime.backends import backend_class\n"
        "backend_class('onnx')\n"
        "from runtime.backends.onnx_backend import _ort\n"
        "_ort()\n"
        "import tokenizers\n")
    assert not any(m.startswith("llama_cpp") for m in loaded) and "torch" not in loaded


def test_cli_import_loads_no_backend():
    assert _modules_after("import runtime.cli\nfrom runtime.bundle import load_bundle\n") == set()
