"""Command line of the lifecycle: one sub-command per stage, the same `run(params)` DVC and Dagster call.

    python -m pipelines ingest                     # one stage, params.yaml in the current folder
    python -m pipelines clean --params other.yaml  # another params file
    python -m pipelines check-params               # validate params.yaml and print it resolved; also checks
                                                   # that no output path holds files its stage did not write
    python -m pipelines dvc-yaml [--check]         # write (or compare) dvc.yaml from pipelines/stages.py
    python -m pipelines chat [--adapter promoted]  # talk to the model in the terminal
    python -m pipelines serve [--gguf f16]         # OpenAI-compatible server on 127.0.0.1

The stages and their order come from the stage manifest (pipelines/stages.py). User errors (bad params,
missing inputs, unreadable data: pipelines.errors.UserError) print one sentence and exit with status 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from pipelines.config import Params
from pipelines.errors import UserError, exit_code
from pipelines.io import StageResult
from pipelines.stages import STAGES, Stage

# Commands that are not stages: name -> (help, module with main(argv) -> int, or None for check-params)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "check-params": ("validate params.yaml against the base model and print it", None),
    "dvc-yaml": ("write dvc.yaml from the stage manifest (pipelines/stages.py)", "pipelines.stages"),
    "chat": ("chat with the model in the terminal (streaming; /adapter switches adapters)", "pipelines.terminal_chat"),
    "serve": ("OpenAI-compatible HTTP server on 127.0.0.1 (llama-server, or vLLM on CUDA)", "pipelines.serve"),
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
            from pipelines.io import FILE_OUTPUTS, OUTPUTS, claim_output
            from pipelines.preflight import preflight

            for key in (*OUTPUTS, *FILE_OUTPUTS):  # a stage would refuse to replace what it did not write
                claim_output(params, key, writable=False)
            preflight(params)
            print(json.dumps(params.model_dump(mode="json"), indent=2))
            return 0
        stage = next(s for s in STAGES if s.name == args.stage)
        result = run_and_record(stage, params)
    except UserError as exc:
        return exit_code(exc)
    print(result.summary())
    return 0


def run_and_record(stage: Stage, params: Params) -> StageResult:
    """Run `stage` and write its run record (pipelines.records), so the Dagster door sees this run too."""
    from pipelines import records
    from pipelines.versions import stage_card

    card = stage_card(params, stage)  # the inputs as they are before the stage runs
    started = time.perf_counter()
    result = importlib.import_module(stage.module).run(params)
    result.metrics.setdefault("wall_time_s", round(time.perf_counter() - started, 2))
    if int(os.environ.get("RANK", "0")) == 0 and "WORLD_SIZE" not in os.environ:
        records.write(stage, params, result, card, door="cli")  # the launching process records a launched run
    return result


if __name__ == "__main__":
    sys.exit(main())
