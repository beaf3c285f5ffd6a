"""The one kind of user error: a mistake in the user's data, params or environment, not a bug.

    from pipelines.errors import UserError

Its message is one sentence that names the file, line or key, what was expected and what to do. It is
translated in exactly two places: the command line (`pipelines/__main__.py`: the sentence on stderr, exit 2,
no traceback) and the Dagster asset boundary (`assets/stage.py: run_stage`: `dagster.Failure` with the
sentence, no retry). Anything else that escapes a stage is a bug and keeps its traceback.

    ConfigError  params.yaml (or the base model it names) cannot work: raised before any work starts
    StageError   a stage's inputs or environment cannot work: raised by the stage itself
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing failure: the message is one sentence, shown without a traceback."""


class ConfigError(UserError, ValueError):
    """A user error in params.yaml: the message is one sentence naming the key, value and fix."""


class StageError(UserError, RuntimeError):
    """A user-facing failure of a stage: the message is one clear sentence, shown without a traceback."""
