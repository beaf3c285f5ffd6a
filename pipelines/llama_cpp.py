"""llama.cpp, built once per machine from the source the `llama-cpp-python` sdist vendors.

    python -m pipelines.llama_cpp            # build (or find) it; prints the folder; `make setup` runs this
    python -m pipelines.llama_cpp --where    # print the folder only if it is already built (exit 2 if not)

There are no prebuilt llama.cpp binaries on the registries this project reaches, so the set-up downloads the
source distribution of `llama-cpp-python` (version pinned in constraints.txt) with pip, and builds only the two
programs the export end uses from its `vendor/llama.cpp/` with cmake (ninja when present): `llama-server`
(the GGUF check and `python -m pipelines serve`) and `llama-quantize`. Tests, examples, the unified app, the web
UI (it would be downloaded) and HTTPS are off. Beside the binaries it keeps llama.cpp's own converters
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`) with the `conversion/` and `gguf-py/` folders they import:
they insert `gguf-py/` at the front of sys.path, so they run with the gguf they were written for, not the PyPI
gguf this project installs for transformers.

The build lives outside the clone, in `$FINETUNE_FACTORY_CACHE` (default `${XDG_CACHE_HOME:-~/.cache}/
finetune-factory`), in `llama.cpp-<version>-<hash of the build flags>/`, so every clone on the machine reuses it.
It is assembled in a temporary sibling and renamed into place, with BUILD.json written last: a folder with
BUILD.json is complete. A lock file makes concurrent set-ups wait for one build instead of building twice.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserError, exit_code

PACKAGE = "llama-cpp-python"
PROGRAMS = ("llama-server", "llama-quantize")
SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
SCRIPT_DIRS = ("gguf-py", "conversion")  # imported by the scripts from their own folder
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# Static binaries (no shared libraries to find at run time), native CPU code (the cache is per machine),
# nothing that needs the network (the UI bundle, HTTPS) and nothing the export end does not run.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
)


class LlamaCppMissing(UserError, RuntimeError):
    """llama.cpp is not built on this machine (an environment problem, a UserError): the message says which command
    builds it."""


@dataclass(frozen=True)
class LlamaCpp:
    """A complete build: the folder, its programs and its converter scripts."""

    root: Path

    def program(self, name: str) -> Path:
        return self.root / "bin" / name

    def script(self, name: str) -> Path:
        return self.root / name

    @property
    def server(self) -> Path:
        return self.program("llama-server")

    @property
    def quantize(self) -> Path:
        return self.program("llama-quantize")

    @property
    def convert_hf(self) -> Path:
        return self.script("convert_hf_to_gguf.py")

    @property
    def convert_lora(self) -> Path:
        return self.script("convert_lora_to_gguf.py")

    def info(self) -> dict:
        return json.loads((self.root / "BUILD.json").read_text(encoding="utf-8"))


def pinned_version(constraints: Path = CONSTRAINTS) -> str:
    """The `llama-cpp-python==X` pin of constraints.txt (the one place the version is written)."""
    pattern = re.compile(r"^\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s#;]+)", re.IGNORECASE)
    for line in constraints.read_text(encoding="utf-8").splitlines():
        if match := pattern.match(line):
            return match.group(1)
    raise LlamaCppMissing(f"'{constraints}' pins no {PACKAGE} version; add a line '{PACKAGE}==X.Y.Z'")


def cache_root() -> Path:
    explicit = os.environ.get("FINETUNE_FACTORY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "finetune-factory"


def build_key(version: str, flags: tuple[str, ...] = CMAKE_FLAGS) -> str:
    """`llama.cpp-<version>-<8 hex>`: the hash covers the flags, the programs and the machine, so changing any of
    them builds a new folder instead of reusing a stale one."""
    what = json.dumps([version, list(flags), list(PROGRAMS), platform.machine(), platform.system()])
    return f"llama.cpp-{version}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def build_dir(version: str | None = None) -> Path:
    return cache_root() / build_key(version or pinned_version())


def _complete(folder: Path) -> bool:
    return ((folder / "BUILD.json").is_file() and all(os.access(folder / "bin" / p, os.X_OK) for p in PROGRAMS)
            and all((folder / s).is_file() for s in SCRIPTS))


def find() -> LlamaCpp:
    """The build for the pinned version; LlamaCppMissing (one sentence) if this machine has none yet."""
    folder = build_dir()
    if not _complete(folder):
        raise LlamaCppMissing(f"llama.cpp is not built on this machine (expected '{folder}'); run `make setup` "
                              "or `python -m pipelines.llama_cpp` (about 5-10 minutes on 2 cores, once)")
    return LlamaCpp(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


def _download_sdist(version: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"{PACKAGE}=={version}", "-d", str(into)], check=True)
    found = sorted(into.glob("*.tar.gz"))
    if not found:
        raise LlamaCppMissing(f"pip downloaded no source distribution of {PACKAGE}=={version} into '{into}'")
    return found[0]


def _extract_vendor(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in f"/{m.name}"]
        tar.extractall(into, members=members, filter="data")
    sources = list(into.glob("*/vendor/llama.cpp"))
    if len(sources) != 1 or not (sources[0] / "CMakeLists.txt").is_file():
        raise LlamaCppMissing(f"'{sdist.name}' has no vendor/llama.cpp/CMakeLists.txt; pin another {PACKAGE}")
    return sources[0]


def build(jobs: int | None = None, *, sdist: Path | None = None, log=print) -> LlamaCpp:
    """Build llama.cpp for the pinned version unless this machine has it; returns the build.

    jobs: parallel compile jobs (default $LLAMA_CPP_BUILD_JOBS or 2, the cores CI has). sdist: a local
    llama-cpp-python source distribution instead of downloading it (it must be the pinned version).
    """
    version = pinned_version()
    folder = build_dir(version)
    if _complete(folder):
        return LlamaCpp(folder)
    jobs = jobs or int(os.environ.get("LLAMA_CPP_BUILD_JOBS", "2"))
    with _locked(folder.with_name(folder.name + ".lock")):
        if _complete(folder):  # another set-up finished it while we waited
            return LlamaCpp(folder)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
            work = Path(tmp)
            if sdist is None:
                log(f"downloading the {PACKAGE}=={version} source distribution")
                sdist = _download_sdist(version, work / "sdist")
            source = _extract_vendor(sdist, work / "src")
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            log(f"building {', '.join(PROGRAMS)} from {sdist.name} with {jobs} jobs (once per machine)")
            subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), *generator, *CMAKE_FLAGS],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cmake", "--build", str(work / "build"), "--target", *PROGRAMS, "-j", str(jobs)],
                           check=True)
            stage = work / "out"
            (stage / "bin").mkdir(parents=True)
            for program in PROGRAMS:
                shutil.copy2(work / "build" / "bin" / program, stage / "bin" / program)
            for script in SCRIPTS:
                shutil.copy2(source / script, stage / script)
            for sub in SCRIPT_DIRS:
                if (source / sub).is_dir():
                    shutil.copytree(source / sub, stage / sub, ignore=shutil.ignore_patterns("tests", "__pycache__"))
            shutil.copy2(source / "LICENSE", stage / "LICENSE")
            seconds = round(time.monotonic() - start, 1)
            (stage / "BUILD.json").write_text(json.dumps({
                "package": PACKAGE, "version": version, "sdist": sdist.name, "cmake_flags": list(CMAKE_FLAGS),
                "programs": list(PROGRAMS), "jobs": jobs, "build_seconds": seconds,
                "machine": platform.machine(), "compiler": _compiler(),
            }, indent=2) + "\n")
            if folder.exists():  # an incomplete leftover (no BUILD.json): replace it
                shutil.rmtree(folder)
            os.replace(stage, folder)
        log(f"llama.cpp {version} built in {seconds:.0f} s: {folder}")
    return LlamaCpp(folder)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick; another process may take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: the kernel sends SIGTERM to the server when the process that started it dies, even by SIGKILL,
    so a killed stage, test or `serve` never leaves an orphan server holding the port and the memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServerError(RuntimeError):
    """llama-server did not start or stopped answering; the message carries the end of its log."""


class LlamaServer:
    """llama-server as a child process on 127.0.0.1: started, waited for (GET /health), stopped by SIGTERM.

        with LlamaServer(llama.server, ["-m", "model.gguf", "--parallel", "1"]) as server:
            server.post("/completion", {"prompt": "Hi", "n_predict": 8, "temperature": 0})

    `args` are llama-server's own flags (tools/server/README.md of the vendored source); host and port are
    added here: loopback only, and a free port unless one is given. Its log goes to `log_path` (or a temporary
    file) and the last lines are quoted when it fails; `inherit_output` lets it write to this process's stdout
    and stderr instead. Stop sends SIGTERM and waits `stop_timeout_s` for the server to finish its requests and
    exit, then SIGKILL. Any server with `--host`, `--port` and GET /health (vLLM's `vllm serve`) runs the same way.
    """

    def __init__(self, program: Path, args: list[str], *, port: int | None = None, host: str = "127.0.0.1",
                 start_timeout_s: float = 120.0, stop_timeout_s: float = 10.0, log_path: Path | None = None,
                 inherit_output: bool = False):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"llama-server is only started on a loopback address, not {host!r}")
        self.program, self.args, self.host = Path(program), list(args), host
        self.port = port or free_port(host)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self._log_path, self._inherit = log_path, inherit_output
        self._log: Any = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [str(self.program), *self.args, "--host", self.host, "--port", str(self.port)]

    def log_tail(self, lines: int = 15) -> str:
        if self._log is None:
            return "(its log went to this process's output)"
        self._log.flush()
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> LlamaServer:
        if not self._inherit:  # closed in stop()
            self._log = (open(self._log_path, "w", encoding="utf-8") if self._log_path  # noqa: SIM115
                         else tempfile.NamedTemporaryFile("w+", prefix="llama-server.", suffix=".log", delete=False))
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT if self._log else None, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServerError(f"llama-server exited with status {self.process.returncode} while starting:\n{tail}")
            if self.healthy():
                return self
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"llama-server did not answer /health within {self.start_timeout_s:g} s:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after stop_timeout_s; returns the exit status."""
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            status = self.process.returncode
        if self._log is not None:
            self._log.close()
            if self._log_path is None:
                Path(self._log.name).unlink(missing_ok=True)
            self._log = None
        return status

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        """GET /health answers 200: llama-server says {"status": "ok"} (503 while loading), vLLM an empty body."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                body = response.read()
        except OSError:  # not listening yet, or 503 while loading the model
            return False
        return not body.strip() or json.loads(body).get("status") == "ok"

    def get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 300) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())


def _compiler() -> str:
    try:
        out = subprocess.run(["c++", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.llama_cpp", description=__doc__.split("\n")[0])
    parser.add_argument("--where", action="store_true", help="print the build folder if it exists; never build")
    parser.add_argument("--jobs", type=int, default=None, help="compile jobs (default: $LLAMA_CPP_BUILD_JOBS or 2)")
    parser.add_argument("--sdist", type=Path, default=None, help="a local llama-cpp-python sdist (pinned version)")
    args = parser.parse_args(argv)
    try:
        found = find() if args.where else build(args.jobs, sdist=args.sdist)
    except LlamaCppMissing as exc:
        return exit_code(exc)
    print(found.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
