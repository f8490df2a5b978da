"""Writing stages fail in one line and leave nothing behind: a simulated full disk (a write
wrapper raising ENOSPC after N bytes), a missing or read-only output folder, SIGTERM; and the
same inputs give byte-identical files (GGUF, ONNX, pruned checkpoints, bundles, reports)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from full_disk import FullDisk
from test_bundle import gguf_file, metrics_path, test_data, work  # noqa: F401 (fixtures)
from test_gguf import KEEP, build_model
from test_report import runs  # noqa: F401 (fixture)

import converters.gguf.quantize as quantize_module
from converters.gguf.export import export_gguf
from converters.gguf.errors import QuantizeError
from converters.gguf.prune_gguf import prune_gguf
from converters.gguf.quantize import quantize_gguf
from converters.onnx.export import export_onnx
from packager.bundle import make_bundle
from packager.core.fingerprint import model_fingerprint
from packager.core.plan_file import Plan
from packager.prune import prune_checkpoint
from packager.report import build_report
from runtime.atomic import OutputError, atomic_output, atomic_write_json

VENV_BIN = Path(sys.executable).parent


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return build_model("qwen3_moe", tmp_path_factory.mktemp("parent") / "parent")


@pytest.fixture(scope="module")
def plan_file(parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    return Plan(model_fingerprint=model_fingerprint(parent), keep=KEEP, meta={"ranker": "test"}).save(out)


# ---------------------------------------------------------------------------- the helper itself
def test_atomic_output_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 100).install(monkeypatch)
    with pytest.raises(OutputError) as caught:
        atomic_write_json(out / "big.json", {"x": "y" * 500})
    message = str(caught.value)
    assert message.startswith(f"{out / 'big.json'}: no space left on device (needs 514 bytes, ")
    assert "\n" not in message and "nothing was written" in message
    assert list(out.iterdir()) == []


def test_missing_and_read_only_folders(tmp_path, monkeypatch):
    with pytest.raises(OutputError, match=r"nowhere/a.json: the output folder .*nowhere does not exist; create it"):
        atomic_write_json(tmp_path / "nowhere" / "a.json", {})
    real_mkstemp = __import__("tempfile").mkstemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(OutputError, match=r"a.json: read-only file system; write elsewhere"):
        atomic_write_json(tmp_path / "a.json", {})
    monkeypatch.setattr("tempfile.mkstemp", real_mkstemp)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert _temps(tmp_path) == [] and not (tmp_path / "b.bin").exists()


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / ".model.gguf.999999999.abc.tmp"
    stale.write_bytes(b"left by a killed export")
    mine = tmp_path / f".model.gguf.{os.getpid()}.abc.tmp"
    mine.write_bytes(b"in progress")
    with atomic_output(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    assert not stale.exists() and mine.exists()
    assert (tmp_path / "model.gguf").read_bytes() == b"GGUF"


# ---------------------------------------------------------------------------- the stages
def test_export_gguf_on_a_full_disk(parent, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 4096).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{out / 'model.gguf'}: no space left on device \(needs [\d,]+ bytes, "):
        export_gguf(parent, out / "model.gguf", dtype="f32")
    assert list(out.iterdir()) == []


def test_prune_on_a_full_disk(parent, plan_file, tmp_path, monkeypatch):
    FullDisk(tmp_path, 4096).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'pruned'}: no space left on device"):
        prune_checkpoint(parent, plan_file, tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []


def test_prune_gguf_on_a_full_disk(parent, plan_file, tmp_path, monkeypatch):
    source = export_gguf(parent, tmp_path / "parent.gguf", dtype="f32")
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 2048).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{out / 'pruned.gguf'}: no space left on device"):
        prune_gguf(source, plan_file, out / "pruned.gguf")
    assert list(out.iterdir()) == []


def test_quantize_on_a_full_disk(parent, tmp_path, monkeypatch):
    """llama.cpp writes the quantized file itself (native writes the wrapper cannot reach): its
    failure beside a full folder is one line; a full disk at the export config leaves no GGUF."""
    source = export_gguf(parent, tmp_path / "parent.gguf", dtype="f32")
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 1024).install(monkeypatch)  # the quantized GGUF (native) fits, its export config does not
    with pytest.raises(OutputError, match=rf"^{out / 'model.Q8_0.export.json'}: no space left on device"):
        quantize_gguf(source, out / "model.Q8_0.gguf", "Q8_0")
    assert list(out.iterdir()) == []
    monkeypatch.undo()

    import llama_cpp

    def native_full_disk(src, dst, params):  # what llama.cpp returns when its write fails: 1, a partial file
        Path(dst.decode()).write_bytes(b"GGUF partial")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", native_full_disk)
    monkeypatch.setattr(quantize_module, "_free_bytes", lambda directory: 4096)
    with pytest.raises(QuantizeError) as caught:
        quantize_gguf(source, out / "model.Q8_0.gguf", "Q8_0")
    assert str(caught.value).startswith(f"{out / 'model.Q8_0.gguf'}: llama.cpp's quantizer failed for Q8_0 (code 1) "
                                        "with 4,096 bytes free beside it; free space or write elsewhere")
    assert "\n" not in str(caught.value)
    assert list(out.iterdir()) == []


def test_export_onnx_on_a_full_disk(parent, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 4096).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{out / 'model.onnx.d'}: no space left on device"):
        export_onnx(parent, out / "model.onnx.d", hash_inputs=False, check=False, external_data_threshold_bytes=1)
    assert list(out.iterdir()) == []


def test_bundle_on_a_full_disk(gguf_file, metrics_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 4096).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{out / 'bundle'}: no space left on device \(needs [\d,]+ bytes, "):
        make_bundle(gguf_file, metrics_path, out / "bundle", archive=True)
    assert list(out.iterdir()) == []


def test_bundle_archive_on_a_full_disk(gguf_file, metrics_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    size = gguf_file.stat().st_size
    FullDisk(out, size + 64 * 1024).install(monkeypatch)  # the bundle fits, its tar does not
    with pytest.raises(OutputError, match=rf"^{out / 'bundle.tar'}: no space left on device"):
        make_bundle(gguf_file, metrics_path, out / "bundle", archive=True)
    assert list(out.iterdir()) == []


def test_report_on_a_full_disk_and_a_read_only_folder(runs, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    FullDisk(out, 2048).install(monkeypatch)
    with pytest.raises(OutputError, match=rf"^{out}/report\.\w+: no space left on device"):
        build_report([runs], out)
    assert _temps(out) == []
    monkeypatch.undo()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'elsewhere'}: read-only file system; write elsewhere"):
        build_report([runs], tmp_path / "elsewhere")


def test_cli_says_one_line_for_a_missing_output_folder(parent, tmp_path):
    result = subprocess.run([str(VENV_BIN / "packager"), "export", "gguf", str(parent), "--out",
                             str(tmp_path / "missing" / "model.gguf")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert str(tmp_path / "missing") in result.stderr


def test_sigterm_removes_the_temporary_file_and_says_interrupted(tmp_path):
    script = (
        "import sys, time\n"
        "out = sys.argv[1]\n"
        "from runtime.atomic import atomic_output\n"
        "from packager.cli import main\n"
        "import packager.cli as cli\n"
        "def slow(*a, **k):\n"
        "    with atomic_output(out) as tmp:\n"
        "        tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(60)\n"
        "cli.cli.add_command(__import__('click').command('slow')(slow))\n"
        "sys.argv = ['packager', 'slow']\n"
        "main()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out.bin")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    assert len(_temps(tmp_path)) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert err.strip().startswith("interrupted")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- reproducible files
def test_the_same_inputs_give_byte_identical_gguf(parent, plan_file, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    (tmp_path / "a").mkdir()
    first = export_gguf(parent, tmp_path / "a" / "model.gguf", dtype="f16")
    second = export_gguf(parent, tmp_path / "model.gguf", dtype="f16", force=True)
    assert first.read_bytes() == second.read_bytes()
    pruned = [prune_gguf(first, plan_file, tmp_path / f"pruned{i}.gguf") for i in (1, 2)]
    assert pruned[0].read_bytes() == pruned[1].read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = export_gguf(parent, tmp_path / "stamped.gguf", dtype="f16")
    assert b'"created_unix": 1700000000' in stamped.read_bytes()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_same_inputs_give_byte_identical_onnx(parent, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    for threshold in (1, 2**40):  # weights in model.onnx.data, then folded into model.onnx
        first = export_onnx(parent, tmp_path / f"a{threshold}", hash_inputs=False, check=False,
                            external_data_threshold_bytes=threshold)
        second = export_onnx(parent, tmp_path / f"b{threshold}", hash_inputs=False, check=False,
                             external_data_threshold_bytes=threshold)
        files = _files(first)
        assert {"model.onnx", "tokenizer.json", "model.export.json"} <= set(files)
        assert ("model.onnx.data" in files) == (threshold == 1)
        assert files == _files(second)
        assert b"created_unix" not in files["model.export.json"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = export_onnx(parent, tmp_path / "stamped", hash_inputs=False, check=False)
    assert '"created_unix": 1700000000' in (stamped / "model.export.json").read_text()


def test_the_same_inputs_give_a_byte_identical_pruned_checkpoint(parent, plan_file, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = prune_checkpoint(parent, plan_file, tmp_path / "a")
    second = prune_checkpoint(parent, plan_file, tmp_path / "b")
    files = _files(first)
    assert {"config.json", "model.safetensors", "pruning.json"} <= set(files)
    assert files == _files(second)
    assert b"created" not in files["pruning.json"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = prune_checkpoint(parent, plan_file, tmp_path / "stamped")
    assert '"created_unix": 1700000000' in (stamped / "pruning.json").read_text()


def test_the_same_inputs_give_a_byte_identical_bundle_and_archive(gguf_file, metrics_path, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_bundle(gguf_file, metrics_path, tmp_path / "a" / "bundle", archive=True)
    second = make_bundle(gguf_file, metrics_path, tmp_path / "b" / "bundle", archive=True)
    assert _files(first) == _files(second)
    assert (tmp_path / "a" / "bundle.tar").read_bytes() == (tmp_path / "b" / "bundle.tar").read_bytes()
    assert b'"created"' not in (first / "manifest.json").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = make_bundle(gguf_file, metrics_path, tmp_path / "stamped")
    assert '"created": "2023-11-14T22:13:20Z"' in (stamped / "manifest.json").read_text()


def test_the_same_inputs_give_a_byte_identical_report(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = build_report([runs], tmp_path / "a", command="packager report").parent
    second = build_report([runs], tmp_path / "b", command="packager report").parent
    files = _files(first)
    assert set(files) == {"index.html", "report.csv", "report.json", "report.md"}
    assert files == _files(second)
    assert b'"created"' not in files["report.json"] and b"generated by packager" in files["index.html"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = build_report([runs], tmp_path / "stamped", command="packager report").parent
    assert "generated 2023-11-14 22:13 UTC by packager" in (stamped / "index.html").read_text()
