"""B5: Dagster overhead of the data assets, and the cost of a warm re-run with nothing changed.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dagster.py              # 3 repeats, in-process
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dagster.py --cli        # + `dagster job execute -j data_job`
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dagster.py --rows 20000 # generated raw data instead of the demo

A throw-away project under bench/out/dagster/project/ (a copy of params.yaml, data/raw and the already
converted data/base_model) is what every run reads and writes; PIPELINES_PARAMS points
assets.definitions at it, so the repository's own data/ is never touched. Each Dagster instance
(DAGSTER_HOME) is a fresh folder under bench/out/dagster/homes/ with resources/dagster.yaml in it;
Dagster's console log of the in-process runs goes to bench/out/dagster/dagster.log.

The runs materialise the four data assets, raw_examples -> cleaned_examples -> formatted_dataset ->
dataset_splits, with their asset checks (what data_job runs, minus observing raw_files), in this process
with dagster.materialize(...) and the assets, checks and resources of assets.definitions.defs. The format
stage tokenises with the base model, so base_model is materialised once up front in each instance (its
stage finds the converted folder with the same source hash and returns at once); it is not timed.

Stage compute = the time spent inside pipelines.<ingest|clean|format|split>.run(params), measured by
wrapping those functions in this process (the asset metadata's wall_time_s, rounded to 0.01 s, is
printed next to it as a cross-check). Figures, each the median of `--repeats`:

  (a) wall time of the materialize() call / stage compute, on cold runs (target <= 1.2). The same ratio
      without the checks is printed too: the checks re-read and re-validate the written files, work
      a plain `python -m pipelines <stage>` chain does not do.
  (b) warm / cold wall time (target <= 5%). cold: the project's outputs deleted and a fresh instance;
      warm: the same project and instance materialised again right after, nothing changed. The data
      assets skip their stage (assets.stage) and the data checks reuse their last pass
      (assets.checks.reuse_or_check); the line "reused unchanged" counts those checks.

The arms alternate: per repeat, cold (with checks), warm (with checks), cold (no checks). One unmeasured
run first pays the one-off imports (torch and transformers, which the format stage imports), so the
figures are about Dagster's per-run cost, not Python start-up. `--cli` also times `dagster job execute -m
assets.definitions -j data_job` in a subprocess (observing raw_files included; Python start-up, loading the
code location and the run's own process are in its wall time) with stage compute read from the asset
metadata (wall_time_s). data_job, which the raw-data sensor launches, runs its steps in the run's process
(in_process_executor); other runs, such as "Materialize" in the UI, use one process per step forked from a
preloaded forkserver (assets.definitions.STEP_EXECUTOR).

Dagster's own cost per run is roughly fixed (creating the run, about 40 ms of event-log writes per step,
12 steps), while stage compute grows with the data, so both ratios depend on the data size: `--rows N`
replaces the demo's data/raw with N generated Alpaca-style rows (bench_scale.generate: 3% exact and 2%
near copies) to show where they land on a larger project.

The thread count is fixed (`--threads`, default $OMP_NUM_THREADS or 2: torch.set_num_threads and
OMP_NUM_THREADS, also for the subprocess); the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "dagster"
PROJECT = OUT / "project"
HOMES = OUT / "homes"
LOG = OUT / "dagster.log"  # Dagster's console log of every in-process run (it writes to stderr)
sys.path.insert(0, str(ROOT))

from common import arg_parser, loadavg  # noqa: E402  (bench/ is the script's folder, first on sys.path)

STAGES = ("ingest", "clean", "format", "split")
DATA_ASSETS = ("raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits")
OUTPUT_KEYS = ("raw_examples", "cleaned", "formatted", "splits")  # params paths the data stages write


def _parse() -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of each arm (default 3)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                    help="torch threads (default $OMP_NUM_THREADS or 2)")
    ap.add_argument("--rows", type=int, default=0,
                    help="generated raw rows instead of the repository's data/raw (default: the demo data)")
    ap.add_argument("--cli", action="store_true",
                    help="also time `dagster job execute -j data_job` in a subprocess")
    return ap.parse_args()


def make_project(rows: int = 0) -> Path:
    """params.yaml + data/raw (or `rows` generated rows) + data/base_model copied into bench/out/dagster/project."""
    if PROJECT.exists():
        shutil.rmtree(PROJECT)
    (PROJECT / "data").mkdir(parents=True)
    shutil.copyfile(ROOT / "params.yaml", PROJECT / "params.yaml")
    if rows:
        from bench_scale import generate

        generate(PROJECT / "data" / "raw" / "bench.jsonl", rows)
    else:
        shutil.copytree(ROOT / "data" / "raw", PROJECT / "data" / "raw")
    model = ROOT / "data" / "base_model"
    if (model / "source.json").is_file():
        shutil.copytree(model, PROJECT / "data" / "base_model")
    else:
        print(f"note: no converted model at '{model}': the up-front base_model materialisation converts the "
              "GGUF into the throw-away project (~30 s, once)")
    return PROJECT / "params.yaml"


def clear_outputs(params_file: Path) -> None:
    from pipelines.config import load_params

    params = load_params(params_file)
    for key in OUTPUT_KEYS:
        shutil.rmtree(params.path(key), ignore_errors=True)


_home_counter = 0


def new_home() -> Path:
    global _home_counter
    _home_counter += 1
    home = HOMES / f"home{_home_counter}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    shutil.copyfile(ROOT / "resources" / "dagster.yaml", home / "dagster.yaml")
    return home


class StageTimer:
    """Wraps pipelines.<stage>.run so every call's duration is recorded (the assets import the module
    inside the asset function and call `stage.run`, so patching the module attribute is enough)."""

    def __init__(self) -> None:
        import importlib

        self.calls: list[tuple[str, float]] = []
        for name in STAGES:
            module = importlib.import_module(f"pipelines.{name}")
            module.run = self._wrap(name, module.run)

    def _wrap(self, name: str, run: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.calls.append((name, time.perf_counter() - started))

        return timed

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in self.calls:
            out[name] = out.get(name, 0.0) + seconds
        self.calls = []
        return out


def metadata_seconds(instance, keys=DATA_ASSETS) -> float:
    """Sum of wall_time_s in the latest materialisation of each asset (run_stage records it)."""
    import dagster as dg

    total = 0.0
    for key in keys:
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        meta = event.asset_materialization.metadata if event else {}
        total += float(meta["wall_time_s"].value) if "wall_time_s" in meta else float("nan")
    return total


def main() -> None:
    args = _parse()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"load average at start: {loadavg()}  cpus: {os.cpu_count()}  threads: {args.threads}")
    params_file = make_project(args.rows)
    print(f"raw data: {f'{args.rows} generated rows' if args.rows else 'the demo (data/raw)'}")
    os.environ["PIPELINES_PARAMS"] = str(params_file)  # read by assets.definitions at import
    shutil.rmtree(HOMES, ignore_errors=True)
    HOMES.mkdir(parents=True)
    LOG.unlink(missing_ok=True)
    os.environ["DAGSTER_HOME"] = str(new_home())

    import warnings

    import torch

    torch.set_num_threads(args.threads)
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # observable_source_asset, include_sources
    from assets.definitions import defs

    timer = StageTimer()
    everything = [*defs.assets, *defs.asset_checks]
    data = dg.AssetSelection.assets(*DATA_ASSETS)  # the assets and their checks
    assets_only = data - dg.AssetSelection.all_asset_checks()

    def fresh_instance() -> dg.DagsterInstance:
        """A new DAGSTER_HOME with the base model materialised (untimed) and no data outputs."""
        clear_outputs(params_file)
        instance = dg.DagsterInstance.from_config(str(new_home()))
        with open(LOG, "a") as log, contextlib.redirect_stderr(log):
            dg.materialize(everything, selection=dg.AssetSelection.assets("base_model"), resources=defs.resources,
                           instance=instance)
        timer.take()
        return instance

    def run(instance: dg.DagsterInstance, selection: dg.AssetSelection,
            cold: bool = True) -> tuple[float, float, float, int]:
        """(wall s, stage compute s, metadata wall_time_s sum, checks evaluated) of one materialize()."""
        with open(LOG, "a") as log, contextlib.redirect_stderr(log):
            started = time.perf_counter()
            result = dg.materialize(everything, selection=selection, resources=defs.resources, instance=instance)
            wall = time.perf_counter() - started
        assert result.success
        stage = timer.take()
        assert set(stage) == set(STAGES) if cold else set(stage) <= set(STAGES), stage  # warm: unchanged skip
        evaluations = result.get_asset_check_evaluations()
        reused = sum("reused" in e.metadata for e in evaluations)  # assets.checks.REUSED
        return wall, sum(stage.values()), metadata_seconds(instance), len(evaluations), reused

    warm_up = fresh_instance()
    wall, stage, _, n_checks, _ = run(warm_up, data)
    print(f"warm-up (imports, not counted): {wall:.1f} s wall, {stage:.1f} s in stages, {n_checks} checks")

    arms = ("cold", "warm", "cold, no checks")
    rows: dict[str, list[tuple[float, float, float, int, int]]] = {a: [] for a in arms}
    for _ in range(args.repeats):  # alternate, so drifting load hits every arm alike
        instance = fresh_instance()
        rows["cold"].append(run(instance, data))
        rows["warm"].append(run(instance, data, cold=False))  # the same project and instance, nothing changed
        rows["cold, no checks"].append(run(fresh_instance(), assets_only))

    def med(arm: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[arm])

    for arm in arms:
        print(f"{arm}: wall s {' '.join(f'{r[0]:.2f}' for r in rows[arm])}; in stages s "
              f"{' '.join(f'{r[1]:.2f}' for r in rows[arm])} (metadata wall_time_s "
              f"{' '.join(f'{r[2]:.2f}' for r in rows[arm])}); checks evaluated {rows[arm][0][3]}, "
              f"reused unchanged {rows[arm][0][4]}")
    ratio = {arm: statistics.median(r[0] / r[1] for r in rows[arm]) for arm in ("cold", "cold, no checks")}
    print(f"B5a Dagster wall / stage compute (data assets + checks, cold, in-process): {ratio['cold']:.2f}x "
          f"(median of {args.repeats}; {med('cold', 0):.1f} s wall vs {med('cold', 1):.1f} s in "
          f"pipelines.<stage>.run; without checks {ratio['cold, no checks']:.2f}x, "
          f"{med('cold, no checks', 0):.1f} vs {med('cold, no checks', 1):.1f} s) (target <= 1.2)")
    warm_share = statistics.median(w[0] / c[0] for w, c in zip(rows["warm"], rows["cold"], strict=True))
    print(f"B5b warm re-run with nothing changed / cold run (in-process): {100 * warm_share:.0f}% "
          f"(median of {args.repeats}; {med('warm', 0):.1f} vs {med('cold', 0):.1f} s; the warm run re-executed "
          f"{med('warm', 1):.1f} s of stage compute) (target <= 5%)")

    if args.cli:
        cli(args, params_file, fresh_instance)
    print(f"load average at end: {loadavg()}")


def cli(args: argparse.Namespace, params_file: Path, fresh_instance: Callable) -> None:
    """`dagster job execute -j data_job` in a subprocess: cold (fresh home, no outputs) then warm."""
    import dagster as dg

    dagster_bin = Path(sys.executable).with_name("dagster")
    walls: dict[str, list[float]] = {"cold": [], "warm": []}
    stages: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        instance = fresh_instance()  # outputs cleared, base model materialised in a new DAGSTER_HOME
        home = Path(instance.root_directory)
        env = {**os.environ, "DAGSTER_HOME": str(home), "PIPELINES_PARAMS": str(params_file)}
        for arm in ("cold", "warm"):
            started = time.perf_counter()
            proc = subprocess.run([str(dagster_bin), "job", "execute", "-m", "assets.definitions", "-j", "data_job"],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            walls[arm].append(time.perf_counter() - started)
            if proc.returncode != 0:
                sys.exit(f"dagster job execute failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            with dg.DagsterInstance.from_config(str(home)) as reader:
                stages[arm].append(metadata_seconds(reader))
    for arm in walls:
        print(f"cli {arm}: wall s {' '.join(f'{w:.2f}' for w in walls[arm])}; in stages (metadata wall_time_s) "
              f"{' '.join(f'{s:.2f}' for s in stages[arm])}")
    ratio = statistics.median(w / s for w, s in zip(walls["cold"], stages["cold"], strict=True))
    warm = statistics.median(w / c for w, c in zip(walls["warm"], walls["cold"], strict=True))
    print(f"B5a' Dagster wall / stage compute (`dagster job execute -j data_job`, cold): {ratio:.2f}x "
          f"(median of {args.repeats}; {statistics.median(walls['cold']):.1f} s wall vs "
          f"{statistics.median(stages['cold']):.1f} s in stages) (target <= 1.2)")
    print(f"B5b' warm / cold (`dagster job execute -j data_job`): {100 * warm:.0f}% (median of {args.repeats}; "
          f"{statistics.median(walls['warm']):.1f} vs {statistics.median(walls['cold']):.1f} s) (target <= 5%)")


if __name__ == "__main__":
    main()
