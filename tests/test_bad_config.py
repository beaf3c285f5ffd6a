"""A bad params.yaml fails before any work with one sentence naming the key: through load_params, the CLI, preflight."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_params
from pipelines.preflight import context_window, preflight
from tests.conftest import REPO, write_project

# (params fragment, the key the message must name, words the message must contain)
BAD = [
    pytest.param({"trian": {"seed": 1}}, "trian", "unknown key", id="unknown-section"),
    pytest.param({"train": {"learnig_rate": 0.1}}, "train.learnig_rate", "learning_rate", id="unknown-key-typo"),
    pytest.param({"train": {"lora": {"rank": 8}}}, "train.lora.rank", "allowed keys here: r, alpha",
                 id="unknown-nested"),
    pytest.param({"train": {"batch_size": "eight"}}, "train.batch_size", "valid integer", id="wrong-type-int"),
    pytest.param({"clean": {"strip_html": "sometimes"}}, "clean.strip_html", "valid boolean", id="wrong-type-bool"),
    pytest.param({"split": 3}, "split", "valid dictionary", id="wrong-type-section"),
    pytest.param({"train": {"lora": {"target_modules": 5}}}, "train.lora.target_modules",
                 "valid string or a valid list", id="wrong-type-union"),
    pytest.param({"split": {"train": 0.7, "validation": 0.1, "test": 0.1}}, "split", "must sum to 1, got 0.9",
                 id="ratios-under-1"),
    pytest.param({"split": {"train": 0.8, "validation": 0.2, "test": 0.1}}, "split", "must sum to 1, got 1.1",
                 id="ratios-over-1"),
    pytest.param({"split": {"train": 1.0, "validation": 0.0, "test": 0.0}}, "split.train", "less than 1",
                 id="ratio-bounds"),
    pytest.param({"format": {"overlong": "cut"}}, "format.overlong", "'drop' or 'truncate'", id="enum-overlong"),
    pytest.param({"train": {"method": "lora4"}}, "train.method", "'lora', 'dora', 'qlora', 'full', 'adalora', 'ia3', "
                 "'prompt_tuning', 'prefix_tuning', 'p_tuning' or 'freeze'", id="enum-method"),
    pytest.param({"train": {"method": "full"}}, "train.lora", "does not read it (only lora, dora, qlora do)",
                 id="section-of-another-method"),
    pytest.param({"model": {"source": "s3"}}, "model.source", "'gguf_package', 'hub' or 'local'", id="enum-source"),
    pytest.param({"train": {"learning_rate": -0.001}}, "train.learning_rate", "greater than 0", id="negative-lr"),
    pytest.param({"train": {"batch_size": -4}}, "train.batch_size", "greater than or equal to 1", id="negative-batch"),
    pytest.param({"clean": {"min_chars": -1}}, "clean.min_chars", "greater than or equal to 0", id="negative-chars"),
    pytest.param({"train": {"max_steps": -5}}, "train.max_steps", "greater than or equal to -1", id="negative-steps"),
    pytest.param({"split": {"seed": -1}}, "split.seed", "greater than or equal to 0", id="negative-seed"),
    pytest.param({"paths": {"cleaned": "../../etc"}}, "paths.cleaned", "must stay inside the project folder",
                 id="path-escape"),
    pytest.param({"paths": {"splits": "data/../../outside"}}, "paths.splits", "must stay inside the project folder",
                 id="path-escape-hidden"),
    pytest.param({"paths": {"formatted": "."}}, "paths.formatted", "project folder itself", id="path-project-root"),
    pytest.param({"paths": {"cleaned": ""}}, "paths.cleaned", "empty path", id="path-empty"),
    pytest.param({"paths": {"cleaned": "data/raw"}}, "paths.cleaned", "overlap", id="path-equals-raw"),
    pytest.param({"paths": {"splits": "data/formatted/splits"}}, "paths.splits", "overlap", id="path-nested"),
    pytest.param({"align": {"method": "kto", "loss_type": "ipo"}}, "align",
                 "align.loss_type = 'ipo' is not a loss of align.method = 'kto'; use one of kto, apo_zero_unpaired",
                 id="align-loss-of-another-method"),
    pytest.param({"align": {"method": "ppo"}}, "align.method", "'dpo', 'kto', 'orpo', 'simpo' or 'none'",
                 id="enum-align-method"),
    pytest.param({"align": {"batch_size": 1}}, "align.batch_size", "greater than or equal to 2", id="align-batch-1"),
]


def _bad_params(tmp_path: Path, fragment: dict) -> Path:
    """The repo's params.yaml with `fragment` merged in (sections replaced key by key, not deep-validated)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, value in fragment.items():
        if isinstance(value, dict) and isinstance(params.get(section), dict):
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(params[section].get(k), dict):
                    params[section][k].update(v)
                else:
                    params[section][k] = v
        else:
            params[section] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _assert_one_sentence(message: str, key: str, words: str) -> None:
    assert "\n" not in message, message
    assert f"'{key}" in message or f"{key} " in message or f"{key}." in message, message
    assert words in message, message


@pytest.mark.parametrize(("fragment", "key", "words"), BAD)
def test_load_params_names_the_key(tmp_path, fragment, key, words):
    with pytest.raises(ConfigError) as err:
        load_params(_bad_params(tmp_path, fragment))
    _assert_one_sentence(str(err.value), key, words)


def test_several_problems_are_one_line_each_named(tmp_path):
    path = _bad_params(tmp_path, {"train": {"batch_size": 0, "lora": {"r": 0}}})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message
    assert "'train.batch_size' = 0" in message and "'train.lora.r' = 0" in message


@pytest.mark.parametrize("text", ["train: [1, 2", "train:\n  seed: 1\n bad: 2\n", "x: : y"])
def test_invalid_yaml_is_one_line_with_its_position(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+") as err:
        load_params(path)
    assert "\n" not in str(err.value)


def test_absolute_path_outside_the_project_is_allowed_when_explicit(tmp_path):
    outside = tmp_path / "elsewhere" / "cleaned"
    project = tmp_path / "project"
    project.mkdir()
    params = load_params(_bad_params(project, {"paths": {"cleaned": str(outside)}}))
    assert params.path("cleaned") == outside
    assert params.path("raw_examples") == project.resolve() / "data" / "raw_examples"


def test_relative_paths_inside_the_project_still_resolve(tmp_path):
    params = load_params(_bad_params(tmp_path, {"paths": {"cleaned": "data/./clean/../cleaned_v2"}}))
    assert params.path("cleaned").resolve() == tmp_path.resolve() / "data" / "cleaned_v2"


@pytest.mark.parametrize(("fragment", "key"), [
    ({"trian": {}}, "trian"),
    ({"split": {"train": 0.5}}, "split"),
    ({"paths": {"cleaned": "../../etc"}}, "paths.cleaned"),
    ({"format": {"overlong": "cut"}}, "format.overlong"),
])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, fragment, key):
    path = _bad_params(tmp_path, fragment)
    proc = subprocess.run([sys.executable, "-m", "pipelines", "clean", "--params", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written: the stage never started


# ----------------------------------------------------------------------------------------------- preflight


@pytest.fixture
def model_params(tmp_path, tiny_model_dir):
    """A project whose base model folder is the tiny model (1024-token context, Llama module names)."""

    def make(overrides: dict | None = None, model_dir: Path = tiny_model_dir):
        merged = {"paths": {"base_model": str(model_dir)}, **(overrides or {})}
        return load_params(write_project(tmp_path, merged))

    return make


def test_tiny_model_context_window_is_1024(tiny_model_dir):
    assert context_window(json.loads((tiny_model_dir / "config.json").read_text())) == 1024


@pytest.mark.parametrize(("overrides", "stage", "key", "words"), [
    ({"train": {"lora": {"target_modules": ["q_proj", "nonexistent_proj"]}}}, "train", "train.lora.target_modules",
     "'nonexistent_proj', which is no module"),
    ({"train": {"lora": {"target_modules": ["mlp"]}}}, "train", "train.lora.target_modules", "LoRA cannot adapt"),
    ({"train": {"lora": {"target_modules": "zz_.*"}}}, "train", "train.lora.target_modules", "matches no adaptable"),
    ({"format": {"max_length": 1025}}, "format", "format.max_length", "context window of 1024"),
    ({"format": {"max_length": 4096}}, "train", "format.max_length", "at most 1024"),
])
def test_preflight_names_the_key(model_params, overrides, stage, key, words):
    params = model_params(overrides)
    for which in (stage, None):
        with pytest.raises(ConfigError) as err:
            preflight(params, which)
        _assert_one_sentence(str(err.value), key, words)


def test_preflight_lists_the_real_module_names(model_params):
    with pytest.raises(ConfigError) as err:
        preflight(model_params({"train": {"lora": {"target_modules": ["qproj"]}}}), "train")
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value) and "rotary_emb" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    {},
    {"format": {"max_length": 1024}},
    {"train": {"lora": {"target_modules": ["q_proj", "v_proj"]}}},
    {"train": {"lora": {"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"}}},
    {"train": {"method": "full", "lora": None}},  # full fine-tuning: no LoRA section, no target modules
    {"train": {"method": "ia3", "lora": None, "ia3": {"target_modules": ["k_proj", "down_proj"],
                                                      "feedforward_modules": ["down_proj"]}}},
])
def test_preflight_passes_good_params(model_params, overrides):
    assert preflight(model_params(overrides)) is None


def test_preflight_checks_only_what_the_stage_needs(model_params):
    params = model_params({"train": {"lora": {"target_modules": ["nonexistent_proj"]}}})
    preflight(params, "format")  # format does not use LoRA
    preflight(params, "clean")
    with pytest.raises(ConfigError):
        preflight(params, "train")


def test_preflight_without_a_model_folder_leaves_it_to_the_stage(tmp_path):
    params = load_params(write_project(tmp_path, {"format": {"max_length": 100_000}}))
    assert not params.path("base_model").exists()
    assert preflight(params, "format") is None


def test_preflight_refuses_qlora_where_4bit_kernels_are_missing(model_params, monkeypatch):
    import pipelines.train_env

    monkeypatch.setattr(pipelines.train_env, "four_bit_unsupported", lambda device: "RuntimeError: no 4-bit backend")
    with pytest.raises(ConfigError, match=r"train.method = 'qlora' needs 4-bit bitsandbytes kernels") as err:
        preflight(model_params({"train": {"method": "qlora"}}), "train")
    assert "\n" not in str(err.value)


def test_preflight_allows_qlora_where_4bit_kernels_run(model_params, monkeypatch):
    import pipelines.train_env

    monkeypatch.setattr(pipelines.train_env, "four_bit_unsupported", lambda device: None)
    assert preflight(model_params({"train": {"method": "qlora"}}), "train") is None


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_preflight_refuses_model_code_unless_trusted(tmp_path, tiny_model_dir, model_params, config_file):
    folder = tmp_path / "custom_model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / config_file).read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / config_file).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.trust_remote_code = false .* needs its own Python code") as err:
        preflight(model_params(model_dir=folder), "format")
    assert config_file in str(err.value)
    # asked for explicitly: the check passes (the code is not run by the format-stage checks)
    assert preflight(model_params({"model": {"trust_remote_code": True}}, model_dir=folder), "format") is None


def test_preflight_cli(tmp_path, tiny_model_dir):
    path = write_project(tmp_path, {"paths": {"base_model": str(tiny_model_dir)}, "format": {"max_length": 2048}})
    proc = subprocess.run([sys.executable, "-m", "pipelines.preflight", "--params", str(path), "--stage", "format"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "format.max_length = 2048" in proc.stderr


def test_params_yaml_holds_the_defaults():
    """One home for each default: the committed params.yaml writes out exactly the defaults of pipelines/config.py
    (so a key left out of a user's file means the same value as the documented file)."""
    import yaml

    from pipelines.config import METHOD_SECTIONS, Params, TrainConfig

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    # train's method sections are optional (None: that method's defaults); one written out holds those defaults
    for name in {s for s in METHOD_SECTIONS.values() if s} & set(written["train"]):
        defaults["train"][name] = TrainConfig.model_fields[name].annotation.__args__[0]().model_dump(mode="json")

    def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in a.items():
            if isinstance(value, dict):
                out += differences(value, b.get(key, {}), f"{prefix}{key}.")
            elif b.get(key) != value:
                out.append(f"{prefix}{key}: params.yaml {value!r} vs config.py {b.get(key)!r}")
        return out

    assert differences(written, defaults) == []
    assert differences(defaults, written) == [], "a key of pipelines/config.py is missing from params.yaml"
