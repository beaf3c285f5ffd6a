"""The trainer resource: the environment training runs in (never the hyperparameters, those are params.yaml).

    dagster dev                    # the resource is configured in the Dagster definitions / launchpad

Its fields are the settings of `pipelines.train_env.FIELDS` (device, precision, threads, 4-bit loading, launcher,
processes, gradient checkpointing, accelerate config), declared there once; the command line reads the same
settings from PIPELINES_TRAIN_* variables. The assets that train or evaluate call
`pipelines.<stage>.run(params, env=trainer.env())`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from dagster import ConfigurableResource
from pydantic import Field

from pipelines.train_env import FIELDS, TrainEnv


def _annotation(field: Any) -> Any:
    if field.choices:
        return Literal[field.choices]
    return Optional[str] if field.default is None else field.kind  # noqa: UP045 (a runtime annotation)


def _field(field: Any) -> Any:
    bounds = {"ge": 0} if field.name == "num_threads" else {"ge": 1} if field.name == "num_processes" else {}
    return Field(field.default, description=field.help[0].upper() + field.help[1:] + ".", **bounds)


def _env(self: ConfigurableResource) -> TrainEnv:
    """The resolved environment ('auto' filled in from this machine); raises StageError if it cannot work."""
    return TrainEnv.resolve(**{f.name: getattr(self, f.name) for f in FIELDS})


TrainerResource = type("TrainerResource", (ConfigurableResource,), {
    "__module__": __name__,
    "__doc__": "Where and how training (and model evaluation) runs: pipelines.train_env.FIELDS.",
    "__annotations__": {f.name: _annotation(f) for f in FIELDS},
    **{f.name: _field(f) for f in FIELDS},
    "env": _env,
})
