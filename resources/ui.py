"""Start the Dagster UI for this project, on this machine only.

    python -m resources.ui                 # http://127.0.0.1:3000  (make ui)
    python -m resources.ui --port 3001     # any other `dagster dev` option is passed through

Sets DAGSTER_HOME=<project>/.dagster_home (run history survives restarts; resources/dagster.yaml is copied
there on first use) and binds the webserver to 127.0.0.1: the UI can launch training and wipe history,
so it is not published to the network.

Stopping: Ctrl-C or SIGTERM (or SIGHUP, a closed terminal) stop everything the UI started. `dagster dev`
runs in its own process group; the signal is forwarded to it as SIGINT (its shutdown path stops the
webserver and daemon). Its code server and any run still executing would otherwise linger on their own
(up to a heartbeat timeout, or to the end of a training run), so whatever is left of the group then gets
SIGTERM (a run worker marks its run as failed) and, after GRACE_S, SIGKILL. No orphans either way.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
GRACE_S = 20.0  # seconds the leftovers of the group get between SIGTERM and SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def dagster_home(project: Path = PROJECT) -> Path:
    """<project>/.dagster_home with the instance config in place (an existing one is left as the user made it)."""
    home = project / ".dagster_home"
    home.mkdir(exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copyfile(project / "resources" / "dagster.yaml", config)
    return home


def command(argv: list[str]) -> list[str]:
    """`dagster dev` on the project's workspace; the caller's options come last and so take precedence."""
    return [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT / "workspace.yaml"), "--host", HOST, *argv]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    return True


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM every process left in the group, then SIGKILL whatever is still there after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home())}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    children: list[subprocess.Popen] = []
    interrupted: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)  # dagster dev shuts down on KeyboardInterrupt

    # Handlers go in before the child starts: an inherited SIG_IGN (a shell's background job) would
    # otherwise pass to dagster dev and make it deaf to Ctrl-C. An ignored SIGHUP (nohup) stays ignored.
    for sig in STOP_SIGNALS:
        if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN):
            signal.signal(sig, forward)
    # Own session: a terminal's Ctrl-C reaches only this process, which forwards it once, in order.
    # cwd = the project, so params.yaml and data/ resolve there.
    proc = subprocess.Popen(command(sys.argv[1:] if argv is None else argv), env=env, cwd=PROJECT,
                            start_new_session=True)
    children.append(proc)
    if interrupted:  # a signal that arrived while the child was starting
        forward(interrupted[0], None)
    try:
        return proc.wait()
    finally:
        stop_group(proc.pid)


if __name__ == "__main__":
    sys.exit(main())
