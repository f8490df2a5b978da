"""The default model's chat template in stock clients (issue 19, part 2).

A stock chat client (llama-server's /v1/chat/completions, llama-cpp-python's create_chat_completion,
Ollama, LM Studio) renders the GGUF chat template with messages only. The template then takes the
direction from a first system message "en->de", else from its `set default_direction` statement
(which a GGUF export of a pruned model sets to its plan's first pair). The project's own renderer
passes source_lang / target_lang and must keep producing the prompts it always produced.

Checked with jinja2 (sandboxed, as transformers and runtime.prompt render), with llama-cpp-python's
chat formatter (Jinja2ChatFormatter, what Llama.create_chat_completion uses for a GGUF template),
and with llama.cpp's own Jinja engine (common/jinja, used by llama-server and llama-cli; not
exposed by llama-cpp-python 0.3.36, so compiled from the pinned source by tests/llama_jinja.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.prompt import PromptRenderer, default_direction, with_default_direction

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = ROOT / "models" / "default" / "chat_template.jinja"
TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")
# the template before issue 19: the language variables were required
OLD_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "<|bos|><|{{ source_lang }}|><|{{ target_lang }}|>{{ message['content'] }}<|sep|>"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}<|eos|>{%- endif -%}{%- endfor -%}"
)
USER = {"role": "user", "content": "Open the file, please."}

# (variables besides add_generation_prompt, expected prompt)
CASES = [
    ({"messages": [USER]}, "<|bos|><|en|><|de|>Open the file, please.<|sep|>"),
    ({"messages": [{"role": "system", "content": "fr->en"}, USER]}, "<|bos|><|fr|><|en|>Open the file, please.<|sep|>"),
    ({"messages": [{"role": "system", "content": " ja -> zh "}, USER]}, "<|bos|><|ja|><|zh|>Open the file, please.<|sep|>"),
    # a system prompt that is not a direction (a client's default persona) is ignored
    ({"messages": [{"role": "system", "content": "You are a helpful assistant."}, USER]},
     "<|bos|><|en|><|de|>Open the file, please.<|sep|>"),
    ({"messages": [USER], "source_lang": "es", "target_lang": "en"}, "<|bos|><|es|><|en|>Open the file, please.<|sep|>"),
    # explicit variables win over the system message
    ({"messages": [{"role": "system", "content": "fr->en"}, USER], "source_lang": "ru", "target_lang": "en"},
     "<|bos|><|ru|><|en|>Open the file, please.<|sep|>"),
    # a finished exchange (few-shot): the assistant turn ends with <|eos|>
    ({"messages": [{"role": "system", "content": "en->fr"}, {"role": "user", "content": "Yes"},
                   {"role": "assistant", "content": "Oui"}, USER]},
     "<|bos|><|en|><|fr|>Yes<|sep|>Oui<|eos|><|bos|><|en|><|fr|>Open the file, please.<|sep|>"),
]


def _jinja2(template: str, variables: dict) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>",
                                            **variables)


def test_template_file_is_the_training_constant():
    sys.path.insert(0, str(ROOT / "models"))
    try:
        spec = importlib.util.spec_from_file_location("train_default_for_test", ROOT / "models" / "train_default.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "models"))
    assert module.CHAT_TEMPLATE == TEMPLATE
    assert default_direction(TEMPLATE) == "en->de"


@pytest.mark.parametrize("variables,expected", CASES)
def test_template_renders_with_jinja2_sandbox(variables, expected):
    assert _jinja2(TEMPLATE, variables) == expected


@pytest.mark.parametrize("src,tgt", [("en", "de"), ("de", "en"), ("en", "zh-CN"), ("ja", "fr"), ("ru", "es")])
def test_runtime_prompts_unchanged(src, tgt):
    """The project's renderer gives exactly the prompts of the previous template."""
    text = "Datei öffnen — «ok»?"
    assert PromptRenderer(TEMPLATE).render(text, src, tgt) == PromptRenderer(OLD_TEMPLATE).render(text, src, tgt)


def test_default_direction_rewrite_and_export_plan():
    from converters.gguf.export import chat_template_for_plan

    fr_en = with_default_direction(TEMPLATE, "fr", "en-US")
    assert default_direction(fr_en) == "fr->en"
    assert _jinja2(fr_en, {"messages": [USER]}) == "<|bos|><|fr|><|en|>Open the file, please.<|sep|>"
    assert _jinja2(fr_en, {"messages": [{"role": "system", "content": "en->ja"}, USER]}).startswith("<|bos|><|en|><|ja|>")
    assert with_default_direction(OLD_TEMPLATE, "fr", "en") == OLD_TEMPLATE  # nothing to rewrite
    assert default_direction(chat_template_for_plan(TEMPLATE, {"meta": {"pairs": ["de-en", "en-de"]}})) == "de->en"
    assert chat_template_for_plan(TEMPLATE, None) == TEMPLATE
    assert chat_template_for_plan(TEMPLATE, {"meta": {"pairs": []}}) == TEMPLATE


@pytest.mark.parametrize("variables,expected", [c for c in CASES if "source_lang" not in c[0]])
def test_template_in_llama_cpp_python_chat_formatter(variables, expected):
    formatter = pytest.importorskip("llama_cpp.llama_chat_format")
    chat = formatter.Jinja2ChatFormatter(template=TEMPLATE, eos_token="<|eos|>", bos_token="<|bos|>")
    result = chat(messages=variables["messages"])
    assert result.prompt == expected
    assert result.stop == ["<|eos|>"]


def test_llama_chat_apply_template_does_not_know_custom_templates():
    """llama-cpp-python's binding of llama_chat_apply_template matches built-in templates only
    (no Jinja): ours is not one of them, which is why the Jinja engine is tested separately."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    msgs = (llama_cpp.llama_chat_message * 1)(llama_cpp.llama_chat_message(b"user", b"Hi"))
    buf = ctypes.create_string_buffer(256)
    assert llama_cpp.llama_chat_apply_template(TEMPLATE.encode(), msgs, 1, True, buf, 256) < 0


@pytest.fixture(scope="module")
def llama_jinja():
    import llama_jinja

    if not llama_jinja.available():
        pytest.skip("the pinned llama-cpp-python source (LLAMA_CPP_PYTHON_SRC) or g++ is not available")
    return llama_jinja, llama_jinja.build(llama_jinja.llama_source())


@pytest.mark.parametrize("variables,expected", CASES)
def test_template_in_llama_cpp_own_jinja_engine(llama_jinja, variables, expected):
    module, binary = llama_jinja
    # what llama-server passes: messages, bos/eos tokens, add_generation_prompt (never languages)
    prompt, system_role = module.render(binary, TEMPLATE, {"add_generation_prompt": True, "bos_token": "<|bos|>",
                                                           "eos_token": "<|eos|>", **variables})
    assert prompt == expected
    # llama.cpp probes whether the template reads a system message; if not, it folds the system
    # text into the user message, which would break the "en->de" convention
    assert system_role


def test_old_template_fails_in_llama_cpp_own_jinja_engine(llama_jinja):
    """The issue's symptom: without languages the old template renders empty language tokens."""
    module, binary = llama_jinja
    prompt, _ = module.render(binary, OLD_TEMPLATE, {"add_generation_prompt": True, "messages": [USER]})
    assert prompt.startswith("<|bos|><||><||>")


@pytest.mark.skipif(not (ROOT / "models" / "default" / "config.json").is_file(), reason="models/default is not trained")
def test_default_gguf_in_llama_cpp_python_chat_completion(tmp_path):
    """End to end: the default model's GGUF in a stock client (llama-cpp-python's
    create_chat_completion, messages only) translates exactly as edge-translate does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from converters.gguf.export import export_gguf
    from runtime.backends import open_backend

    gguf = export_gguf(ROOT / "models" / "default", tmp_path / "default.gguf", dtype="f16")
    ours = open_backend(gguf, n_threads=1)
    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=1, verbose=False)
    for system, (src, tgt), text in [(None, ("en", "de"), "Save the document."), ("de->en", ("de", "en"), "Datei öffnen"),
                                     ("en->fr", ("en", "fr"), "Save the document.")]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=48)
        assert reply["choices"][0]["message"]["content"].strip() == ours.translate(text, src, tgt, max_new_tokens=48).strip()


@pytest.mark.skipif(not (ROOT / "models" / "default" / "config.json").is_file(), reason="models/default is not trained")
def test_pruned_gguf_defaults_to_the_plans_direction(tmp_path):
    """prune-gguf (and export of a pruned checkpoint, same helper) writes the plan's first pair as
    the template's default: a stock client with messages only translates fr->en."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from converters.gguf.export import export_gguf
    from converters.gguf.gguf_file import field_value, open_gguf
    from converters.gguf.prune_gguf import prune_gguf
    from packager.core.arch import load_arch
    from packager.core.fingerprint import model_fingerprint
    from packager.core.plan_file import Plan
    from runtime.backends import open_backend

    model = ROOT / "models" / "default"
    config = json.loads((model / "config.json").read_text())
    arch = load_arch(config)
    keep = {i: list(range(arch.n_experts(config) // 2)) for i in arch.moe_layers(config)}
    plan = Plan(model_fingerprint(model), keep, {"ranker": "test", "pairs": ["fr-en", "en-fr"]})
    parent = export_gguf(model, tmp_path / "parent.gguf", dtype="f16")
    pruned = prune_gguf(parent, plan, tmp_path / "pruned.gguf")
    template = field_value(open_gguf(pruned), "tokenizer.chat_template")
    assert default_direction(template) == "fr->en"
    assert template == with_default_direction(TEMPLATE, "fr", "en")
    llm = llama_cpp.Llama(str(pruned), n_ctx=512, n_threads=1, verbose=False)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Ouvrir le fichier."}], temperature=0.0,
                                       max_tokens=32)
    ours = open_backend(pruned, n_threads=1).translate("Ouvrir le fichier.", "fr", "en", max_new_tokens=32)
    assert reply["choices"][0]["message"]["content"].strip() == ours.strip()


def test_bundle_warns_when_stock_clients_default_elsewhere():
    from packager.bundle import stock_client_note

    assert stock_client_note(TEMPLATE, ["en->de", "de->en"]) is None
    assert stock_client_note(OLD_TEMPLATE, ["fr->en"]) is None  # no default: nothing to say
    note = stock_client_note(TEMPLATE, ["fr->en"])
    assert "default to en->de, which this bundle does not offer" in note and "'fr->en'" in note
