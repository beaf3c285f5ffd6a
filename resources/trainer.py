"""The trainer resource: the environment training runs in (never the hyperparameters, those are params.yaml).

    dagster dev                    # the resource is configured in the Dagster definitions / launchpad

Device (auto: CUDA if present, else CPU), precision (auto: bf16 where the GPU supports it, fp16 on older GPUs,
fp32 on CPU), torch threads, optional 4-bit NF4 loading (bitsandbytes, double quantisation) for QLoRA, and how
training is launched: in the Dagster run's process, or as `accelerate launch` with N processes (DDP; FSDP or
DeepSpeed through an accelerate config file). The asset calls `pipelines.train.run(params, env=trainer.env())`.
"""

from __future__ import annotations

from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from pipelines.train import TrainEnv


class TrainerResource(ConfigurableResource):
    """Where and how the lora_adapter asset trains."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if a GPU is visible, else CPU.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (never bf16 there)."
    )
    num_threads: int = Field(0, ge=0, description="torch threads per process; 0: every core this process may use.")
    load_in_4bit: bool = Field(
        False, description="Load the frozen base in 4-bit NF4 with double quantisation (bitsandbytes) for any PEFT "
        "method; method qlora always does."
    )
    launcher: Literal["in_process", "accelerate"] = Field(
        "in_process",
        description="in_process: train inside the Dagster run; accelerate: `accelerate launch` N processes.",
    )
    num_processes: int = Field(1, ge=1, description="Data-parallel processes (GPUs) when launcher is accelerate.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~20% more compute."
    )
    accelerate_config: str | None = Field(
        None, description="Path of an `accelerate config` YAML (FSDP, DeepSpeed, multi-node); None: plain DDP."
    )

    def env(self) -> TrainEnv:
        """The resolved environment ('auto' filled in from this machine); raises StageError if it cannot work."""
        return TrainEnv.resolve(
            device=self.device,
            precision=self.precision,
            num_threads=self.num_threads,
            load_in_4bit=self.load_in_4bit,
            launcher=self.launcher,
            num_processes=self.num_processes,
            gradient_checkpointing=self.gradient_checkpointing,
            accelerate_config=self.accelerate_config,
        )
