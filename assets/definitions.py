"""The one Dagster code location of the fine-tuning factory.

    dagster dev -w workspace.yaml          # or: python -m resources.ui  (binds 127.0.0.1, DAGSTER_HOME=.dagster_home)
    dagster definitions validate -m assets.definitions
    PIPELINES_PARAMS=experiment.yaml python -m resources.ui   # the same graph on another params file

Graph (groups):  data: raw_files (observed) -> raw_examples -> cleaned_examples -> formatted_dataset -> dataset_splits;
                       raw_files + dataset_splits -> preference_pairs
                 training: base_model -> formatted_dataset; dataset_splits + base_model -> lora_adapter;
                           preference_pairs + lora_adapter + base_model -> preference_adapter
                 evaluation: lora_adapter -> evaluation_report; preference_adapter + lora_adapter -> alignment_report;
                             evaluation_report + alignment_report -> promoted_adapter
                 export: promoted_adapter + base_model -> merged_model -> gguf_model
Jobs, sensors and the schedule are described in assets/automation.py; checks in assets/checks.py.
"""

from __future__ import annotations

import os

import dagster as dg

from assets.automation import (
    checks_job,
    data_job,
    dvc_sync_sensor,
    lifecycle_job,
    raw_data_sensor,
    retrain_sensor,
    weekly_retrain,
)
from assets.checks import CHECKS
from assets.data import DATA_ASSETS
from assets.evaluation import EVALUATION_ASSETS
from assets.export import EXPORT_ASSETS
from assets.training import TRAINING_ASSETS
from resources.project import ProjectResource
from resources.trainer import TrainerResource

# One process per step, as Dagster's default executor, but forked from a server that has imported this code
# location once (forkserver preloads the run's module): a step no longer pays ~1.5 s of Python start-up and
# imports before it does any work.
STEP_EXECUTOR = dg.multiprocess_executor.configured({"start_method": {"forkserver": {}}})

defs = dg.Definitions(
    assets=[*DATA_ASSETS, *TRAINING_ASSETS, *EVALUATION_ASSETS, *EXPORT_ASSETS],
    asset_checks=CHECKS,
    jobs=[data_job, lifecycle_job, checks_job],
    sensors=[raw_data_sensor, retrain_sensor, dvc_sync_sensor],
    schedules=[weekly_retrain],
    executor=STEP_EXECUTOR,
    # PIPELINES_PARAMS points the UI at another params file (e.g. an experiment); default ./params.yaml
    resources={
        "project": ProjectResource(params_file=os.environ.get("PIPELINES_PARAMS", "params.yaml")),
        "trainer": TrainerResource(),
    },
)
