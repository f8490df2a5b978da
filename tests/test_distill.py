"""`packager distill` on tiny random Qwen3-MoE models: the loss on the distillation set goes
down, the output is a pruned checkpoint that loads and exports, parent outputs are cached and
reused without loading the parent, an interrupted run resumes to the same weights, and bad
inputs give one clear error."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import WORDS, build_tiny, byte_bpe

import packager.distill.targets as targets_module
from packager import load_pruned
from packager.distill import PROVENANCE_NAME, DistillError, DistillSettings, distill
from packager.core.errors import OutputExistsError
from packager.core.fingerprint import model_fingerprint
from packager.core.plan_file import Plan
from packager.prune import PROVENANCE_NAME as PRUNING_NAME
from packager.prune import prune_checkpoint

REPO = Path(__file__).resolve().parents[1]
HARVEST = REPO / "data" / "harvest"
VOCAB = 320
UNIFORM_KEEP = {0: [1, 3, 4, 6], 1: [0, 2, 5, 7]}
NONUNIFORM_KEEP = {0: [0, 1, 2, 5, 6, 7], 1: [2, 5]}
# a few steps on 60 sentences per direction; unfinished outputs of the random parent are kept
FAST = dict(pairs=("en-de", "de-en"), sentences=30, max_steps=12, lr=3e-3, batch_tokens=600, eval_every=4,
            patience=10, max_new_tokens=12, keep_unfinished=True, drop_flagged=False,
            gen_batch_size=16, warmup_steps=2)


def _harvest_records(limit: int) -> list[dict]:
    """Short en-de records of the harvested dev split (synthetic ones when it is absent)."""
    path = HARVEST / "dev.jsonl"
    records = []
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record["tgt_lang"] == "de" and len(record["src"]) < 40 and len(record["tgt"]) < 50:
                    records.append({k: record[k] for k in ("src_lang", "tgt_lang", "src", "tgt")})
                if len(records) >= limit:
                    break
    rng = np.random.default_rng(0)
    while len(records) < limit:
        words = list(rng.choice(WORDS, size=4))
        records.append({"src_lang": "en", "tgt_lang": "de", "src": " ".join(words), "tgt": " ".join(words[::-1])})
    return records


def _write_bpe_tokenizer(model_dir: Path, records: list[dict]) -> None:
    byte_bpe([r[k] for r in records for k in ("src", "tgt")], VOCAB).save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def data(work) -> Path:
    records = _harvest_records(200)
    path = work / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def parent(work, data) -> Path:
    out = build_tiny("qwen3_moe", work / "parent", vocab_size=VOCAB)
    _write_bpe_tokenizer(out, [json.loads(line) for line in data.read_text().splitlines()])
    return out


def _prune(parent: Path, keep: dict, out: Path) -> Path:
    plan = Plan(model_fingerprint=model_fingerprint(parent), keep=keep, meta={"ranker": "test"})
    return prune_checkpoint(parent, plan, out)


@pytest.fixture(scope="module")
def pruned(parent, work) -> Path:
    return _prune(parent, UNIFORM_KEEP, work / "pruned")


@pytest.fixture(scope="module")
def first_run(pruned, parent, data, work):
    """The reference run: parent translates (cache miss), 12 steps."""
    calls = []
    real = targets_module._load_parent

    def counting(path, dtype):
        calls.append(path)
        return real(path, dtype)

    targets_module._load_parent = counting
    try:
        result = distill(pruned, parent, [data], DistillSettings(**FAST), work / "distilled", cache_dir=work / "cache")
    finally:
        targets_module._load_parent = real
    return result, calls


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


# ------------------------------------------------------------------------------ behaviour
def test_loss_goes_down_and_output_is_a_pruned_checkpoint(first_run, pruned, parent):
    result, calls = first_run
    out = result.out_dir
    prov = json.loads((out / PROVENANCE_NAME).read_text())
    assert calls == [parent]
    assert prov["parent_outputs"]["cache"] == "miss"
    assert prov["run"]["step"] == 12 and prov["run"]["stopped"] == "step budget"
    assert prov["sentences"]["sampled"] == 60  # 30 per direction
    assert prov["sentences"]["train"] + prov["sentences"]["dev"] == 60
    assert prov["run"]["probe_loss_final"] < prov["run"]["probe_loss_initial"] - 0.3
    assert prov["run"]["best_dev_loss"] < prov["run"]["dev_loss_initial"]
    assert [h["step"] for h in prov["history"]] == [0, 4, 8, 12]
    assert prov["input"]["keep"] == {"0": UNIFORM_KEEP[0], "1": UNIFORM_KEEP[1]}
    assert prov["parent"]["fingerprint"] == model_fingerprint(parent)
    # same config, side files and tensor names/shapes as the pruner's output; weights trained
    for name in ("config.json", PRUNING_NAME, "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (pruned / name).read_bytes(), name
    before, after = _tensors(pruned), _tensors(out)
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {k: (v.dtype, v.shape) for k, v in before.items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.mlp.gate.weight" in changed and "model.layers.1.mlp.experts.3.down_proj.weight" in changed
    assert prov["output"]["model_fingerprint"] == model_fingerprint(out) != model_fingerprint(pruned)
    # it loads and computes exactly what the saved weights say
    model = load_pruned(out, dtype=torch.float32)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.gate.weight"], after["model.layers.0.mlp.gate.weight"])


def test_output_exports_to_gguf_with_parity(first_run, work):
    from converters.gguf.export import export_gguf
    from runtime.backends import open_backend

    out = first_run[0].out_dir
    gguf_file = export_gguf(out, work / "distilled.gguf", dtype="f32")
    model = load_pruned(out, dtype=torch.float32).eval()
    with open_backend(gguf_file, n_threads=1, parity=True) as backend:
        ids = backend.prompt_ids("Open the file", "en", "de")
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert float(np.abs(backend.logits(ids) - ref).max()) <= 1e-4


def test_cached_parent_outputs_are_reused(first_run, pruned, parent, data, work, monkeypatch):
    def forbidden(*args):
        raise AssertionError("the parent must not be loaded when its outputs are cached")

    monkeypatch.setattr(targets_module, "_load_parent", forbidden)
    result = distill(pruned, parent, [data], DistillSettings(**FAST), work / "distilled-again", cache_dir=work / "cache")
    assert result.provenance["parent_outputs"]["cache"] == "hit"
    assert result.provenance["parent_outputs"]["cache_file"] == first_run[0].provenance["parent_outputs"]["cache_file"]
    # same inputs and seed: the same weights
    first, again = _tensors(first_run[0].out_dir), _tensors(result.out_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # other decoding settings are another cache entry
    other = DistillSettings(**{**FAST, "max_new_tokens": 10, "max_steps": 1})
    with pytest.raises(AssertionError, match="must not be loaded"):
        distill(pruned, parent, [data], other, work / "distilled-other", cache_dir=work / "cache")
    assert not (work / "distilled-other").exists()


def test_interrupted_run_resumes_to_the_same_weights(first_run, pruned, parent, data, work):
    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    out, state_dir = work / "resumed", work / "resume-state"
    with pytest.raises(KeyboardInterrupt):
        distill(pruned, parent, [data], DistillSettings(**FAST), out, cache_dir=work / "cache", work_dir=state_dir,
                on_step=interrupt)
    assert not out.exists()
    assert json.loads((state_dir / "state.json").read_text())["step"] == 5
    result = distill(pruned, parent, [data], DistillSettings(**FAST), out, cache_dir=work / "cache", work_dir=state_dir)
    assert result.provenance["run"]["resumed_from_step"] == 5
    assert result.provenance["run"]["step"] == 12
    assert not state_dir.exists()  # removed after success
    first, resumed = _tensors(first_run[0].out_dir), _tensors(out)
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_sft_on_references_never_loads_the_parent(pruned, parent, data, work, monkeypatch):
    monkeypatch.setattr(targets_module, "_load_parent", lambda *args: pytest.fail("SFT must not run the parent"))
    settings = DistillSettings(**{**FAST, "targets": "references", "max_steps": 8})
    result = distill(pruned, parent, [data], settings, work / "sft", cache_dir=work / "cache")
    prov = result.provenance
    assert prov["targets"] == "references" and "parent_outputs" not in prov
    assert prov["run"]["probe_loss_final"] < prov["run"]["probe_loss_initial"]


def test_nonuniform_pruned_model(parent, data, work):
    pruned = _prune(parent, NONUNIFORM_KEEP, work / "pruned-nonuniform")
    settings = DistillSettings(**{**FAST, "max_steps": 4})
    result = distill(pruned, parent, [data], settings, work / "distilled-nonuniform", cache_dir=work / "cache")
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["expert_counts_per_layer"] == [6, 2]
    model = load_pruned(result.out_dir, dtype=torch.float32)
    assert model.state_dict()["model.layers.1.mlp.gate.weight"].shape == (2, 32)
    assert result.provenance["input"]["keep"] == {"0": NONUNIFORM_KEEP[0], "1": NONUNIFORM_KEEP[1]}


def test_a_distilled_model_can_be_distilled_again(first_run, parent, data, work):
    settings = DistillSettings(**{**FAST, "max_steps": 2})
    result = distill(first_run[0].out_dir, parent, [data], settings, work / "twice", cache_dir=work / "cache")
    assert result.provenance["input"]["already_distilled"] is True and result.provenance["input"]["keep"] is None


# ------------------------------------------------------------------------------ bad inputs
def test_parent_of_another_model_is_refused(pruned, data, work):
    other = build_tiny("qwen3_moe", work / "other-parent", seed=1, vocab_size=VOCAB)
    (other / "tokenizer.json").write_bytes((pruned / "tokenizer.json").read_bytes())
    with pytest.raises(DistillError, match=r"pruning.json: pruned from model [0-9a-f]{16}\.\.\., but .*other-parent"):
        distill(pruned, other, [data], DistillSettings(**FAST), work / "bad1")
    # without the pruner's record the router rows still tell
    copy = work / "pruned-no-record"
    copy.mkdir()
    for path in pruned.iterdir():
        if path.name != PRUNING_NAME:
            (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DistillError, match=r"layer 0 router row 0 equals no router row of the parent .*other-parent"):
        distill(copy, other, [data], DistillSettings(**FAST), work / "bad2")
    assert not (work / "bad1").exists() and not (work / "bad2").exists()


def test_parent_of_another_family_is_refused(pruned, data, work):
    mixtral = build_tiny("mixtral", work / "mixtral-parent", vocab_size=VOCAB)
    with pytest.raises(DistillError, match="family qwen3_moe but the parent .*mixtral-parent is mixtral"):
        distill(pruned, mixtral, [data], DistillSettings(**FAST), work / "bad3")


def test_different_tokenizer_is_refused(pruned, parent, data, work):
    copy = work / "pruned-other-tokenizer"
    copy.mkdir()
    for path in pruned.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(DistillError, match="chat_template.jinja: differs from the parent's"):
        distill(copy, parent, [data], DistillSettings(**FAST), work / "bad4")


def test_empty_data_and_settings_errors(pruned, parent, data, work):
    empty = work / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DistillError, match=r"empty\.jsonl: no sentences in the file \(empty data\)"):
        distill(pruned, parent, [empty], DistillSettings(**FAST), work / "bad5")
    with pytest.raises(DistillError, match="no en-fr sentences"):
        distill(pruned, parent, [data], DistillSettings(**{**FAST, "pairs": ("en-fr",)}), work / "bad6")
    with pytest.raises(DistillError, match="bound the training"):
        distill(pruned, parent, [data], DistillSettings(**{**FAST, "max_steps": None}), work / "bad7")
    with pytest.raises(OutputExistsError, match="pass --force"):
        distill(pruned, parent, [data], DistillSettings(**FAST), pruned.parent / "pruned")
    assert not any((work / name).exists() for name in ("bad5", "bad6", "bad7"))


def test_unfinished_and_empty_parent_outputs_are_dropped(pruned, parent, data, work, monkeypatch):
    # parent outputs with known endings: every 3rd is cut by the bound, every 3rd+1 is empty
    def fake_outputs(parent_dir, samples, settings, progress=None):
        rows = []
        for i, sample in enumerate(samples):
            finished, text = (False, "Haus Haus") if i % 3 == 0 else (True, "" if i % 3 == 1 else "das Haus")
            ids = [2] if text == "" else [40, 41] + ([2] if finished else [])
            rows.append({"pair": sample.pair, "source": sample.source, "ids": ids, "text": text, "finished": finished})
        return rows

    monkeypatch.setattr(targets_module, "parent_outputs", fake_outputs)
    settings = DistillSettings(**{**FAST, "keep_unfinished": False, "max_steps": 1, "max_new_tokens": 7})
    result = distill(pruned, parent, [data], settings, work / "dropped", cache_dir=work / "cache-fake")
    sentences = result.provenance["sentences"]
    assert sentences["dropped"] == {"unfinished": 20, "empty": 20, "flagged": 0, "too_long": 0}
    assert sentences["train"] + sentences["dev"] == 20
    kept = DistillSettings(**{**FAST, "keep_unfinished": True, "max_steps": 1, "max_new_tokens": 7})
    result = distill(pruned, parent, [data], kept, work / "kept", cache_dir=work / "cache-fake")
    assert result.provenance["sentences"]["dropped"] == {"unfinished": 0, "empty": 20, "flagged": 0, "too_long": 0}
    # nothing usable left: a clear error
    monkeypatch.setattr(targets_module, "parent_outputs",
                        lambda d, samples, s, p=None: [{**row, "finished": False} for row in fake_outputs(d, samples, s)])
    nothing = DistillSettings(**{**FAST, "keep_unfinished": False, "max_new_tokens": 6})
    with pytest.raises(DistillError, match=r"only 0 usable training example\(s\) after dropping \{'unfinished': 60"):
        distill(pruned, parent, [data], nothing, work / "bad8", cache_dir=work / "cache-fake")
    assert not (work / "bad8").exists()


def test_cli_prints_one_error_line(pruned, parent, work):
    empty = work / "empty-cli.jsonl"
    empty.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "packager.cli", "distill", str(pruned), "--parent", str(parent),
                           "--data", str(empty), "--pairs", "en-de", "--out", str(work / "cli-out"), "--max-steps", "2"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty-cli.jsonl" in lines[0] and "empty data" in lines[0]
    assert not (work / "cli-out").exists()


def test_flagged_parent_outputs_are_dropped(pruned, parent, data, work, monkeypatch):
    # every other parent output is a loop; the rest are the reference translations
    def fake_outputs(parent_dir, samples, settings, progress=None):
        rows = []
        for i, sample in enumerate(samples):
            text = "Haus Haus Haus Haus Haus Haus" if i % 2 == 0 else sample.reference
            rows.append({"pair": sample.pair, "source": sample.source, "ids": [40, 41, 2], "text": text, "finished": True})
        return rows

    monkeypatch.setattr(targets_module, "parent_outputs", fake_outputs)
    settings = DistillSettings(**{**FAST, "drop_flagged": True, "max_steps": 1})
    result = distill(pruned, parent, [data], settings, work / "flagged", cache_dir=work / "cache-flagged")
    sentences = result.provenance["sentences"]
    assert sentences["sampled"] == 60
    assert sentences["dropped"] == {"unfinished": 0, "empty": 0, "flagged": 30, "too_long": 0}
    assert sentences["train"] + sentences["dev"] == 30
    kept = DistillSettings(**{**FAST, "drop_flagged": False, "max_steps": 1})
    result = distill(pruned, parent, [data], kept, work / "unflagged", cache_dir=work / "cache-flagged")
    assert result.provenance["sentences"]["dropped"]["flagged"] == 0


def test_flag_kinds_of_parent_outputs():
    from packager.distill import Sample, flagged_outputs

    source = "The file could not be saved because the disk is full."
    samples = [Sample("en-de", source, "Die Datei konnte nicht gespeichert werden, weil der Datenträger voll ist.")] * 4
    texts = ["Die Datei konnte nicht gespeichert werden, weil der Datenträger voll ist.",
             "Datei Datei Datei Datei Datei Datei",
             "Файл не может быть сохранён, потому что диск заполнен.",
             "Die Datei %s konnte nicht gespeichert werden, weil der Datenträger voll ist."]
    rows = [{"text": t} for t in texts]
    assert flagged_outputs(samples, rows) == [[], ["repetition"], ["wrong_script"], []]
    with_placeholder = [Sample("en-de", "Cannot open %s: the disk is full.", "%s kann nicht geöffnet werden.")]
    assert flagged_outputs(with_placeholder, [{"text": "Kann nicht geöffnet werden: der Datenträger ist voll."}]) == [["lost_placeholder"]]


SFT = dict(FAST, targets="references", max_steps=2)
FULL_DISK = r": no space left on device \(needs [^)]*\); free space or write elsewhere; nothing was written$"


@pytest.mark.parametrize("limit", [100, 20_000])  # transformers' own save fails, then the checkpoint writer
def test_a_full_output_folder_is_one_error_line_and_leaves_nothing(pruned, parent, data, tmp_path, monkeypatch, limit):
    from full_disk import FullDisk

    from runtime.atomic import OutputError

    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, limit).install(monkeypatch)
    with pytest.raises(OutputError) as caught:
        distill(pruned, parent, [data], DistillSettings(**SFT), out / "distilled", work_dir=tmp_path / "work")
    assert re.match(re.escape(str(out / "distilled")) + FULL_DISK, str(caught.value))
    assert list(out.iterdir()) == []


def test_a_full_disk_at_the_training_state_is_one_error_line(pruned, parent, data, tmp_path, monkeypatch):
    from full_disk import FullDisk

    from runtime.atomic import OutputError

    work_dir = tmp_path / "work"
    FullDisk(work_dir, 100).install(monkeypatch)
    with pytest.raises(OutputError) as caught:
        distill(pruned, parent, [data], DistillSettings(**SFT), tmp_path / "distilled", work_dir=work_dir)
    assert re.match(re.escape(str(work_dir / "state.json")) + FULL_DISK, str(caught.value))
    assert not (tmp_path / "distilled").exists()
    # the weights are written whole (atomically) or not at all; without state.json a re-run starts over
    assert sorted(p.name for p in work_dir.iterdir()) == ["best.safetensors", "model.safetensors", "optimizer.safetensors"]


def _native_full_disk(*args, **kwargs):
    """What safetensors' native writer raises on a full disk (checked: a file size limit gives
    'Error while serializing: I/O error: File too large (os error 27)')."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_native_full_disk_error_of_safetensors_is_one_line_too(pruned, parent, data, tmp_path, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    from runtime.atomic import OutputError

    with monkeypatch.context() as patch:  # the training state's first save: the best weights
        patch.setattr(safetensors.torch, "save_model", _native_full_disk)
        with pytest.raises(OutputError) as caught:
            distill(pruned, parent, [data], DistillSettings(**SFT), tmp_path / "a", work_dir=tmp_path / "work-a")
    assert re.match(re.escape(str(tmp_path / "work-a" / "best.safetensors")) + FULL_DISK, str(caught.value))
    assert list((tmp_path / "work-a").iterdir()) == [] and not (tmp_path / "a").exists()
    with monkeypatch.context() as patch:  # transformers' save of the trained weights
        patch.setattr(transformers.modeling_utils, "safe_save_file", _native_full_disk)
        with pytest.raises(OutputError) as caught:
            distill(pruned, parent, [data], DistillSettings(**SFT), tmp_path / "b", work_dir=tmp_path / "work-b")
    assert re.match(re.escape(str(tmp_path / "b")) + FULL_DISK, str(caught.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work-a", "work-b"]
