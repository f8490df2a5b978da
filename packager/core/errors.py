"""Typed errors of the build side. Library code raises these; only the CLI turns them into
one `error: ...` line and a nonzero exit."""
from __future__ import annotations


class PackagerError(Exception):
    """Base class: the message must name the file, what is wrong and what to do."""


class UnsupportedArchitecture(PackagerError):
    """The checkpoint's model_type has no architecture description in packager/core/arch/."""


class CheckpointError(PackagerError):
    """A checkpoint on disk is missing, truncated, corrupt or inconsistent."""


class PlanError(PackagerError):
    """A plan file is malformed or does not fit the model it is applied to."""


class OutputExistsError(PackagerError):
    """The output path exists and --force was not given."""
