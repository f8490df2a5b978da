"""runtime/ base: language parser, prompt renderer, schema, backend helpers, torch-free import."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from import_blocker import run_blocked

from runtime.backends import export_config_path, resolve_model
from runtime.backends.base import Sampling, choose_token
from runtime.errors import BackendError, LanguageError, PromptError, SchemaError
from runtime.languages import Language, Pair, parse_language, parse_pair, parse_pairs
from runtime.prompt import PromptRenderer
from runtime.schema import SCHEMA_VERSION, BundleManifest, ExportConfig, load_model_config

TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ message['content'] }}<|sep|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] }}<|eos|>"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# -- languages -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tag, code",
    [
        ("en", "en"), ("EN", "en"), ("en-US", "en"), ("en_GB", "en"), ("eng", "en"), ("deu", "de"),
        ("ger", "de"), ("zh", "zh"), ("zh-Hans", "zh"), ("zh-CN", "zh"), ("zh_cn", "zh"), ("zho", "zh"),
        ("zh-Hans-CN", "zh"), ("zh-TW", "zh-Hant"), ("zh-hant", "zh-Hant"), ("zh-Hant-HK", "zh-Hant"),
        ("sr-Latn", "sr-Latn"), ("ja-Jpan", "ja"), ("arz", "arz"), ("es-419", "es"), ("iw", "he"),
        ("pt-BR", "pt"),
    ],
)
def test_language_canonical_codes(tag, code):
    assert parse_language(tag).code == code


def test_language_equality_ignores_region_but_keeps_it():
    assert parse_language("zh-Hans") == parse_language("zh-CN") == parse_language("zh")
    assert parse_language("zh-TW") != parse_language("zh")
    assert hash(parse_language("en-US")) == hash(parse_language("en"))
    assert parse_language("pt-BR").region == "BR"
    assert parse_language("zh-TW").name == "Chinese (Traditional)"
    assert str(parse_language("ZH_tw")) == "zh-Hant"
    assert parse_language(Language("de")) == Language("de")


@pytest.mark.parametrize("tag", ["", "x", "xx", "english", "en-", "en--US", "de-DE-1996", "e1", "en/US", "zh-Hant-TW-x"])
def test_language_errors_say_what_is_accepted(tag):
    with pytest.raises(LanguageError) as info:
        parse_language(tag)
    message = str(info.value)
    assert repr(tag.strip()) in message or "empty" in message
    assert "ISO 639-1" in message and "script" in message and "region" in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("en-de", ["en->de"]),
        ("en->de", ["en->de"]),
        ("en<->de", ["en->de", "de->en"]),
        ("en->de,fr,es", ["en->de", "en->fr", "en->es"]),
        ("de, fr -> en", ["de->en", "fr->en"]),
        ("en<->de,ja", ["en->de", "de->en", "en->ja", "ja->en"]),
        ("zh-Hant-en", ["zh-Hant->en"]),
        ("en-zh-Hant", ["en->zh-Hant"]),
        ("eng->deu,de-DE", ["en->de"]),
    ],
)
def test_parse_pairs(spec, expected):
    assert [str(p) for p in parse_pairs(spec)] == expected


def test_pair_slug_round_trip_and_reverse():
    pair = parse_pair("zh-TW->en")
    assert pair == Pair(Language("zh", "Hant"), Language("en"))
    assert pair.slug == "zh-Hant-en"
    assert parse_pair(pair.slug) == pair
    assert pair.reversed() == parse_pair("en->zh-Hant")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("en", "cannot read direction"),
        ("en->en-US", "same language"),
        ("en->", "empty language"),
        ("en->de->fr", "cannot read direction"),
        ("en<->de", None),
        ("en->de,fr", "names 2 directions"),
        ("pt-BR-en", "ambiguous direction"),
        ("en-zh-TW", "ambiguous direction 'en-zh-TW': write 'en->zh-Hant' or 'en->tw'"),
        ("en->xx", "unknown language 'xx'"),
    ],
)
def test_parse_pair_errors(spec, fragment):
    if fragment is None:  # a valid spec that names two directions
        with pytest.raises(LanguageError, match="names 2 directions"):
            parse_pair(spec)
        return
    with pytest.raises(LanguageError, match=fragment):
        parse_pair(spec)


# -- prompt ----------------------------------------------------------------------------------
def test_prompt_renders_model_template_with_canonical_codes(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    renderer = PromptRenderer.from_model_dir(tmp_path)
    assert renderer.render("Open file", "en", "zh-CN") == "<|bos|><|en|><|zh|>Open file<|sep|>"
    assert renderer.render("Datei öffnen", "de-DE", "eng") == "<|bos|><|de|><|en|>Datei öffnen<|sep|>"


def test_prompt_from_tokenizer_config_with_special_tokens(tmp_path):
    template = "{{ bos_token }}{{ source_lang }}>{{ target_lang }}:{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    renderer = PromptRenderer.from_model_dir(tmp_path)
    assert renderer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert renderer.render("hi", "en", "ja") == "<s>en>ja:hi"


def test_prompt_errors(tmp_path):
    with pytest.raises(PromptError, match="no chat template"):
        PromptRenderer.from_model_dir(tmp_path)
    with pytest.raises(PromptError, match="syntax error at line 1"):
        PromptRenderer("{% if %}", source="bad.jinja")
    with pytest.raises(PromptError, match="does not place the user message"):
        PromptRenderer("<|bos|>{{ source_lang }}").render("text", "en", "de")
    with pytest.raises(PromptError, match="failed to render: no system role"):
        PromptRenderer("{{ raise_exception('no system role') }}").render("x", "en", "de")
    with pytest.raises(LanguageError):
        PromptRenderer(TEMPLATE).render("x", "en", "klingon")
    # the sandbox refuses attribute access to Python internals
    with pytest.raises(PromptError, match="failed to render"):
        PromptRenderer("{{ messages.__class__.__mro__[1].__subclasses__() }}{{ messages[0].content }}").render("x", "en", "de")


# -- schema ----------------------------------------------------------------------------------
def export_config(**overrides) -> ExportConfig:
    fields = dict(
        format="gguf",
        model_files=["model.gguf"],
        family="qwen3_moe",
        prompt_template=TEMPLATE,
        stop_tokens=["<|eos|>"],
        special_tokens={"bos": "<|bos|>", "eos": "<|eos|>"},
        top_k=2,
        n_experts={0: 8, 1: 8, 3: 8},
        parent_n_experts=16,
        quantization={"type": "Q4_K_M", "fallbacks": {"blk.0.ffn_down_exps.weight": "q5_0"}},
        parent_fingerprint="ab" * 32,
        plan={"ranker": "routing_mass", "allocation": "uniform", "drop_ratio": 0.5},
        languages=["en", "de", "zh-Hant"],
        provenance={"command": "packager export gguf", "versions": {"packager": "0.1.0"}},
    )
    fields.update(overrides)
    return ExportConfig(**fields)


def test_export_config_round_trip(tmp_path):
    config = export_config()
    path = config.save(tmp_path / "model.export.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "export_config"
    assert data["n_experts"] == {"0": 8, "1": 8, "3": 8}
    loaded = ExportConfig.load(path)
    assert loaded == config
    assert loaded.n_experts == {0: 8, 1: 8, 3: 8} and loaded.uniform_n_experts == 8
    assert load_model_config(path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["model.export.json"]  # no temp file left


def test_bundle_manifest_round_trip_and_back_to_export(tmp_path):
    config = export_config()
    manifest = BundleManifest.from_export(
        config,
        metrics={"chrf": 51.2},
        licenses=[{"package": "libreoffice-l10n", "license": "MPL-2.0"}],
        files={"model.gguf": {"sha256": "0" * 64, "bytes": 1234}},
        min_ram_bytes=10_000_000,
    )
    path = manifest.save(tmp_path / "manifest.json")
    loaded = load_model_config(path)
    assert isinstance(loaded, BundleManifest) and loaded == manifest
    assert loaded.export_config() == config
    with pytest.raises(SchemaError, match="expected 'bundle_manifest'"):
        BundleManifest.load(config.save(tmp_path / "x.export.json"))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported.*upgrade"),
        (lambda d: d.pop("schema_version"), "missing 'schema_version'"),
        (lambda d: d.update(format="ggml"), "'format' must be one of gguf, onnx, got 'ggml'"),
        (lambda d: d.update(model_files=[]), "'model_files' is empty"),
        (lambda d: d.update(model_files=["../model.gguf"]), "relative path inside the bundle"),
        (lambda d: d.update(model_files=["/abs/model.gguf"]), "relative path inside the bundle"),
        (lambda d: d.update(stop_tokens=[]), "'stop_tokens' must be a non-empty list"),
        (lambda d: d.update(top_k=True), "'top_k' must be a positive integer"),
        (lambda d: d.update(n_experts={"0": 1}), "layer 0 has 1 experts, fewer than top_k=2"),
        (lambda d: d.update(n_experts={"first": 8}), "keys must be layer indices"),
        (lambda d: d.update(quantization={}), "needs a 'type' string"),
        (lambda d: d.update(parent_fingerprint="abc"), "64 lower-case hex digits"),
        (lambda d: d.update(languages=["zh-CN"]), "'zh-CN' is not a canonical language code"),
        (lambda d: d.update(colour="blue"), "unknown field\\(s\\) 'colour'"),
        (lambda d: d.pop("family"), "missing field\\(s\\) 'family'"),
        (lambda d: d.update(kind="bundle_manifest"), "expected 'export_config'"),
    ],
)
def test_export_config_errors_name_file_and_field(tmp_path, mutate, fragment):
    data = export_config().to_dict()
    mutate(data)
    path = tmp_path / "bad.export.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match=fragment) as info:
        ExportConfig.load(path)
    assert str(info.value).startswith(str(path) + ": ")


def test_schema_unreadable_files(tmp_path):
    with pytest.raises(SchemaError, match="file not found"):
        ExportConfig.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"schema_version": 1,')
    with pytest.raises(SchemaError, match="not valid JSON"):
        load_model_config(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SchemaError, match="expected a JSON object"):
        ExportConfig.load(tmp_path / "list.json")


def test_manifest_requires_hashes_of_model_files():
    with pytest.raises(SchemaError, match="'model.gguf' is not listed in 'files'"):
        BundleManifest.from_export(export_config(), files={"other.bin": {"sha256": "1" * 64, "bytes": 3}})
    with pytest.raises(SchemaError, match="needs 'bytes'"):
        BundleManifest.from_export(export_config(), files={"model.gguf": {"sha256": "1" * 64, "bytes": -1}})


# -- backend helpers -------------------------------------------------------------------------
def test_choose_token_greedy_and_sampling():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert choose_token(logits, Sampling(), rng) == 1
    assert choose_token(np.array([1.0, 1.0]), Sampling(), rng) == 0  # ties: lowest id
    # top_k=1 is greedy whatever the temperature
    assert {choose_token(logits, Sampling(temperature=5.0, top_k=1), rng) for _ in range(20)} == {1}
    # top_p keeps the smallest set reaching p: here tokens 1 and 2
    seen = {choose_token(logits, Sampling(temperature=1.0, top_p=0.9), rng) for _ in range(200)}
    assert seen == {1, 2}
    draws = [choose_token(logits, Sampling(temperature=1.0, seed=3), np.random.default_rng(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    with pytest.raises(BackendError, match="bad sampling settings"):
        Sampling(top_p=0.0)


def test_resolve_model_paths(tmp_path):
    config = export_config()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config.save(export_config_path(tmp_path / "model.gguf"))
    assert export_config_path(tmp_path / "model.gguf").name == "model.export.json"
    for path in (tmp_path, tmp_path / "model.gguf", tmp_path / "model.export.json"):
        model_file, loaded = resolve_model(path)
        assert model_file == tmp_path / "model.gguf" and loaded == config
    with pytest.raises(BackendError, match="not found"):
        resolve_model(tmp_path / "nope.gguf")
    (tmp_path / "model.gguf").unlink()
    with pytest.raises(BackendError, match="model file 'model.gguf' is missing"):
        resolve_model(tmp_path)


# -- runtime without torch -------------------------------------------------------------------
# what the device runtime must not need
BUILD_SIDE = ("torch", "transformers", "safetensors", "gguf", "onnx", "onnxscript", "sacrebleu", "packager")


def run_without_torch(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    return run_blocked(tmp_path, BUILD_SIDE, code, *args)


def test_runtime_imports_and_runs_without_torch(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import runtime.backends, runtime.backends.llama_cpp_backend, runtime.cli, runtime.schema
        from runtime.languages import parse_pairs
        from runtime.prompt import PromptRenderer
        print([str(p) for p in parse_pairs("en<->zh-TW")])
        print(PromptRenderer(sys.argv[1]).render("Hallo", "de", "en"))
        banned = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "gguf", "packager"})
        print(banned)
        """
    )
    result = run_without_torch(tmp_path, code, TEMPLATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['en->zh-Hant', 'zh-Hant->en']", "<|bos|><|de|><|en|>Hallo<|sep|>", "[]"]


def test_edge_translate_cli_without_torch_reports_one_error_line(tmp_path):
    code = "from runtime.cli import main; main()"
    result = run_without_torch(tmp_path, code, "--help")
    assert result.returncode == 0 and "--from" in result.stdout
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    result = run_without_torch(tmp_path, code, str(tmp_path / "fake.gguf"), "hello", "--from", "en", "--to", "de")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'fake.gguf'}: not a GGUF file (magic b'NOPE'); export it with `packager export gguf`"]
    result = run_without_torch(tmp_path, code, str(tmp_path / "fake.gguf"), "hello", "--from", "en", "--to", "xx")
    assert result.returncode == 1 and result.stderr.startswith("error: unknown language 'xx'")


def test_atomic_writes_get_the_umask_mode_not_a_private_one(tmp_path):
    # mkstemp makes 0600 files; a shipped manifest must be readable like any other file
    import os

    from runtime.atomic import atomic_write_json, make_public

    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "m.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        make_public(private)
        assert private.stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        assert atomic_write_json(tmp_path / "n.json", {}).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
