"""Serve the fine-tuned model over an OpenAI-compatible HTTP API on 127.0.0.1, on an existing engine.

    python -m pipelines serve                                  # llama-server with the export-gguf stage's GGUF
    python -m pipelines serve --gguf f16 --parallel 8          # that file, 8 requests decoded together
    python -m pipelines serve --adapters promoted,data/adapter # the base GGUF + each adapter as a GGUF LoRA
    python -m pipelines serve --engine vllm                    # vLLM (CUDA): the merged folder, or --adapters
    python -m pipelines serve --dry-run                        # print the command, start nothing (it still makes
                                                               # and caches the GGUF files --adapters needs)

Then any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
    client.chat.completions.create(model="fine-tuned", messages=[{"role": "user", "content": "..."}])

Engines (`--engine auto` picks vLLM when it is installed and CUDA is visible, llama.cpp otherwise):

- llama.cpp: the `llama-server` built by `make setup` (pipelines.llama_cpp), continuous batching over
  `--parallel` slots. Without --adapters it serves the merged model's GGUF (paths.gguf; the quantised file
  when there is one, or `--gguf f16|bf16|Q8_0|...|FILE`) under the name `fine-tuned`. With --adapters it serves the
  base model converted once to an f16 GGUF and every adapter converted by llama.cpp's convert_lora_to_gguf.py
  (both cached under the llama.cpp cache folder, keyed by content hash), each loaded at scale 0
  (`--lora-scaled FILE:0`): one base in memory, a request without a `lora` field gets the base model, and a
  request picks its adapter with llama.cpp's `lora` field, e.g. `extra_body={"lora": [{"id": 0, "scale": 1.0}]}`
  (ids in the order given). Prompt caching is off in this mode (`--no-cache-prompt`): llama-server keeps a slot's
  cached prompt when a request without a `lora` field switches the slot back to the default adapters
  (tools/server/server-context.cpp, launch_slot_with_task), so the base model would continue from a prompt
  computed with the adapter. `--lora-init-without-apply` does not help: it leaves the default scales at 1.
- vLLM: `vllm serve` with the merged folder, or with the base folder plus `--enable-lora --lora-modules
  name=folder ...`, where a request picks an adapter by its `model` name.

llama-server renders the chat template stored in the GGUF (the model's own, copied by the converter) with
its Jinja engine and tokenizes the result with special tokens parsed, so text such as "<|im_end|>" inside a
message becomes the control token, not the characters (tools/server/server-common.cpp tokenize_input_prompts).

SIGTERM or Ctrl-C stops the server: SIGTERM to the engine, up to 10 s to finish, then SIGKILL; exit status 0.
The engine also gets SIGTERM from the kernel if this process dies without cleaning up (Linux PDEATHSIG).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pipelines import llama_cpp
from pipelines.config import Params, load_params
from pipelines.errors import run_command
from pipelines.io import StageError, atomic_path, sha256_tree

MERGED_NAME = "fine-tuned"  # the served model's name (OpenAI `model`) for the merged model
BASE_NAME = "base"
# vLLM allocates LoRA buffers for a fixed set of ranks (vllm/config/lora.py); an adapter's r is rounded up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ServePlan:
    """What `serve` starts: the engine's command (host and port added by the runner) and what it serves."""

    engine: str  # "llama.cpp" or "vllm"
    program: Path
    args: list[str]
    models: list[str]  # OpenAI `model` names a client may send
    lora_ids: dict[str, int] = field(default_factory=dict)  # llama.cpp: adapter name -> id in the `lora` field

    def describe(self, url: str) -> str:
        lines = [f"{self.engine} on {url}/v1, models: {', '.join(self.models)}"]
        for name, i in self.lora_ids.items():
            lines.append(f"  adapter {name}: extra_body={{\"lora\": [{{\"id\": {i}, \"scale\": 1.0}}]}}")
        return "\n".join(lines)


def choose_engine(requested: str) -> str:
    """auto: vLLM when the package is importable and CUDA is visible, else llama.cpp."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("vllm") is None:
        return "llama.cpp"
    import torch

    return "vllm" if torch.cuda.is_available() else "llama.cpp"


def adapter_folders(params: Params, names: list[str]) -> list[tuple[str, Path]]:
    """(served name, folder) per --adapters entry: promoted, adapter (paths.*) or a peft adapter folder."""
    from pipelines.terminal_chat import NONE, resolve_adapter

    out: list[tuple[str, Path]] = []
    for name in names:
        served, folder = resolve_adapter(params, name)
        if served == NONE or folder is None:
            raise StageError("--adapters lists adapters to serve beside the base model, which is always served; "
                             "drop 'none' from it")
        if served in (s for s, _ in out):
            raise StageError(f"--adapters names '{served}' twice; give each adapter folder a distinct name")
        out.append((served, folder))
    return out


def merged_gguf(params: Params, which: str | None) -> Path:
    """The export-gguf stage's file: `which` = a type (f16, Q8_0, ...) or a .gguf path; None: quantised if any."""
    folder = params.path("gguf")
    if which and which.endswith(".gguf"):
        path = Path(which).expanduser()
    elif which:
        path = folder / f"model-{which}.gguf"
    else:
        cfg = params.export
        quant = folder / f"model-{cfg.quant_type}.gguf" if cfg.quant_type else None
        path = quant if quant and quant.is_file() else folder / f"model-{cfg.float_type}.gguf"
    if not path.is_file():
        present = ", ".join(p.name for p in sorted(folder.glob("*.gguf"))) or "none yet"
        raise StageError(f"GGUF file '{path}' does not exist; run `python -m pipelines export-gguf` first (or pass "
                         f"--gguf with one of the files there: {present})")
    return path


def _cached_conversion(kind: str, source: Path, make: Callable[[Path], object]) -> Path:
    """cache_root()/gguf/<kind>-<content hash>.gguf, made once by `make(out_path)` (atomic rename)."""
    key = sha256_tree(source)[:16]
    out = llama_cpp.cache_root() / "gguf" / f"{kind}-{key}-f16.gguf"
    if not out.is_file():
        with atomic_path(out, suffix=".gguf") as tmp:
            make(tmp)
    return out


def base_gguf(llama: llama_cpp.LlamaCpp, base_dir: Path) -> Path:
    """The base model as an f16 GGUF (llama.cpp's convert_hf_to_gguf.py), converted once per content hash."""
    from pipelines.gguf_model import convert

    return _cached_conversion("base", base_dir, lambda tmp: convert(llama, base_dir, tmp, "f16"))


def lora_gguf(llama: llama_cpp.LlamaCpp, base_dir: Path, adapter_dir: Path) -> Path:
    """A peft LoRA adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py --base), once per content hash."""
    def make(tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        done = subprocess.run([sys.executable, str(llama.convert_lora), "--base", str(base_dir), "--outtype", "f16",
                               "--outfile", str(tmp), str(adapter_dir)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise StageError(f"llama.cpp's convert_lora_to_gguf.py could not convert '{adapter_dir}' "
                             f"({lines[-1] if lines else f'exit {done.returncode}'}); llama.cpp takes plain LoRA "
                             "adapters (not DoRA); serve the merged model instead (python -m pipelines serve)")

    return _cached_conversion(f"lora-{adapter_dir.name}", adapter_dir, make)


def llama_cpp_plan(params: Params, *, gguf: str | None, adapters: list[str], parallel: int, ctx_per_slot: int,
                   threads: int | None) -> ServePlan:
    """llama-server's command line (tools/server/README.md of the vendored source)."""
    from pipelines.gguf_model import find_llama_cpp

    llama = find_llama_cpp()
    common = ["--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot), "--no-webui", "--jinja"]
    if threads:
        common += ["--threads", str(threads)]
    if not adapters:
        model = merged_gguf(params, gguf)
        return ServePlan("llama.cpp", llama.server, ["-m", str(model), "--alias", MERGED_NAME, *common], [MERGED_NAME])
    base_dir = params.path("base_model")
    if not base_dir.exists():
        raise StageError(f"base model folder '{base_dir}' is missing; run `python -m pipelines fetch-model` first")
    folders = adapter_folders(params, adapters)
    args = ["-m", str(base_gguf(llama, base_dir)), "--alias", BASE_NAME, *common, "--no-cache-prompt"]
    for _, folder in folders:
        args += ["--lora-scaled", f"{lora_gguf(llama, base_dir, folder)}:0"]
    return ServePlan("llama.cpp", llama.server, args, [BASE_NAME], {name: i for i, (name, _) in enumerate(folders)})


def _vllm_rank(folders: list[tuple[str, Path]]) -> int:
    rank = max(json.loads((f / "adapter_config.json").read_text())["r"] for _, f in folders)
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def vllm_plan(params: Params, *, adapters: list[str], parallel: int, program: Path | None = None) -> ServePlan:
    """`vllm serve` (docs.vllm.ai: OpenAI-compatible server, LoRA adapters): the merged folder, or the base
    folder with --enable-lora --lora-modules name=folder (a request's `model` picks the adapter)."""
    exe = program or Path(shutil.which("vllm") or Path(sys.executable).with_name("vllm"))
    common = ["--max-num-seqs", str(parallel), "--generation-config", "auto"]
    if params.model.trust_remote_code:
        common.append("--trust-remote-code")
    if not adapters:
        merged = params.path("merged")
        if not merged.exists():
            raise StageError(f"merged model folder '{merged}' is missing; run `python -m pipelines merge` first")
        return ServePlan("vllm", exe, ["serve", str(merged), "--served-model-name", MERGED_NAME, *common],
                         [MERGED_NAME])
    folders = adapter_folders(params, adapters)
    modules = [f"{name}={folder}" for name, folder in folders]
    args = ["serve", str(params.path("base_model")), "--served-model-name", BASE_NAME, *common, "--enable-lora",
            "--lora-modules", *modules, "--max-loras", str(len(folders)), "--max-lora-rank", str(_vllm_rank(folders))]
    return ServePlan("vllm", exe, args, [BASE_NAME, *(name for name, _ in folders)])


def plan(params: Params, args: argparse.Namespace) -> ServePlan:
    adapters = [a.strip() for a in (args.adapters or "").split(",") if a.strip()]
    engine = choose_engine(args.engine)
    if engine == "vllm":
        return vllm_plan(params, adapters=adapters, parallel=args.parallel)
    return llama_cpp_plan(params, gguf=args.gguf, adapters=adapters, parallel=args.parallel,
                          ctx_per_slot=args.ctx_per_slot, threads=args.threads)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines serve", description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--engine", choices=["auto", "llama.cpp", "vllm"], default="auto",
                   help="auto: vLLM with CUDA, else llama.cpp")
    p.add_argument("--gguf", default=None, help="llama.cpp: f16, bf16, Q8_0, ... or a .gguf file (default: the "
                   "quantised file of export-gguf, else its float file)")
    p.add_argument("--adapters", default=None, help="comma-separated adapters to serve on the base model instead "
                   "of the merged one: promoted, adapter, or peft folders")
    p.add_argument("--port", type=int, default=8080, help="TCP port on 127.0.0.1 (default 8080; 0: a free one)")
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (llama.cpp slots, vLLM "
                   "max-num-seqs)")
    p.add_argument("--ctx-per-slot", type=int, default=2048, help="llama.cpp: context tokens per slot (prompt + "
                   "answer); the KV cache holds parallel x this")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp: CPU threads (default: llama-server's)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit (the GGUF conversions that "
                   "--adapters needs are still made and cached)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines serve [...]`; a user error (no GGUF, no build, a bad adapter) exits 2 in one sentence."""
    return run_command(command, parser().parse_args(argv), load_params)


def command(args: argparse.Namespace, params: Params) -> int:
    """`python -m pipelines serve`: start the engine, say where it listens, stop it on SIGTERM or Ctrl-C."""
    the_plan = plan(params, args)
    server = llama_cpp.LlamaServer(the_plan.program, the_plan.args, port=args.port or None, inherit_output=True,
                                   start_timeout_s=600 if the_plan.engine == "vllm" else 120)
    if args.dry_run:
        print(" ".join(server.command))
        return 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)  # unwinds to the finally below, which stops the engine

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(the_plan.describe(server.url), flush=True)
        print("SIGTERM or Ctrl-C stops it.", flush=True)
        while (status := server.process.poll()) is None:
            time.sleep(0.2)
        raise StageError(f"{the_plan.engine} stopped by itself with status {status}; its log is above")
    except llama_cpp.ServerError as exc:
        raise StageError(f"{the_plan.engine} did not start: {exc}") from None
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
