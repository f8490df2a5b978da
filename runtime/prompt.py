"""The one prompt renderer: the model's own chat template (jinja2), used by every stage.

The template sees `messages=[{"role": "user", "content": text}]`, `source_lang`,
`target_lang` (canonical codes from runtime.languages), `add_generation_prompt=True` and the
special tokens given to the renderer (`bos_token`, `eos_token`, ...), as Hugging Face's
`apply_chat_template` would pass them.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import PromptError
from runtime.languages import Language, parse_language

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class PromptRenderer:
    """Compiled chat template. `source` names where the template came from, for errors."""

    def __init__(self, template: str, *, source: str = "<template>", special_tokens: dict[str, str] | None = None):
        if not isinstance(template, str) or not template.strip():
            raise PromptError(f"{source}: the chat template is empty; re-export the model with its chat_template.jinja")
        self.template_text = template
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        # Same environment settings as transformers' chat templates, sandboxed.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(f"{source}: chat template syntax error at line {exc.lineno}: {exc.message}") from None

    @classmethod
    def from_file(cls, path: str | Path, *, special_tokens: dict[str, str] | None = None) -> "PromptRenderer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PromptError(f"{path}: chat template not found") from None
        except UnicodeDecodeError:
            raise PromptError(f"{path}: chat template is not UTF-8 text") from None
        return cls(text, source=str(path), special_tokens=special_tokens)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "PromptRenderer":
        """The template of a Hugging Face save_pretrained directory: `chat_template.jinja`,
        else the `chat_template` string of `tokenizer_config.json`."""
        model_dir = Path(model_dir)
        special = special_tokens_of(model_dir)
        if (model_dir / TEMPLATE_FILE).is_file():
            return cls.from_file(model_dir / TEMPLATE_FILE, special_tokens=special)
        config_path = model_dir / TOKENIZER_CONFIG
        template = _read_json(config_path).get("chat_template") if config_path.is_file() else None
        if isinstance(template, str):
            return cls(template, source=str(config_path), special_tokens=special)
        raise PromptError(
            f"{model_dir}: no chat template: expected {TEMPLATE_FILE} or a 'chat_template' string in "
            f"{TOKENIZER_CONFIG}; save the tokenizer with its chat template"
        )

    def render(self, text: str, src: "str | Language", tgt: "str | Language") -> str:
        """The prompt that asks the model to translate `text` from `src` to `tgt`."""
        source_lang, target_lang = parse_language(src), parse_language(tgt)
        try:
            prompt = self._template.render(
                # the language codes also ride on the message, for templates that read them there
                messages=[{"role": "user", "content": text, "src_lang": source_lang.code, "tgt_lang": target_lang.code}],
                source_lang=source_lang.code,
                target_lang=target_lang.code,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise PromptError(f"{self.source}: chat template failed to render: {exc}") from None
        if text and text not in prompt:
            raise PromptError(f"{self.source}: chat template does not place the user message in the prompt")
        return prompt


# Stock chat clients (llama-server, Ollama, LM Studio) render the template with messages only.
# The project's templates then take the direction from a first system message "en->de", else
# from this statement, which an export rewrites to the direction it was built for.
_DEFAULT_DIRECTION = re.compile(r"(\{%-?\s*set\s+default_direction\s*=\s*)(['\"])([^'\"]*)\2(\s*-?%\})")


def default_direction(template: str) -> str | None:
    """The `set default_direction = '..'` of a template, or None when it has none."""
    match = _DEFAULT_DIRECTION.search(template)
    return match.group(3) if match else None


def with_default_direction(template: str, src: "str | Language", tgt: "str | Language") -> str:
    """`template` with its default direction set to src->tgt (unchanged when it has no
    `set default_direction` statement: a template that needs the language variables)."""
    pair = f"{parse_language(src).code}->{parse_language(tgt).code}"
    return _DEFAULT_DIRECTION.sub(lambda m: f"{m.group(1)}'{pair}'{m.group(4)}", template, count=1)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a JSON object")
    return data


def special_tokens_of(model_dir: str | Path) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as strings from tokenizer_config.json (empty if absent)."""
    path = Path(model_dir) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    tokens = {}
    for key, value in _read_json(path).items():
        if key.endswith("_token") and isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return tokens
