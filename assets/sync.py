"""One state behind the three doors: what `dvc repro` made shows in Dagster, what Dagster made is in dvc.lock.

    python -m assets.sync                # report every output `dvc repro` made into the Dagster instance
                                         # ($DAGSTER_HOME), then evaluate their checks (`make pipeline` ends with it)

DVC -> Dagster. Every stage run writes a run record beside its output (pipelines.records), whichever door ran it;
outputs DVC restored without running the stage (run cache, `dvc checkout`) get one here (restored_records).
An output whose record is current (same params, input versions and code as now; files unchanged) but which
Dagster has not seen is reported to the instance as a *runless* AssetMaterialization carrying exactly the metadata
a Dagster run gives (figures, plots, run card, data and code version tags), the mechanism Dagster offers for assets
produced outside it (`DagsterInstance.report_runless_asset_event`; in a sensor, `SensorResult(asset_events=...)`).
Why not an observation or an external asset: these are the same assets Dagster also materialises, so a
materialisation event is what makes the UI, the staleness and the automation conditions see them as built. The
raw files are reported as an observation (a source asset). Then the asset checks of those assets run (in-process
here, or as a run of `checks_job` requested by the `dvc_sync_sensor`), so the UI shows their results too.

Dagster -> DVC. After a Dagster run of a stage, `dvc_commit` records that stage's deps and outs in dvc.lock (`dvc
commit --force <stage>`), which is what `dvc repro` would have written: `dvc status` is then clean and `dvc repro`
reruns nothing. It applies only to the project's own params.yaml next to dvc.yaml (an experiment's params file is
not what dvc.yaml reads).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines import records
from pipelines.config import Params
from pipelines.io import StageResult
from pipelines.stages import STAGES, Stage, upstream_assets
from pipelines.versions import current_version, raw_version, stage_card

SYNCED = "synced"
LOCK_RETRIES = 5  # dvc commit attempts while another DVC process holds the repository lock


# ------------------------------------------------------------------------------------------ Dagster -> DVC


def dvc_executable() -> str | None:
    """The project's `dvc` (linked into .venv/bin by `make setup`), or one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else shutil.which("dvc")


def _owned_by_dvc(params: Params) -> bool:
    """True if DVC owns this project's state: dvc.yaml and .dvc/ beside the project's own params.yaml (an
    experiment's params file is not what dvc.yaml reads)."""
    root = params.root
    return ((root / "dvc.yaml").is_file() and (root / ".dvc").is_dir() and params.file is not None
            and params.file == (root / "params.yaml").resolve())


def _dvc_env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def dvc_commit(stage: Stage, params: Params) -> str | None:
    """Record `stage` in dvc.lock after a Dagster run made its outputs; None on success or when DVC does not own
    this project (no dvc.yaml, or another params file), else why it could not (one line)."""
    root = params.root
    if not _owned_by_dvc(params):
        return None
    dvc = dvc_executable()
    if dvc is None:
        return "dvc is not installed (make setup installs it)"
    env = _dvc_env()
    for attempt in range(LOCK_RETRIES):
        proc = subprocess.run([dvc, "commit", "--force", "--quiet", stage.dvc_name], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return None
        output = (proc.stderr or proc.stdout).strip()
        if "lock" not in output.lower() or attempt == LOCK_RETRIES - 1:
            return output.splitlines()[-1] if output else f"dvc commit exited {proc.returncode}"
        time.sleep(2 * (attempt + 1))
    return None


# ------------------------------------------------------------------------------------------ DVC -> Dagster


def _seen(instance: dg.DagsterInstance, stage: Stage, record: dict[str, Any]) -> bool:
    """True if Dagster's latest materialisation of the asset already is this output (same data version and card)."""
    event = instance.get_latest_materialization_event(dg.AssetKey(stage.asset))
    if event is None or event.asset_materialization is None:
        return False
    materialization = event.asset_materialization
    params_hash = materialization.metadata.get("run_card/params_hash")
    return (materialization.tags.get("dagster/data_version") == record["data_version"]
            and getattr(params_hash, "value", params_hash) == record["card"]["params_hash"])


def dvc_changed(params: Params) -> set[str] | None:
    """The DVC stage names `dvc status` reports as not up to date (changed deps, params, outs or command); None
    when DVC does not own the project or cannot answer."""
    dvc = dvc_executable()
    if dvc is None or not _owned_by_dvc(params):
        return None
    try:
        proc = subprocess.run([dvc, "status", "--json", "--quiet"], cwd=params.root, env=_dvc_env(),
                              capture_output=True, text=True, timeout=600)
        status = json.loads(proc.stdout or "{}")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if proc.returncode not in (0, 1) or not isinstance(status, dict):
        return None
    return {name.split(":")[-1] for name in status}  # "dvc.yaml:train" in some versions


_ASKED: dict[Path, frozenset] = {}  # per project: the candidates (stage, card, data version) dvc status last saw


def restored_records(params: Params, stages: list[Stage], cards: dict[str, dict[str, Any]]) -> list[Stage]:
    """Write a run record (door "dvc") for each of `stages` whose outputs DVC put in place without the stage
    running, so both other doors see them: `dvc repro` restoring them from its run cache (params set back to
    values already run), or `dvc checkout` after a `git checkout`. A stage qualifies when all its outputs exist
    and `dvc status` finds it up to date, that is, its outputs are those dvc.lock names for its current deps and
    params. The figures of the run that made them are kept only when the last record saw these very files (same
    data version); otherwise the record has none, and says so. `cards`: stage_card of each stage, by name.
    Returns the stages recorded."""
    candidates = [stage for stage in stages if all(params.path(key).exists() for key in stage.outputs)]
    versions = {stage.name: current_version(stage.asset, params) for stage in candidates}
    state = frozenset((stage.name, json.dumps(cards[stage.name], sort_keys=True), versions[stage.name])
                      for stage in candidates)
    if not candidates or _ASKED.get(params.root) == state:  # `dvc status` (seconds) already said no to these
        return []
    changed = dvc_changed(params)
    if changed is None:
        return []
    _ASKED[params.root] = state
    written = []
    for stage in candidates:
        if stage.dvc_name in changed:
            continue
        previous = records.read(stage, params) or {}
        same_files = previous.get("data_version") == versions[stage.name]
        metrics = dict(previous.get("metrics", {})) if same_files else {
            "restored_by_dvc": "DVC restored these outputs (run cache or dvc checkout); the figures of the run that "
                               "made them are in its metrics files, not in this record"}
        outputs = {key: params.path(key) for key in stage.outputs}
        records.write(stage, params, StageResult(stage.name, outputs, metrics), cards[stage.name], door="dvc")
        written.append(stage)
    return written


def pending(instance: dg.DagsterInstance, params: Params) -> list[tuple[Stage, dict[str, Any]]]:
    """(stage, record) of every output that is up to date per its run record but not yet seen by Dagster. Outputs
    with no current record that DVC says are up to date get one first (restored_records)."""
    cards = {stage.name: stage_card(params, stage) for stage in STAGES}
    unrecorded = [stage for stage in STAGES if records.current(stage, params, cards[stage.name]) is None]
    if unrecorded:
        restored_records(params, unrecorded, cards)
    out = []
    for stage in STAGES:
        record = records.current(stage, params, cards[stage.name])
        if record is not None and not _seen(instance, stage, record):
            out.append((stage, record))
    return out


def input_pointers(instance: dg.DagsterInstance, names: Any) -> dict[str, str]:
    """For each upstream asset name: the storage id of its latest materialisation (or observation: raw_files),
    "NULL" when it has none. With the input data versions these are the provenance tags Dagster's staleness
    check reads (a materialisation without them shows "has a new dependency on ..." in the UI)."""
    pointers = {}
    for name in names:
        key = dg.AssetKey(name)
        found = (instance.fetch_materializations(key, limit=1).records
                 or instance.fetch_observations(key, limit=1).records)
        pointers[name] = str(found[0].storage_id) if found else "NULL"
    return pointers


def materialization(stage: Stage, record: dict[str, Any], params: Params,
                    pointers: dict[str, str] | None = None) -> dg.AssetMaterialization:
    """The runless materialisation of a record: the metadata and version tags a Dagster run would give
    (`pointers`: input_pointers of its upstream assets, when the instance is at hand)."""
    import assets.definitions  # noqa: F401  (registers each asset's extra metadata in assets.stage.METADATA)
    from assets.stage import stage_metadata

    metadata = stage_metadata(stage, records.result_of(record), record["card"])
    metadata[SYNCED] = (f"made by `dvc repro` / the command line at {record.get('finished')} (run record "
                        f"{records.RECORD})")
    tags = {"dagster/data_version": record["data_version"], "dagster/code_version": record["card"]["code_version"]}
    for name, version in record["card"]["inputs"].items():
        tags[f"dagster/input_data_version/{name}"] = version
        if pointers is not None:
            tags[f"dagster/input_event_pointer/{name}"] = pointers.get(name, "NULL")
    return dg.AssetMaterialization(asset_key=stage.asset, metadata=metadata, tags=tags)


def raw_observation(params: Params) -> dg.AssetObservation:
    return dg.AssetObservation(asset_key="raw_files", tags={"dagster/data_version": raw_version(params)},
                               metadata={SYNCED: "observed when outputs of `dvc repro` were reported"})


def check_keys(stages: list[Stage]) -> list[dg.AssetCheckKey]:
    from assets.definitions import defs

    assets = {dg.AssetKey(stage.asset) for stage in stages}
    return [key for key in defs.get_repository_def().asset_graph.asset_check_keys if key.asset_key in assets]


def sync(instance: dg.DagsterInstance, params: Params, *, run_checks: bool = True) -> list[str]:
    """Report every pending output into `instance` (and evaluate its checks); returns the assets reported."""
    found = pending(instance, params)
    if not found:
        return []
    if any("raw_files" in upstream_assets(stage) for stage, _ in found):
        instance.report_runless_asset_event(raw_observation(params))
    for stage, record in found:  # one at a time, upstream first: each points at what was just reported
        pointers = input_pointers(instance, record["card"]["inputs"])
        instance.report_runless_asset_event(materialization(stage, record, params, pointers))
    stages = [stage for stage, _ in found]
    if run_checks and check_keys(stages):
        from assets.checks import CHECKS
        from assets.definitions import defs
        from resources.project import ProjectResource

        resources = {**defs.resources, "project": ProjectResource(params_file=str(params.file or "params.yaml"))}
        dg.materialize([*defs.assets, *CHECKS], instance=instance, resources=resources,
                       selection=dg.AssetSelection.checks(*check_keys(stages)), raise_on_error=False,
                       tags={"pipelines/door": "dvc repro (synced)"})
    return [stage.asset for stage in stages]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipelines.config import load_params
    from pipelines.errors import UserError, exit_code
    from resources.ui import dagster_home

    parser = argparse.ArgumentParser(prog="python -m assets.sync", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-checks", action="store_true", help="report the materialisations only")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except UserError as exc:
        return exit_code(exc)
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home(params.root)))
    with dg.DagsterInstance.get() as instance:
        reported = sync(instance, params, run_checks=not args.no_checks)
    print(f"reported to Dagster ({os.environ['DAGSTER_HOME']}): {', '.join(reported) or 'nothing new'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
