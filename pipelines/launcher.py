"""The `accelerate` launcher of the training stages and its log protocol.

    PIPELINES_TRAIN_LAUNCHER=accelerate PIPELINES_TRAIN_PROCESSES=2 python -m pipelines train

With the trainer environment's launcher = accelerate and num_processes > 1, the stage does not train in its own
process: it writes its params with absolute paths to a temporary file and starts `accelerate launch -m pipelines
<stage>` (DDP through accelerate's torchrun launcher; FSDP or DeepSpeed through an accelerate config file). Each
child is one rank of the same stage; rank 0 writes the outputs. Children print each trainer log dict on stdout as
one line `LOG_MARK + json`, which the launching process reads back and hands to its `on_log` (e.g. the Dagster
run log), so the logs look the same either way.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Params
from pipelines.errors import StageError
from pipelines.train_env import ENV_PREFIX, TrainEnv

log = logging.getLogger(__name__)

OnLog = Callable[[dict[str, Any]], None]
LOG_MARK = "@@train-log "  # stdout prefix of a child process's log dict, read back by the launching process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _portable_params(params: Params) -> dict[str, Any]:
    """params as a dict whose paths are absolute, so the file can live anywhere (a temp folder)."""
    data = params.model_dump(mode="json")
    data["paths"] = {key: str(params.path(key)) for key in data["paths"]}
    return data


def launch_accelerate(params: Params, env: TrainEnv, on_log: OnLog | None, stage: str = "train") -> None:
    """Run `stage` as `accelerate launch --num_processes N -m pipelines <stage>` (DDP; no layer of our own).

    Returns when every process finished; the stage's own outputs (written by rank 0) are the result. A child's
    user error comes back as the same one sentence (StageError); any other failure names the exit status and the
    launcher's last output lines."""
    threads = max(1, env.num_threads // env.num_processes)
    child_env = replace(env, num_threads=threads, launcher="in_process")
    package_root = str(Path(__file__).resolve().parents[1])
    environ = {
        **os.environ, **child_env.environ(),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        ENV_PREFIX + "LOG_STDOUT": "1",
    }
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[env.precision]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with tempfile.TemporaryDirectory(prefix="train-params-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(_portable_params(params), sort_keys=False), encoding="utf-8")
        # accelerate's `--cpu` starts several processes only through MPI (mpirun); its torchrun launcher
        # (`--multi_gpu`) starts them on any machine, and the trainer's use_cpu then selects CPU + gloo.
        topology = ["--config_file", env.accelerate_config] if env.accelerate_config else ["--multi_gpu"]
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *topology, "--num_processes", str(env.num_processes),
            "--num_machines", "1", "--mixed_precision", mixed, "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            "-m", "pipelines", stage, "--params", str(params_file),
        ]
        log.info("launching: %s", " ".join(cmd))
        with subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                mark = line.find(LOG_MARK)  # progress bars end in "\r", not "\n", so the mark can be mid-line
                if mark >= 0:
                    if on_log is not None:
                        on_log(json.loads(line[mark + len(LOG_MARK):]))
                    line = line[:mark]
                tail.append(line.rstrip())
                log.info("[accelerate] %s", line.rstrip())
    if proc.returncode != 0:
        errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
        if errors:
            raise StageError(errors[-1])
        raise StageError(f"`accelerate launch` with {env.num_processes} processes failed (exit {proc.returncode}); "
                         f"its last output: {' | '.join(list(tail)[-5:])}")


def child_log() -> OnLog | None:
    """Inside a launched process: hand each log dict to the launching process on stdout; else None."""
    if os.environ.get(ENV_PREFIX + "LOG_STDOUT") != "1":
        return None

    def emit(logs: dict[str, Any]) -> None:
        print(LOG_MARK + json.dumps(logs, default=str), flush=True)

    return emit


def inside_launcher() -> bool:
    """True in a process started by `accelerate launch` (torchrun sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ
