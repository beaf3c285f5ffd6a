"""Command line of the lifecycle: one sub-command per stage, the same `run(params)` DVC and Dagster call.

    python -m pipelines ingest                     # one stage, params.yaml in the current folder
    python -m pipelines clean --params other.yaml  # another params file
    python -m pipelines check-params               # validate params.yaml and print it resolved
    python -m pipelines dvc-yaml [--check]         # write (or compare) dvc.yaml from pipelines/stages.py

The stages and their order come from the stage manifest (pipelines/stages.py). User errors (bad params,
missing inputs, unreadable data: pipelines.errors.UserError) print one sentence and exit with status 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from pipelines.errors import UserError
from pipelines.stages import STAGES

# Commands that are not stages: name -> (help, module with main(argv) -> int, or None for check-params)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "check-params": ("validate params.yaml against the base model and print it", None),
    "dvc-yaml": ("write dvc.yaml from the stage manifest (pipelines/stages.py)", "pipelines.stages"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]][1]:  # a command with options of its own
        return importlib.import_module(COMMANDS[argv[0]][1]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in [*((s.name, s.help) for s in STAGES), *((n, h) for n, (h, _) in COMMANDS.items())]:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from pipelines.config import load_params

        params = load_params(args.params)
        if args.stage == "check-params":
            from pipelines.preflight import preflight

            preflight(params)
            print(json.dumps(params.model_dump(mode="json"), indent=2))
            return 0
        stage = next(s for s in STAGES if s.name == args.stage)
        result = importlib.import_module(stage.module).run(params)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
