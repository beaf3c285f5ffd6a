"""The one kind of user error: a mistake in the user's data, params or environment, not a bug.

    from pipelines.errors import UserError

Its message is one sentence that names the file, line or key, what was expected and what to do. It is
translated in two ways: on the command line by `exit_code` (the sentence on stderr, exit 2, no traceback) and at
the Dagster asset boundary (`assets/stage.py: run_stage`: `dagster.Failure` with the sentence, no retry).
Anything else that escapes a stage is a bug and keeps its traceback.

    ConfigError  params.yaml (or the base model it names) cannot work: raised before any work starts
    StageError   a stage's inputs or environment cannot work: raised by the stage itself
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A user-facing failure: the message is one sentence, shown without a traceback."""


class ConfigError(UserError, ValueError):
    """A user error in params.yaml: the message is one sentence naming the key, value and fix."""


class StageError(UserError, RuntimeError):
    """A user-facing failure of a stage: the message is one clear sentence, shown without a traceback."""


def exit_code(exc: UserError) -> int:
    """The command line's answer to a user error: `error: <sentence>` on stderr; returns the exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def run_command(command, args, load_params) -> int:  # noqa: ANN001 (argparse namespace, callables)
    """`command(args, load_params(args.params))`, a user error answered by exit_code: the body of the `main` of
    a command that is not a stage (serve, chat)."""
    try:
        return command(args, load_params(args.params))
    except UserError as exc:
        return exit_code(exc)
