"""The Dagster UI, driven the way a user drives it: headless Chromium against `python -m resources.ui`.

    .venv/bin/python -m pytest tests/test_ui_browser.py -m browser

On a throw-away copy of the project (tiny model params): start the UI on a free port, open the asset
lineage, select the data assets (`+key:dataset_splits`: the data stages and the base model they need),
click "Materialize all", wait for the run to succeed, read dataset_splits' metadata and check results
and compare them with the files the run wrote, save a screenshot (bench/out/ui_screenshot.png), then
SIGTERM the launcher and require every process it started to be gone (a training run that the
retrain sensor launches after the data run is usually still in flight then, so this covers it too).
Selectors are roles and visible text, never CSS classes: they follow what a user reads.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil  # a dependency of accelerate and peft
import pytest

from tests.conftest import REPO, tiny_overrides
from tests.test_dvc import copy_repo_with_tickets

CHROMIUM = Path("/usr/bin/chromium")  # CI: `apt-get install chromium` in .ci/run
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "bench" / "out" / "ui_screenshot.png"  # gitignored
SELECTION = "+key:dataset_splits"  # dataset_splits and everything upstream: 4 data assets + base_model
SERVER_START_S = 120  # seconds for `dagster dev` to serve (code location loaded) on a busy 2-core box
RUN_S = 420  # seconds for the 5-asset, 9-check run: ~110 s on a quiet 2-core box, ~4 min at load 9
STOP_S = 40  # seconds for the whole process tree to go after SIGTERM (measured ~25 s with a training run)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the UI exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the UI did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (the launcher, dagster dev, webserver, daemon, code server, runs)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (is_running also guards against a recycled pid); zombies count as gone."""
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def in_folder(root: Path) -> list[psutil.Process]:
    """Processes working in the project copy: catches a worker started after the last snapshot of the tree."""
    found = []
    for p in psutil.process_iter():
        try:
            if Path(p.cwd()).is_relative_to(root) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            pass
    return found


def kill_leftovers(processes: list[psutil.Process]) -> None:
    """Teardown after a failed assertion: only the processes this test started, by pid."""
    for p in alive(processes):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def dismiss_community_popup(page) -> None:
    """A fresh instance greets the first visitor with 'Join the Dagster community'; Skip it if it comes."""
    skip = page.get_by_role("button", name="Skip", exact=True)
    try:
        skip.wait_for(state="visible", timeout=10_000)
    except Exception:  # playwright's TimeoutError: the instance has already shown it
        return
    skip.click()
    skip.wait_for(state="hidden", timeout=10_000)


def wait_for_run(page, url: str, run_id: str) -> str:
    """Open the run from the Runs list and wait for its final status (the page updates live); returns it."""
    page.goto(f"{url}/runs", wait_until="domcontentloaded")
    page.get_by_role("link", name=f"run {run_id}").click()
    final = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        try:
            final.wait_for(timeout=30_000)
            return final.inner_text()
        except Exception:  # playwright's TimeoutError: still running; reload in case a live update was missed
            page.reload(wait_until="domcontentloaded")
    raise AssertionError(f"run {run_id} did not finish within {RUN_S} s")


@pytest.fixture
def ui_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the repository with the tiny model and 60 distinct tickets (the UI is under test, not scale)."""
    return copy_repo_with_tickets(tmp_path, tiny_overrides(tiny_model_dir))


@pytest.mark.timeout(RUN_S + SERVER_START_S + 180)
def test_materialise_data_assets_from_the_browser_then_stop_cleanly(ui_project: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    root = ui_project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    env = {**os.environ, "DAGSTER_HOME": str(root / ".dagster_home"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PIPELINES_PARAMS", None)
    # cwd = the copy, so `-m resources.ui` (and through it workspace.yaml, params.yaml, data/) are the copy's.
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "resources.ui", "--port", str(port)], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        wait_until_serving(url, proc, log)
        started = tree(proc.pid)
        screenshot = tmp_path / "ui_screenshot.png"
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                tmp_path / "chromium-profile", executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 1000},
            )
            page = browser.new_page()
            page.set_default_timeout(30_000)

            page.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
            dismiss_community_popup(page)
            # The asset selection box is a CodeMirror editor; its textarea carries the accessible name.
            search = page.get_by_label("Search and filter assets")
            search.focus()
            page.keyboard.type(SELECTION)
            page.keyboard.press("Enter")
            materialize = page.get_by_role("button", name=re.compile(r"Materialize all \(5\)"))
            expect(materialize).to_be_enabled()
            materialize.click()
            launched = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
            run_id = re.search(r"[0-9a-f]{8}", launched.inner_text()).group(0)

            status = wait_for_run(page, url, run_id)
            assert status == "Success", f"run {run_id}: {status}\n{log.read_text()[-5000:]}"
            # 5 asset steps (base_model, raw_examples, cleaned, formatted, splits) + 9 check steps
            expect(page.get_by_text("Succeeded (14)")).to_be_visible()
            expect(page.get_by_text("Errored (0)")).to_be_visible()

            splits = root / "data" / "splits"
            counts = {name: lines(splits / f"{name}.jsonl") for name in ("train", "validation", "test")}
            page.goto(f"{url}/assets/dataset_splits", wait_until="domcontentloaded")
            expect(page.get_by_text("Row count", exact=True)).to_be_visible()
            expect(page.get_by_text(f"{sum(counts.values()):,}", exact=True).first).to_be_visible()
            for name, n in counts.items():
                row = page.get_by_role("row").filter(has=page.get_by_text(f"rows_{name}", exact=True))
                expect(row).to_contain_text(str(n))  # rows_train, not rows_train_natural or rows_train_replay
            expect(page.get_by_role("row").filter(has_text="path/train")).to_contain_text(str(splits / "train.jsonl"))
            page.screenshot(path=str(screenshot), full_page=False)
            row_count = re.compile(r"Row count\s+" + re.escape(f"{sum(counts.values()):,}"))
            expect(page.locator("body")).to_contain_text(row_count, use_inner_text=True)
            asset_text = page.inner_text("body")

            page.goto(f"{url}/assets/dataset_splits?view=checks", wait_until="domcontentloaded")
            expect(page.get_by_text("Checks (3)")).to_be_visible()
            # The first check (no_leakage) opens on the right with its latest evaluation and evidence.
            expect(page.get_by_text("Passed", exact=True)).to_be_visible()
            expect(page.get_by_role("row").filter(has_text="near_duplicate_pairs_across_splits")).to_contain_text("0")
            body = page.locator("body")
            for check in ("no_leakage", "non_empty", "schema"):  # the check list: name, then its latest status
                # The list fills in after the first check's panel (CI once read the page before it had), so wait.
                expect(body).to_contain_text(re.compile(rf"\b{check}\s+(?:{check}\s+)?Succeeded"), use_inner_text=True)
            checks_text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "ui_checks.png"))
            browser.close()

        assert row_count.search(asset_text), asset_text[:2000]
        for check in ("no_leakage", "non_empty", "schema"):  # the check list: name, then its latest status
            assert re.search(rf"\b{check}\s+(?:{check}\s+)?Succeeded", checks_text), checks_text[:2000]
        assert "blocking" in checks_text
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)
        assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank PNG

        started = tree(proc.pid)  # now including the run workers the sensor or the click started
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_S)  # the launcher itself returns once dagster dev and its group are gone
        while alive(started) and time.monotonic() - t0 < STOP_S:
            time.sleep(0.5)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive(started) + in_folder(root)]
        assert not left, f"still running {time.monotonic() - t0:.0f} s after SIGTERM: {left}"
        print(f"UI and all its processes gone {time.monotonic() - t0:.1f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers((started or tree(proc.pid)) + in_folder(root))
