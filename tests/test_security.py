"""Security rules, checked on the source and on behaviour.

- No `trust_remote_code=True` written in the code: it comes from params.model.trust_remote_code only.
- Model weights load from safetensors only: every from_pretrained of a model passes use_safetensors=True
  (or reads a GGUF file, or checks for the .safetensors file first, as peft then loads only that).
- Secrets come from the environment and never reach an output, a log line or params.yaml.
- The Dagster UI binds to the loopback interface.
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
        if owner == "PeftModel" and ".safetensors" in (scope_source or ""):
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
# Every stage that writes files, in lifecycle order; train and evaluate write the run card, logs, checkpoints,
# the report and the metrics. (promote only copies the adapter folder checked here.)
SECRET_STAGES = ("check-params", "fetch-model", "ingest", "clean", "format", "split", "train", "evaluate")


def _leaks(root: Path, logs: dict[str, str]) -> list[str]:
    """'NAME in file/log' for every planted secret found in a file under `root` (any format, binary files and
    pickles included, byte for byte), a file name, or a log."""
    files = [p for p in root.rglob("*") if p.is_file()]
    found = []
    for name, secret in SECRETS.items():
        found += [f"{name} in {p.relative_to(root)}" for p in files
                  if secret.encode() in p.read_bytes() or secret in str(p.relative_to(root))]
        found += [f"{name} in the log of {stage}" for stage, log in logs.items() if secret in log]
    return found


def test_secrets_in_the_environment_reach_no_output_or_log(tmp_path, tiny_model_dir):
    """Ingest to evaluation on the tiny model with credentials in the environment: none reaches a file or a log.

    Covered: the data outputs, the base model's source.json, the adapter folder (README.md run card,
    train_metrics.json, train_log.json, adapter_config.json, tokenizer files), the checkpoints (trainer_state.json,
    the pickled training_args.bin, rng/optimizer state), the evaluation report (html, md, PNGs, examples, CSVs),
    metrics.json, and each stage's stdout + stderr at the CLI's INFO level.
    """
    from pipelines.runcard import LIBRARIES

    overrides = tiny_overrides(tiny_model_dir)
    overrides["train"].update({"max_steps": 2, "eval_steps": 1, "save_steps": 1})
    overrides["evaluate"].update({"max_examples": 4, "max_new_tokens": 4})
    params = write_project(tmp_path, overrides)
    env = {**os.environ, **SECRETS, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PIPELINES_TRAIN_DEVICE": "cpu", "PIPELINES_TRAIN_THREADS": "1"}
    logs = {}
    for stage in SECRET_STAGES:
        proc = subprocess.run([sys.executable, "-m", "pipelines", stage, "--params", str(params)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-2000:]}"
        logs[stage] = proc.stdout + proc.stderr
    data = tmp_path / "data"
    for output in ("splits/train.jsonl", "base_model/source.json", "adapter/README.md",
                   "adapter/train_metrics.json", "adapter/train_log.json", "adapter/adapter_model.safetensors",
                   "evaluation/report.html", "evaluation/report.md", "metrics.json"):
        assert (data / output).is_file(), f"{output} was not written"  # the stages really wrote their outputs
    assert list((data / "checkpoints").glob("*/checkpoint-*/trainer_state.json"))
    leaks = _leaks(tmp_path, logs)
    assert not leaks, "secrets leaked: " + "; ".join(leaks)

    # The run card's sections that are filled from the process, not from params.yaml, hold only known fields:
    # the trainer environment (device, precision, threads: PIPELINES_TRAIN_*) and library versions.
    card = (data / "adapter" / "README.md").read_text(encoding="utf-8")
    versions = card.split("### Library versions", 1)[1].strip().splitlines()
    assert [line.split()[1] for line in versions] == ["python", *LIBRARIES]
    assert all(re.fullmatch(r"- [\w-]+ ([\w.+]+|not installed)", line) for line in versions), versions
    assert re.search(r"^- device: cpu, precision fp32, 1 process\(es\), 1 thread\(s\)$", card, re.M)


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
