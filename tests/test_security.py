"""Security rules, checked on the source and on behaviour.

- No `trust_remote_code=True` written in the code: it comes from params.model.trust_remote_code only.
- Model weights load from safetensors only: every from_pretrained of a model passes use_safetensors=True
  (or reads a GGUF file, or checks for the .safetensors file first, as peft then loads only that).
- Secrets come from the environment and never reach an output, a log line or params.yaml: not the stage outputs,
  nor what DVC (dvc.lock, .dvc/tmp, experiment commits), Dagster (.dagster_home), TensorBoard or the accelerate
  launcher write, nor the hub cache; HF_TOKEN goes only to the hub endpoint.
- The Dagster UI binds to the loopback interface.
"""

from __future__ import annotations

import ast
import hashlib
import http.server
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, Params, load_params
from tests.conftest import REPO, tiny_overrides, write_project

CODE_FOLDERS = ("pipelines", "resources", "assets")
# Calls that load model weights (tokenizers and configs hold no pickles and are not listed).
_WEIGHT_LOADERS = re.compile(r"(Model|ForCausalLM|ForSequenceClassification|PeftModel)\w*$")
_SAFE_KWARGS = re.compile(r"""(use_safetensors\s*=\s*True|["']use_safetensors["']\s*:\s*True)""")


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).glob("*.py"))


def _calls(tree: ast.AST) -> list[tuple[ast.Call, ast.AST | None]]:
    """Every call with the function (or module) that encloses it."""
    found: list[tuple[ast.Call, ast.AST | None]] = []

    def visit(node: ast.AST, scope: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Call):
                found.append((child, scope))
            visit(child, inner)

    visit(tree, None)
    return found


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_trust_remote_code_is_never_hard_coded_true(folder):
    offenders = []
    for path in _sources(folder):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, _ in _calls(tree):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
        for node in ast.walk(tree):  # {"trust_remote_code": True} handed over as **kwargs
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and \
                            isinstance(value, ast.Constant) and value.value is True:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"trust_remote_code=True hard-coded at {offenders}; use params.model.trust_remote_code"


def _weight_load_problems(path: Path, root: Path = REPO) -> list[str]:
    source = path.read_text(encoding="utf-8")
    problems = []
    for call, scope in _calls(ast.parse(source)):
        func = call.func
        if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
            continue
        owner = ast.unparse(func.value)
        if not _WEIGHT_LOADERS.search(owner):
            continue
        keywords = {kw.arg: kw.value for kw in call.keywords}
        if "gguf_file" in keywords:  # GGUF is a tensor container, not a pickle
            continue
        value = keywords.get("use_safetensors")
        if isinstance(value, ast.Constant) and value.value is True:
            continue
        scope_source = ast.get_source_segment(source, scope) if scope is not None else source
        if None in keywords and _SAFE_KWARGS.search(scope_source or ""):  # **kwargs built with use_safetensors
            continue
        if owner == "PeftModel" and re.search(r"\.safetensors|safetensors_adapter\(", scope_source or ""):
            continue  # the adapter file is checked to exist first; peft then loads it and nothing else
        problems.append(f"{path.relative_to(root)}:{call.lineno} {owner}.from_pretrained")
    return problems


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_model_weights_load_from_safetensors_only(folder):
    problems = [p for path in _sources(folder) for p in _weight_load_problems(path)]
    assert not problems, f"weights may load from pickle files (pass use_safetensors=True): {problems}"


def test_the_weight_load_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from transformers import AutoModelForCausalLM\n"
                   "def load(folder):\n    return AutoModelForCausalLM.from_pretrained(folder)\n"
                   "def ok(folder):\n    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)\n")
    assert _weight_load_problems(bad, tmp_path) == ["bad.py:3 AutoModelForCausalLM.from_pretrained"]


# -------------------------------------------------------------------------------------------------- secrets

SECRETS = {
    "HF_TOKEN": "hf_SENTINELtokenAAAA1111",
    "HUGGING_FACE_HUB_TOKEN": "hf_SENTINELhubBBBB2222",
    "WANDB_API_KEY": "SENTINELwandbCCCC3333",
    "AWS_ACCESS_KEY_ID": "AKIASENTINELDDDD4444",
    "AWS_SECRET_ACCESS_KEY": "SENTINELawsSecretEEEE5555",
    "AWS_SESSION_TOKEN": "SENTINELawsSessionFFFF6666",
}


def _leaks(files: dict[str, bytes], logs: dict[str, str]) -> list[str]:
    """'NAME in file/log' for every planted secret found in a file (any format, binary files and pickles included,
    byte for byte), a file name, or a log."""
    found = []
    for name, secret in SECRETS.items():
        found += [f"{name} in {path}" for path, data in files.items() if secret.encode() in data or secret in path]
        found += [f"{name} in the log of {what}" for what, log in logs.items() if secret in log]
    return found


def _tree(root: Path, skip: dict[str, str] | None = None) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), except those whose sha256 `skip` records unchanged."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            name, data = path.relative_to(root).as_posix(), path.read_bytes()
            if (skip or {}).get(name) != hashlib.sha256(data).hexdigest():
                files[name] = data
    return files


def _experiment_files(root: Path, env: dict[str, str], skip: dict[str, str]) -> dict[str, bytes]:
    """The files of every commit under refs/exps (DVC experiments; git stores them compressed, so read them),
    except those equal to the copied sources recorded in `skip`."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, check=True).stdout

    files = {}
    for commit in git("for-each-ref", "--format=%(objectname)", "refs/exps").decode().split():
        for path in git("ls-tree", "-r", "--name-only", commit).decode().splitlines():
            data = git("show", f"{commit}:{path}")
            if skip.get(path) != hashlib.sha256(data).hexdigest():
                files[f"refs/exps@{commit[:8]}:{path}"] = data
        files[f"refs/exps@{commit[:8]} (commit)"] = git("cat-file", "-p", commit)
    return files


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """A Hugging Face endpoint on the loopback that refuses every token: records the Authorization headers."""

    seen: list[str] = []

    def _refuse(self) -> None:
        type(self).seen.append(f"{self.command} {self.path} {self.headers.get('Authorization')}")
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b'{"error": "Invalid credentials in Authorization header"}')

    do_GET = do_HEAD = do_POST = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, tiny_model_dir) -> dict:
    """The lifecycle with credentials in the environment, the way a team runs it, once for the tests below:

    - `check-params`, then `dvc exp run evaluate` on a git + DVC copy of the repository: fetch-model to evaluate as
      DVC runs them, the train stage through the `accelerate` launcher (2 processes), with TensorBoard logging on;
      this writes dvc.lock, .dvc/tmp, .dvc/cache and an experiment ref;
    - `dagster asset materialize` of raw_examples with DAGSTER_HOME in the project (.dagster_home: runs, event
      logs, compute logs);
    - fetch-model with `model.source: hub` (the only path that sends HF_TOKEN) against a fake hub on the loopback
      that refuses the token: no network, one sentence, and the token went only into the Authorization header.
    MLflow is not installed here, so its run folders cannot be made; `train.report_to: mlflow` is refused by
    check-params (pipelines.preflight) until it is.
    """
    from tests.test_dvc import copy_repo, dvc_executable

    base = tmp_path_factory.mktemp("secrets")
    root = copy_repo(base / "project")
    sources = {name: hashlib.sha256(data).hexdigest() for name, data in _tree(root).items()}  # they quote the secrets
    overrides = tiny_overrides(tiny_model_dir)
    overrides["train"].update({"max_steps": 2, "eval_steps": 1, "save_steps": 1, "report_to": "tensorboard"})
    overrides["evaluate"].update({"max_examples": 4, "max_new_tokens": 4})
    params = write_project(root, overrides)
    hub = yaml.safe_load(params.read_text())
    hub["model"] = {"source": "hub", "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hub_timeout_s": 10}
    hub["paths"]["base_model"] = "data/hub_model"
    (root / "params_hub.yaml").write_text(yaml.safe_dump(hub, sort_keys=False))
    home = root / ".dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "resources" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **SECRETS, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1",
           "PIPELINES_TRAIN_DEVICE": "cpu", "PIPELINES_TRAIN_THREADS": "1", "PIPELINES_TRAIN_LAUNCHER": "accelerate",
           "PIPELINES_TRAIN_PROCESSES": "2", "DAGSTER_HOME": str(home), "HF_HOME": str(base / "hf_home")}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub_env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_OFFLINE": "0"}
    commands = {
        "check-params": ([sys.executable, "-m", "pipelines", "check-params"], env),
        "dvc exp run": ([dvc_executable(), "exp", "run", "evaluate"], env),
        "dagster": ([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "assets.definitions",
                     "--select", "raw_examples"], env),
        "hub": ([sys.executable, "-m", "pipelines", "fetch-model", "--params", "params_hub.yaml"], hub_env),
    }
    runs = {}
    try:
        for what, (cmd, cmd_env) in commands.items():
            runs[what] = subprocess.run(cmd, cwd=root, env=cmd_env, capture_output=True, text=True, timeout=900)
    finally:
        server.shutdown()
    return {"root": root, "base": base, "sources": sources, "runs": runs, "hub_requests": list(_FakeHub.seen),
            "env": env}


def test_secrets_in_the_environment_reach_no_output_or_log(lifecycle):
    """Covered: every file the runs wrote or changed in the project (the data outputs, the base model's source.json,
    the adapter folder: README.md run card, train_metrics.json, train_log.json, adapter_config.json, tokenizer files;
    the checkpoints: trainer_state.json, the pickled training_args.bin, rng/optimizer state, TensorBoard event files;
    the evaluation report: html, md, PNGs, examples, CSVs; metrics.json; dvc.lock, .dvc/tmp, .dvc/cache and the
    files of the experiment commit; .dagster_home's run and event storage and compute logs), the hub cache folder,
    and the stdout + stderr of every command at the CLI's INFO level.
    """
    from pipelines.runcard import LIBRARIES

    root, runs = lifecycle["root"], lifecycle["runs"]
    for what in ("check-params", "dvc exp run", "dagster"):
        assert runs[what].returncode == 0, f"{what}: {runs[what].stdout[-1500:]} {runs[what].stderr[-1500:]}"
    data = root / "data"
    for output in ("splits/train.jsonl", "base_model/source.json", "adapter/README.md",
                   "adapter/train_metrics.json", "adapter/train_log.json", "adapter/adapter_model.safetensors",
                   "evaluation/report.html", "evaluation/report.md", "metrics.json"):
        assert (data / output).is_file(), f"{output} was not written"  # the stages really wrote their outputs
    assert list((data / "checkpoints").glob("*/checkpoint-*/trainer_state.json"))
    assert list((data / "checkpoints").glob("*/runs/*/events.out.tfevents.*")), "no TensorBoard run folder"
    assert list((root / ".dagster_home").rglob("*.db")) or list((root / ".dagster_home").rglob("*.sqlite")), \
        "no Dagster run storage"
    assert (root / ".dvc" / "tmp").is_dir() and list((root / ".dvc" / "cache").rglob("*"))
    files = {**_tree(root, skip=lifecycle["sources"]), **_tree(lifecycle["base"] / "hf_home"),
             **_experiment_files(root, lifecycle["env"], lifecycle["sources"])}
    assert "dvc.lock" in files and any(name.startswith("refs/exps@") and name.endswith(":dvc.lock") for name in files)
    assert any(name.startswith(".dagster_home/") for name in files)
    logs = {what: run.stdout + run.stderr for what, run in runs.items()}
    leaks = _leaks(files, logs)
    assert not leaks, "secrets leaked: " + "; ".join(leaks)

    # The run card's sections that are filled from the process, not from params.yaml, hold only known fields:
    # the trainer environment (device, precision, threads: PIPELINES_TRAIN_*) and library versions.
    card = (data / "adapter" / "README.md").read_text(encoding="utf-8")
    versions = card.split("### Library versions", 1)[1].strip().splitlines()
    assert [line.split()[1] for line in versions] == ["python", *LIBRARIES]
    assert all(re.fullmatch(r"- [\w-]+ ([\w.+]+|not installed)", line) for line in versions), versions
    assert re.search(r"^- device: cpu, precision fp32, 2 process\(es\), 1 thread\(s\)$", card, re.M)


def test_the_hub_source_sends_the_token_only_to_the_hub_and_fails_in_one_sentence(lifecycle):
    run = lifecycle["runs"]["hub"]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: 'HuggingFaceTB/SmolLM2-135M-Instruct' (model.revision main) could not be downloaded from the Hugging "
        "Face hub (http://127.0.0.1:")
    authorized = [r for r in lifecycle["hub_requests"] if not r.endswith(" None")]
    assert authorized and all(r.endswith(f" Bearer {SECRETS['HF_TOKEN']}") for r in authorized)  # it was used
    assert not (lifecycle["root"] / "data" / "hub_model").exists()


def _field_names(model: type) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            names += [f"{name}.{sub}" for sub in _field_names(field.annotation)]
    return names


def test_params_have_no_place_for_a_secret():
    """params.yaml is tracked by git and DVC: no key may hold a token, so none can be typed into it."""
    # "token" alone or as hf_token/auth_token; max_new_tokens is a count, not a credential
    credential = re.compile(r"(^|_)token$|secret|password|passwd|api_?key|access_key|credential", re.I)
    secretive = [n for n in _field_names(Params) if credential.search(n.rsplit(".", 1)[-1])]
    assert not secretive


def test_a_token_typed_into_params_yaml_is_refused(tmp_path):
    path = write_project(tmp_path, {"model": {"hf_token": SECRETS["HF_TOKEN"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'model.hf_token'") as err:
        load_params(path)
    assert SECRETS["HF_TOKEN"] not in str(err.value)


# ------------------------------------------------------------------------------------------- paths and network


def test_every_default_path_stays_inside_the_project(tmp_path):
    params = load_params(write_project(tmp_path))
    for key in Params.model_fields["paths"].annotation.model_fields:
        assert params.path(key).resolve().is_relative_to(tmp_path.resolve()), key


def test_a_path_escaping_the_project_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'paths.adapter' = '\.\./\.\./home' .* inside the project folder"):
        load_params(write_project(tmp_path, {"paths": {"adapter": "../../home"}}))


def test_the_ui_binds_to_loopback():
    from resources import ui

    cmd = ui.command([])
    assert cmd[cmd.index("--host") + 1] == ui.HOST
    assert ipaddress.ip_address(ui.HOST).is_loopback
    assert "0.0.0.0" not in cmd and "::" not in cmd
