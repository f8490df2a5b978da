"""Calibration on tiny Qwen3-MoE models: a model with hand-set routers recovers the planted
ranking and counts every span exactly; REAP and routing mass match a reference computed from
the weights; merging shards equals one run; the CLI chain works and bad input gives one
error line."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from packager_cli import RUNNER_SCRIPT
from tiny_models import build_tiny

from packager.calibrate import CalibrationError, CalibrationSettings, calibrate, load_model
from packager.calibration_data import parse_pair_list
from packager.planning import PlanSettings, expert_order, plan_keep
from packager.core.stats import merge_stats

TEMPLATE = "{{ bos_token }}<|{{ source_lang }}|><|{{ target_lang }}|>{{ messages[0]['content'] }}<|sep|>"
SENTENCES = [("the house is red", "das Haus ist rot"), ("open file", "Datei neu"), ("the red window", "Fenster rot")]
GROUPS = {"en": 0, "de": 1, "fr": 2, "special": 3}
# (primary, secondary) expert of each token group, per MoE layer
PLANTED = [{0: (0, 1), 1: (2, 3), 2: (4, 5), 3: (6, 7)},
           {0: (1, 0), 1: (3, 2), 2: (5, 4), 3: (7, 6)}]
LOGIT_SCALE = [(1.0, 0.8), (1.0, 0.5)]  # router row scale of primary / secondary expert per layer
GROUP_NORM = 4.0


def _write_data(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": s, "tgt": t, "package": "test",
                                        "version": "1", "license": "CC0", "split": "dev"}) + "\n" for s, t in pairs))
    return path


def _group_of(token: str) -> int:
    from tiny_models import SPECIAL_TOKENS, WORDS

    if token in SPECIAL_TOKENS:
        return GROUPS["special"]
    index = WORDS.index(token)
    return GROUPS["en"] if index < WORDS.index("das") else GROUPS["de"] if index < WORDS.index("le") else GROUPS["fr"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Attention and expert outputs are zero, so every layer's hidden state is the token
    embedding: 4 x (group direction) + 1 x (an identity direction). Routers send each token
    group to a known pair of experts; the LM head maps <|sep|> -> 'maison' -> <|eos|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny("qwen3_moe", tmp_path_factory.mktemp("planted") / "model", seed=1)
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = tokenizer.get_vocab()
    sep, maison, eos = vocab["<|sep|>"], vocab["maison"], vocab["<|eos|>"]
    with torch.no_grad():
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        for token, idx in vocab.items():
            emb[idx, _group_of(token)] = GROUP_NORM
            emb[idx, 4 if idx == sep else 5 if idx == maison else 6] = 1.0
        for idx in range(len(vocab), emb.shape[0]):
            emb[idx, GROUPS["special"]] = GROUP_NORM
            emb[idx, 6] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        for pos, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
            router = torch.zeros_like(layer.mlp.gate.weight)
            for group, (first, second) in PLANTED[pos].items():
                router[first, group] = LOGIT_SCALE[pos][0]
                router[second, group] = LOGIT_SCALE[pos][1]
            layer.mlp.gate.weight.copy_(router)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros_like(model.lm_head.weight)
        head[maison, 4] = 10.0
        head[eos, 5] = 10.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(model_dir)
    return model_dir


def _group_dist(layer_pos: int, group: int) -> np.ndarray:
    """Routing-mass distribution of one token group, from the planted weights by hand."""
    normalised = GROUP_NORM / math.sqrt((GROUP_NORM ** 2 + 1) / 32 + 1e-6)  # RMSNorm of the embedding
    a, b = LOGIT_SCALE[layer_pos]
    first = 1 / (1 + math.exp(-(a - b) * normalised))  # top-2 renormalised softmax
    dist = np.zeros(8)
    primary, secondary = PLANTED[layer_pos][group]
    dist[primary], dist[secondary] = first, 1 - first
    return dist


def _expected_mass(token_groups_per_sequence) -> np.ndarray:
    """Sum over sequences of the per-sequence mean distribution, both layers."""
    return np.stack([sum(np.mean([_group_dist(pos, g) for g in groups], axis=0) for groups in token_groups_per_sequence)
                     for pos in range(2)])


def test_teacher_forced_recovers_the_planted_routing_per_span(planted, tmp_path):
    data = _write_data(tmp_path / "d.jsonl", SENTENCES)
    settings = CalibrationSettings(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=2, max_sentences=None)
    stats = calibrate(planted, [data], settings)
    en, de, sp = GROUPS["en"], GROUPS["de"], GROUPS["special"]
    assert stats.spans("en-de") == ["prompt", "source", "target", "sequence"]
    assert "generated" not in stats.spans()
    n_en = [len(s.split()) for s, _ in SENTENCES]
    n_de = [len(t.split()) for _, t in SENTENCES]
    # prompt: <|bos|> <|en|> <|de|> ... <|sep|> = 4 tokens; target: words + <|eos|>
    assert stats.get("tokens", "en-de", "prompt")[0, 0] == 12
    assert stats.get("tokens", "en-de", "source")[0, 0] == sum(n_en)
    assert stats.get("tokens", "en-de", "target")[0, 0] == sum(n_de) + 3
    assert stats.get("tokens", "en-de", "sequence")[0, 0] == 12 + sum(n_en) + sum(n_de) + 3
    assert stats.get("sequences", "en-de", "target")[1, 5] == 3
    expected = {
        "prompt": _expected_mass([[sp] * 4] * 3),
        "source": _expected_mass([[en] * n for n in n_en]),
        "target": _expected_mass([[de] * n + [sp] for n in n_de]),
        "sequence": _expected_mass([[sp] * 5 + [en] * a + [de] * b for a, b in zip(n_en, n_de)]),
    }
    for span, mass in expected.items():
        np.testing.assert_allclose(stats.get("mass", "en-de", span), mass, rtol=1e-5, atol=1e-7, err_msg=span)
    np.testing.assert_allclose(stats.get("mass", "de-en", "source"), _expected_mass([[de] * n for n in n_de]), rtol=1e-5, atol=1e-7)
    # selection counts: each token selects its group's two experts
    selected = stats.get("selected", "en-de", "source")
    assert selected[0].tolist() == [sum(n_en)] * 2 + [0] * 6
    assert selected[1].tolist() == [sum(n_en)] * 2 + [0] * 6
    # the ranking recovers the planted order, layer by layer
    assert expert_order(stats.get("mass", "en-de", "source")[0])[:2] == [0, 1]
    assert expert_order(stats.get("mass", "en-de", "source")[1])[:2] == [1, 0]
    # target = German words + <|eos|>: primary experts first (the end token's primary beats the
    # German secondary when the weights are 0.94/0.06, not when they are 0.75/0.25)
    assert expert_order(stats.get("mass", "en-de", "target")[0])[:4] == [2, 6, 3, 7]
    assert expert_order(stats.get("mass", "en-de", "target")[1])[:4] == [3, 7, 2, 6]
    keep, _ = plan_keep(stats, PlanSettings(langs=("de",), drop_ratio=0.5, spans=("target",)))
    assert keep == {0: [2, 3, 6, 7], 1: [2, 3, 6, 7]}
    assert stats.meta["mode"] == "teacher-forced" and stats.meta["max_new_tokens"] is None
    run = stats.meta["provenance"][0]
    assert run["sentences"] == {"en-de": 3, "de-en": 3} and run["inputs"][0]["sha256"]


def test_generated_span_is_counted_apart_and_bounded(planted, tmp_path):
    data = _write_data(tmp_path / "d.jsonl", SENTENCES)
    settings = CalibrationSettings(pairs=("en-de",), max_new_tokens=6, batch_size=3, max_sentences=None)
    stats = calibrate(planted, [data], settings)
    fr, sp, en = GROUPS["fr"], GROUPS["special"], GROUPS["en"]
    assert stats.spans() == ["prompt", "source", "generated", "sequence"]
    # greedy output is exactly 'maison <|eos|>' for every sentence (left-padded batch of 3)
    assert stats.get("tokens", "en-de", "generated")[0, 0] == 6
    np.testing.assert_allclose(stats.get("mass", "en-de", "generated"), _expected_mass([[fr, sp]] * 3), rtol=1e-5, atol=1e-7)
    n_en = [len(s.split()) for s, _ in SENTENCES]
    np.testing.assert_allclose(stats.get("mass", "en-de", "sequence"),
                               _expected_mass([[sp] * 5 + [en] * n + [fr] for n in n_en]), rtol=1e-5, atol=1e-7)
    assert stats.meta["mode"] == "generate" and stats.meta["max_new_tokens"] == 6
    bounded = calibrate(planted, [data], CalibrationSettings(pairs=("en-de",), max_new_tokens=1, max_sentences=None))
    assert bounded.get("tokens", "en-de", "generated")[0, 0] == 3  # 'maison' only
    np.testing.assert_allclose(bounded.get("mass", "en-de", "generated"), _expected_mass([[fr]] * 3), rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="different models|setting 'mode' differs"):
        merge_stats([stats, calibrate(planted, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True))])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    model_dir = build_tiny("qwen3_moe", tmp_path_factory.mktemp("random") / "model", seed=3)
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    return model_dir


def test_mass_and_reap_match_a_reference_from_the_weights(random_model, tmp_path):
    from transformers import AutoTokenizer

    from packager.core.arch import load_arch

    data = _write_data(tmp_path / "d.jsonl", SENTENCES)
    stats = calibrate(random_model, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True, batch_size=2,
                                                                max_sentences=None))
    loaded = load_model(random_model)
    model, config = loaded.model, loaded.config
    arch = load_arch(config)
    tokenizer = AutoTokenizer.from_pretrained(random_model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, pos=pos: inputs.__setitem__(pos, a[0][0]))
             for pos, layer in enumerate(model.model.layers)]
    mass = np.zeros((2, 8))
    reap = np.zeros((2, 8))
    with torch.no_grad():
        for source, target in SENTENCES:
            ids = tokenizer(f"<|bos|><|en|><|de|>{source}<|sep|>", add_special_tokens=False)["input_ids"]
            ids += tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
            for pos, layer in enumerate(model.model.layers):
                x = inputs[pos]
                idx, weights = arch.route(torch.nn.functional.linear(x, layer.mlp.gate.weight), config)
                experts = layer.mlp.experts
                for t in range(x.shape[0]):
                    for j in range(idx.shape[1]):
                        e = int(idx[t, j])
                        gate, up = torch.nn.functional.linear(x[t], experts.gate_up_proj[e]).chunk(2)
                        out = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[e])
                        reap[pos, e] += float(weights[t, j]) * float(out.norm())
                        mass[pos, e] += float(weights[t, j] / weights[t].sum()) / x.shape[0]
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(stats.get("mass", "en-de", "sequence"), mass, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.get("reap", "en-de", "sequence"), reap, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(stats.get("reap_tokens", "en-de", "sequence"), stats.get("selected", "en-de", "sequence"))
    for span in ("prompt", "source", "target"):  # spans partition the sequence
        assert stats.get("tokens", "en-de", span)[0, 0] > 0
    np.testing.assert_allclose(sum(stats.get("reap", "en-de", s) for s in ("prompt", "source", "target")), reap, rtol=1e-4)


def test_recording_does_not_change_the_model_output(random_model):
    from packager.calibrate import RoutingRecorder

    loaded = load_model(random_model)
    ids = torch.tensor([[1, 5, 6, 8, 9, 10, 3, 28, 29, 2], [1, 5, 6, 11, 12, 3, 30, 2, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [8]])).long()
    with torch.no_grad():
        plain = loaded.model(input_ids=ids, attention_mask=mask).logits
        recorder = RoutingRecorder(loaded.model, loaded.arch, loaded.config, n_pairs=1, reap=True)
        slots = torch.where(mask.bool(), torch.zeros_like(ids), torch.full_like(ids, -1))
        recorder.set_batch(slots, torch.tensor([0, 0]))
        recorded = loaded.model(input_ids=ids, attention_mask=mask).logits
        recorder.remove()
        after = loaded.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert recorder.tokens[0] == 18 and recorder.sequences[0] == 2


def test_merging_shards_equals_one_run(random_model, tmp_path):
    more = SENTENCES + [("save the file", "Datei auf"), ("new window", "Fenster neu"), ("the dog is blue", "Hund ist blau")]
    first = _write_data(tmp_path / "a.jsonl", more[:4])
    second = _write_data(tmp_path / "b.jsonl", more[4:])
    both = _write_data(tmp_path / "all.jsonl", more)
    settings = CalibrationSettings(pairs=("en-de", "de-en"), teacher_forced=True, batch_size=1, max_sentences=None)
    loaded = load_model(random_model)
    parts = [calibrate(random_model, [p], settings, loaded=loaded) for p in (first, second)]
    merged = merge_stats(parts)
    whole = calibrate(random_model, [both], settings, loaded=loaded)
    assert sorted(merged.tensors) == sorted(whole.tensors)
    for name in whole.tensors:
        np.testing.assert_allclose(merged.tensors[name], whole.tensors[name], rtol=1e-12, atol=1e-12, err_msg=name)
    assert len(merged.meta["provenance"]) == 2


# ---- bad input ------------------------------------------------------------------------------
def test_bad_data_gives_one_clear_error_each(random_model, tmp_path):
    tf = CalibrationSettings(pairs=("en-de",), teacher_forced=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match=r"empty.jsonl: no sentences in the file \(empty data\)"):
        calibrate(random_model, [empty], tf)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "the cat"}) + "\n")
    with pytest.raises(CalibrationError, match=r"lacking.jsonl:1: record lacks tgt \(misaligned data\)"):
        calibrate(random_model, [lacking], tf)
    tsv = tmp_path / "data.tsv"
    tsv.write_text("en\tde\nthe cat\tdie Katze\nopen\tDatei\textra\n")
    with pytest.raises(CalibrationError, match=r"data.tsv:3: expected 2 tab-separated columns \(en, de\), found 3"):
        calibrate(random_model, [tsv], tf)
    bad_lang = tmp_path / "lang.jsonl"
    bad_lang.write_text(json.dumps({"src_lang": "en", "tgt_lang": "qq", "src": "a", "tgt": "b"}) + "\n")
    with pytest.raises(CalibrationError, match=r"lang.jsonl:1: tgt_lang: unknown language 'qq'"):
        calibrate(random_model, [bad_lang], tf)
    good = _write_data(tmp_path / "good.jsonl", SENTENCES)
    with pytest.raises(CalibrationError, match=r"no en-ja sentences \(directions in the data: de-en, en-de\)"):
        calibrate(random_model, [good], CalibrationSettings(pairs=("en-ja",), teacher_forced=True))
    text = tmp_path / "plain.txt"
    text.write_text("the cat\n")
    with pytest.raises(CalibrationError, match="--teacher-forced needs TSV or JSONL"):
        calibrate(random_model, [text], CalibrationSettings(pairs=("en-de",), teacher_forced=True, text_lang="en"))
    with pytest.raises(CalibrationError, match=r"--prompt-template .*needs \{source\} exactly once"):
        calibrate(random_model, [good], CalibrationSettings(pairs=("en-de",), prompt_template="Translate {text}"))


def test_pair_list_parsing():
    assert parse_pair_list("en-de,de-en") == ["en-de", "de-en"]
    assert parse_pair_list("en<->de,fr") == ["en-de", "de-en", "en-fr", "fr-en"]
    assert parse_pair_list("deu-eng, en-zh-Hant,en-de") == ["de-en", "en-zh-Hant", "en-de"]
    with pytest.raises(CalibrationError, match="--pairs: .*'en-xx'"):
        parse_pair_list("en-de,en-xx")


def test_plain_text_generation(planted, tmp_path):
    text = tmp_path / "src.txt"
    text.write_text("the house\n\nopen file\n")
    stats = calibrate(planted, [text], CalibrationSettings(pairs=("en-de",), text_lang="en", max_new_tokens=4))
    assert stats.get("sequences", "en-de", "generated")[0, 0] == 2
    assert stats.get("tokens", "en-de", "source")[0, 0] == 4


# ---- the command line -------------------------------------------------------------------------------
def _packager(*args, cwd=None):
    exe = Path(sys.executable).with_name("packager")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_cli_calibrate_merge_plan_chain(random_model, tmp_path):
    a = _write_data(tmp_path / "a.jsonl", SENTENCES[:2])
    b = _write_data(tmp_path / "b.jsonl", SENTENCES[2:])
    script = RUNNER_SCRIPT + f"""
run("calibrate", "{random_model}", "--data", "{a}", "--pairs", "en-de,de-en", "--teacher-forced", "--out", "{tmp_path}/a.st")
run("calibrate", "{random_model}", "--data", "{b}", "--pairs", "en-de,de-en", "--teacher-forced", "--out", "{tmp_path}/b.st")
run("stats", "merge", "{tmp_path}/a.st", "{tmp_path}/b.st", "--out", "{tmp_path}/ab.st")
run("stats", "show", "{tmp_path}/ab.st")
run("plan", "create", "{tmp_path}/ab.st", "--langs", "de", "--direction", "both", "--drop", "0.5", "--model", "{random_model}", "--out", "{tmp_path}/dyn.json")
run("plan", "create", "{tmp_path}/ab.st", "--langs", "de", "--drop", "0.5", "--uniform", "--out", "{tmp_path}/uni.json")
run("plan", "create", "{tmp_path}/ab.st", "--langs", "de", "--drop", "0.5", "--ranker", "random", "--uniform", "--out", "{tmp_path}/rnd.json")
run("plan", "show", "{tmp_path}/uni.json")
run("plan", "compare", "{tmp_path}/dyn.json", "{tmp_path}/uni.json", "{tmp_path}/rnd.json")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "statistics written to" in out and "teacher-forced, whole; en-de 2 sentences" in out
    assert "merged 2 files" in out and "de-en: 3 sequences" in out
    assert "layer   0     4/8    ████····" in out and "one count for every layer (GGUF-loadable)" in out
    assert "all 3 together: IoU" in out
    plan = json.loads((tmp_path / "dyn.json").read_text())
    assert plan["meta"]["allocation"] == "dynamic" and plan["meta"]["kept_experts"] == 8
    assert set(plan["meta"]["jsd"]) == {"0", "1"}
    assert plan["meta"]["provenance"]["stats"]["sha256"]
    from packager.core.plan_file import Plan

    assert Plan.load(tmp_path / "uni.json").keep.keys() == {0, 1}

    # one error line each: stats from another model, a bad drop ratio, an unknown language
    other = build_tiny("qwen3_moe", tmp_path / "other", seed=9)
    errors = [
        _packager("plan", "create", tmp_path / "ab.st", "--langs", "de", "--drop", "0.5", "--model", other, "--out", tmp_path / "x.json"),
        _packager("plan", "create", tmp_path / "ab.st", "--langs", "de", "--drop", "1.0", "--out", tmp_path / "y.json"),
        _packager("plan", "create", tmp_path / "ab.st", "--langs", "de", "--drop", "0.9", "--out", tmp_path / "y.json"),
        _packager("calibrate", random_model, "--data", a, "--pairs", "en-xx", "--out", tmp_path / "z.st"),
        _packager("stats", "merge", tmp_path / "a.st", tmp_path / "missing.st", "--out", tmp_path / "m.st"),
    ]
    messages = ["statistics come from another model", r"--drop 1.0 is outside (0, 1)", "fewer than top-k = 2",
                "--pairs: ", "missing.st: no such statistics file"]
    for result, message in zip(errors, messages):
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not any((tmp_path / name).exists() for name in ("x.json", "y.json", "z.st", "m.st"))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_every_family_records_routing_and_reap_without_changing_the_output(family, tmp_path):
    from packager.calibrate import RoutingRecorder

    model_dir = build_tiny(family, tmp_path / family, seed=4)
    (model_dir / "chat_template.jinja").write_text(TEMPLATE)
    data = _write_data(tmp_path / "d.jsonl", SENTENCES[:2])
    stats = calibrate(model_dir, [data], CalibrationSettings(pairs=("en-de",), teacher_forced=True))
    top_k = stats.top_k
    selected = stats.get("selected", "en-de", "sequence")
    tokens = stats.get("tokens", "en-de", "sequence")[:, 0]
    np.testing.assert_array_equal(selected.sum(axis=1), tokens * top_k)
    np.testing.assert_array_equal(stats.get("reap_tokens", "en-de", "sequence"), selected)
    reap = stats.get("reap", "en-de", "sequence")
    assert np.all((reap > 0) == (selected > 0))
    np.testing.assert_allclose(stats.get("mass", "en-de", "sequence").sum(axis=1), 2.0, rtol=1e-6)  # 2 sequences
    if family == "deepseek_v3":
        assert stats.meta["routing_groups"] == {"n_group": 2, "topk_group": 1, "group_score_top": 2}
    loaded = load_model(model_dir)
    ids = torch.tensor([[1, 5, 6, 8, 9, 10, 3, 28, 29, 2]])
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
        recorder = RoutingRecorder(loaded.model, loaded.arch, loaded.config, n_pairs=1, reap=True)
        recorder.set_batch(torch.zeros_like(ids), torch.tensor([0]))
        recorded = loaded.model(input_ids=ids).logits
        recorder.remove()
    assert recorder.reap_sum.sum() > 0
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["--teacher-forced", "--generate"])
def test_a_full_disk_is_one_error_line_and_nothing_half_written(random_model, tmp_path, monkeypatch, capsys, mode):
    from full_disk import FullDisk
    from packager_cli import run_cli

    data = _write_data(tmp_path / "data.jsonl", SENTENCES)
    out = tmp_path / "out"
    out.mkdir()
    FullDisk(out, 512).install(monkeypatch)
    args = ["calibrate", str(random_model), "--data", str(data), "--pairs", "en-de", "--out", str(out / "stats.st"),
            "--max-new-tokens", "4"] + ([mode] if mode == "--teacher-forced" else [])
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    # generating, the parent's translations are cached beside --out first: that write fails first
    written = re.escape(str(out / "stats.st")) if mode == "--teacher-forced" else \
        re.escape(str(out / "calibration-cache")) + r"/calibration-outputs-[0-9a-f]{16}\.jsonl"
    assert re.fullmatch(rf"error: {written}: no space left on device \(needs [\d,]+ bytes, [\d,]+ free\); "
                        r"free space or write elsewhere; nothing was written\n", err)
    assert [p for p in out.rglob("*") if p.is_file()] == []
