"""Where the project lives: the params file every asset, check and sensor reads.

    dagster dev -w workspace.yaml        # params.yaml in the current folder (the default)

Only the location is environment; every knob that changes a result stays in params.yaml.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from pipelines.config import ConfigError, Params, load_params


class ProjectResource(dg.ConfigurableResource):
    """The params file of the project; relative paths resolve against the current working folder."""

    params_file: str = "params.yaml"

    def params(self) -> Params:
        """Load and validate params.yaml; a bad file fails the step with one sentence, no traceback."""
        try:
            return load_params(Path(self.params_file))
        except ConfigError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
