"""Dagster assets of the fine-tuning factory: thin adapters over `pipelines.*` (no logic of their own).

    data.py        raw_files (observed), base_model, raw_examples, cleaned_examples, formatted_dataset, dataset_splits
    training.py    lora_adapter (on the trainer resource)
    evaluation.py  evaluation_report, promoted_adapter
    checks.py      asset checks (pandera contracts, stage reports, the promotion gate)
    automation.py  data_job, lifecycle_job, raw_data_sensor, retrain_sensor, weekly_retrain
    definitions.py the code location: `defs` (workspace.yaml loads assets.definitions)
    stage.py, metadata.py, versions.py   the shared adapter, metadata rendering, content hashes + run card
"""
