"""Where the project lives: the params file every asset, check and sensor reads.

    dagster dev -w workspace.yaml        # params.yaml in the current folder (the default)

Only the location is environment; every knob that changes a result stays in params.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.config import ConfigError, Params, load_params
from pipelines.io import RACY_NS

_LOADED: dict[tuple[Any, ...], Params] = {}  # (resolved path, size, mtime_ns, ctime_ns, inode) -> params


def _stat_key(path: Path) -> tuple[Any, ...] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _settled(path: Path) -> bool:
    """Last changed over a second ago: a second edit in the same coarse clock tick could keep the same stat."""
    stat = path.stat()
    return time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS


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
        if key is not None and key == _stat_key(path) and _settled(path):  # not edited while or just before it was read
            _LOADED.clear()
            _LOADED[key] = params
        return params
