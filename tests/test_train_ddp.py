"""The training stage runs unchanged as 2 data-parallel processes (`accelerate launch`, CPU + gloo).

    .venv/bin/python -m pytest tests/test_train_ddp.py
"""

from __future__ import annotations

from pipelines import train
from pipelines.config import load_params
from pipelines.io import read_json
from pipelines.train_env import TrainEnv
from tests.test_train import make_project


def test_two_process_run_produces_the_adapter(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 4, "eval_steps": 2, "save_steps": 2}))
    env = TrainEnv.resolve(device="cpu", num_threads=2, launcher="accelerate", num_processes=2)
    logs: list[dict] = []
    result = train.run(params, env, on_log=logs.append)
    out = params.path("adapter")
    metrics = read_json(out / "train_metrics.json")
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # Each optimizer step consumed one batch per process: 4 steps x 2 processes x 4 rows = 2 epochs of 16 rows.
    assert metrics["epochs"] == 2.0
    assert [entry["step"] for entry in logs if "loss" in entry][:2] == [1, 2]  # per-step loss reached this process
    assert result.metrics["final_train_loss"] == metrics["final_train_loss"]
