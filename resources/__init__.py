"""Dagster resources: the environment only (where the project lives, the trainer's device); never a result knob.

    project.py   ProjectResource: the params file every asset reads
    trainer.py   TrainerResource: device, precision, threads, launcher of training
    ui.py        `python -m resources.ui`: dagster dev on 127.0.0.1 with DAGSTER_HOME=<project>/.dagster_home
"""
