"""Errors of the device runtime. Each message is one line for the user: the file, what is
wrong, what to do. The build side's `packager.core.errors.PackagerError` is a separate hierarchy;
CLIs catch both."""
from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the runtime raises on bad input."""


class LanguageError(EdgeError, ValueError):
    """A language code or a translation direction that cannot be parsed."""


class PromptError(EdgeError):
    """A missing or unusable chat template."""


class SchemaError(EdgeError):
    """An export config or bundle manifest that does not follow the schema."""


class BackendError(EdgeError):
    """A model that cannot be loaded or run by a backend."""
