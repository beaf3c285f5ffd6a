"""Where the project lives: the params file every asset, check and sensor reads.

    dagster dev -w workspace.yaml        # params.yaml in the current folder (the default)

Only the location is environment; every knob that changes a result stays in params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.config import ConfigError, Params, load_params
from pipelines.io import file_state, settled

_LOADED: dict[tuple[Any, ...], Params] = {}  # (resolved path, *file_state) -> params


def _stat_key(path: Path) -> tuple[Any, ...] | None:
    try:
        return str(path.resolve()), *file_state(path)
    except OSError:
        return None


class ProjectResource(dg.ConfigurableResource):
    """The params file of the project; relative paths resolve against the current working folder."""

    params_file: str = "params.yaml"

    def params(self) -> Params:
        """Load and validate params.yaml; a bad file fails the step with one sentence, no traceback.

        Every asset and check calls this, so a run of 12 steps would parse and validate the file 14 times;
        the parsed (frozen) Params is reused while the file's stat is unchanged, and any edit reloads it.
        """
        path = Path(self.params_file)
        key = _stat_key(path)
        if key is not None and key in _LOADED:
            return _LOADED[key]
        try:
            params = load_params(path)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        if key is not None and key == _stat_key(path) and settled(key[1:]):  # not edited while or just before read
            _LOADED.clear()
            _LOADED[key] = params
        return params
