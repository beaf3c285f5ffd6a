"""Command line of the lifecycle: one sub-command per stage, the same `run(params)` DVC and Dagster call.

    python -m pipelines ingest                     # one stage, params.yaml in the current folder
    python -m pipelines clean --params other.yaml  # another params file
    python -m pipelines check-params               # validate params.yaml and print it resolved; also checks
                                                   # that no output path holds files its stage did not write

User errors (bad params, missing inputs, unreadable data) print one sentence and exit with status 2;
no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from pipelines.config import ConfigError, load_params
from pipelines.io import StageError

# stage name (a verb, as in dvc.yaml) -> module exposing run(params) -> StageResult
STAGES: dict[str, tuple[str, str]] = {
    "fetch-model": ("pipelines.base_model", "materialise the base model as a plain HF folder"),
    "ingest": ("pipelines.ingest", "read data/raw/ and normalise every row to one conversation schema"),
    "clean": ("pipelines.clean", "normalise, redact PII, drop exact and near duplicates"),
    "format": ("pipelines.format", "render with the chat template, count tokens, apply the length policy"),
    "split": ("pipelines.split", "deterministic train/validation/test split without leakage"),
    "train": ("pipelines.train", "fine-tune the adapter with TRL SFTTrainer + peft"),
    "evaluate": ("pipelines.evaluate", "base vs fine-tuned on the test split; report + metrics"),
    "promote": ("pipelines.promote", "copy the adapter to the promoted folder if it passed the gate"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in {**STAGES, "check-params": ("", "validate params.yaml and print it")}.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        params = load_params(args.params)
        if args.stage == "check-params":
            from pipelines.io import FILE_OUTPUTS, OUTPUTS, claim_output
            from pipelines.preflight import preflight

            for key in (*OUTPUTS, *FILE_OUTPUTS):  # a stage would refuse to replace what it did not write
                claim_output(params, key, writable=False)
            preflight(params)
            print(json.dumps(params.model_dump(mode="json"), indent=2))
            return 0
        module = importlib.import_module(STAGES[args.stage][0])
        result = module.run(params)
    except (ConfigError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
