"""The fine-tuning lifecycle as plain Python: one module per stage, no orchestration imports.

    python -m pipelines --help

Each stage module exposes `run(params) -> StageResult`; DVC runs them through `python -m pipelines
<stage>` and the Dagster assets in `assets/` call the same functions.
"""
