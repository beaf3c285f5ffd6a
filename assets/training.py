"""The LoRA adapter: TRL SFTTrainer + peft on the train split (pipelines.train), on the trainer resource's device."""

from typing import Any

# No `from __future__ import annotations`: Dagster inspects the `context` annotation as a real class.
import dagster as dg
from dagster import AssetExecutionContext

from assets.automation import rebuild_when_inputs_change
from assets.data import base_model, dataset_splits
from assets.metadata import curve_plot, image_markdown
from assets.stage import materialized, run_stage
from assets.versions import code_version
from resources.project import ProjectResource
from resources.trainer import TrainerResource

_LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm")
_QUIET = ("runtime", "per_second")  # throughput keys of eval/train summaries: noise in a per-step log line


def describe_log(logs: dict[str, Any]) -> str:
    """One line per trainer log, e.g. 'step 5/40 loss=1.903 learning_rate=0.0009 grad_norm=0.84'."""

    def fmt(k: str, v: Any) -> str:
        return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"

    known = [fmt(k, logs[k]) for k in _LOGGED if k in logs]
    others = [fmt(k, v) for k, v in logs.items()
              if k not in (*_LOGGED, "step", "max_steps") and not any(q in k for q in _QUIET)]
    return " ".join([f"step {logs.get('step', '?')}/{logs.get('max_steps', '?')}", *known, *others])


@dg.asset(
    deps=[dataset_splits, base_model],
    group_name="training",
    kinds={"pytorch", "huggingface"},
    code_version=code_version("pipelines.train", "pipelines.chat", "pipelines.runcard"),
    automation_condition=rebuild_when_inputs_change("dataset_splits"),
    description="LoRA adapter (peft format, with tokenizer and run card) fine-tuned with TRL SFTTrainer on "
    "the train split; per-step losses stream to the run log.",
)
def lora_adapter(
    context: AssetExecutionContext, project: ProjectResource, trainer: TrainerResource
) -> dg.MaterializeResult:
    from pipelines import train as stage

    params = project.params()
    # trainer.env() is resolved inside run_stage: an impossible environment (cuda without a GPU) is a user error
    result = run_stage(
        lambda p: stage.run(p, env=trainer.env(), on_log=lambda logs: context.log.info(describe_log(logs))), params
    )
    extra: dict[str, Any] = {}
    curve = result.metrics.get("loss_curve") or {}
    png = result.outputs.get("loss_curve")
    if png is not None and png.is_file():
        extra["loss_curve"] = image_markdown(png, "train and validation loss")
    elif curve.get("step"):
        extra["loss_curve"] = curve_plot(
            {"train": list(zip(curve["step"], curve["train_loss"], strict=True)),
             "validation": list(zip(curve.get("eval_step", []), curve.get("eval_loss", []), strict=True))},
            "Loss", "optimizer step", "loss (nats/token)",
        )
    return materialized(
        "lora_adapter", result, params, sections=["train", "model.trust_remote_code"],
        inputs=["dataset_splits", "base_model"], extra=extra, skip=["loss_curve"],
    )


TRAINING_ASSETS = [lora_adapter]
