"""The LoRA adapter: TRL SFTTrainer + peft on the train split (pipelines.train), on the trainer resource's device;
the preference adapter: that adapter preference-tuned with TRL DPO / KTO (pipelines.align), on the same resource."""

from typing import Any

from assets.metadata import curve_plot, image_markdown
from assets.stage import describe_log, stage_asset_def
from pipelines.io import StageResult
from pipelines.stages import BY_NAME

__all__ = ["TRAINING_ASSETS", "describe_log", "lora_adapter", "preference_adapter"]


def _loss_curve(result: StageResult) -> dict[str, Any]:
    curve = result.metrics.get("loss_curve") or {}
    png = result.outputs.get("loss_curve")
    if png is not None and png.is_file():
        return {"loss_curve": image_markdown(png, "train and validation loss")}
    if curve.get("step"):
        return {"loss_curve": curve_plot(
            {"train": list(zip(curve["step"], curve["train_loss"], strict=True)),
             "validation": list(zip(curve.get("eval_step", []), curve.get("eval_loss", []), strict=True))},
            "Loss", "optimizer step", "loss (nats/token)",
        )}
    return {}


def _reward_curve(result: StageResult) -> dict[str, Any]:
    curve = result.metrics.get("reward_curve") or {}
    if not curve.get("step"):
        return {}
    return {"reward_margin_curve": curve_plot(
        {"train": list(zip(curve["step"], curve["margin"], strict=True)),
         "validation": list(zip(curve.get("eval_step", []), curve.get("eval_margin", []), strict=True))},
        "Implicit reward margin (chosen - rejected)", "optimizer step", "reward margin",
    )}


lora_adapter = stage_asset_def(BY_NAME["train"], extra=_loss_curve, skip=["loss_curve"])
preference_adapter = stage_asset_def(BY_NAME["align"], extra=_reward_curve, skip=["reward_curve"])

TRAINING_ASSETS = [lora_adapter, preference_adapter]
