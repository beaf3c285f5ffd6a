"""The deployment end: merge (tiny model), GGUF export and its llama.cpp check (real SmolLM2), Modelfile, hub push.

    .venv/bin/python -m pytest tests/test_export.py

The GGUF tests need llama.cpp built by `make setup` (pipelines.llama_cpp); they fail, never skip, without it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipelines import gguf_model, hub, llama_cpp, merged_model
from pipelines.config import ConfigError, ExportConfig, load_params
from pipelines.io import StageError, read_json
from tests.conftest import CHATML, demo_conversations, make_lora_adapter, write_project, write_test_split


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir):
    """Tiny base model + a promoted random LoRA adapter + a 4-row test split of demo tickets."""
    make_lora_adapter(tiny_model_dir, tmp_path / "data" / "promoted")
    write_test_split(tmp_path / "data" / "splits", demo_conversations(4))
    path = write_project(tmp_path, {"paths": {"base_model": str(tiny_model_dir)},
                                    "export": {"check_prompts": 3, "max_new_tokens": 6}})
    return load_params(path)


# ------------------------------------------------------------------------------------------------- merge


def test_merge_reproduces_base_plus_adapter(tiny_project):
    result = merged_model.run(tiny_project)
    out = tiny_project.path("merged")
    m = result.metrics
    assert m["check_passed"] is True and m["check_prompts"] == 3 and m["greedy_match_rate"] == 1.0
    assert 0 < m["max_abs_logit_diff"] <= 1e-4  # fp32 reordering only; the adapter itself moves logits by > 0.1
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # the template's end-of-turn token (<|im_end|>, which is also this tokenizer's EOS) is a stop id
    tokenizer_eos = read_json(out / "tokenizer_config.json")["eos_token"]
    assert tokenizer_eos == "<|im_end|>" and read_json(out / "generation_config.json")["eos_token_id"] == [2]
    assert (out / "chat_template.jinja").read_text() == CHATML
    record = read_json(out / merged_model.MANIFEST)
    assert record["check"]["passed"] and len(record["adapter_sha256"]) == 64
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "Merge check on 3" in card


HELLO = [{"messages": [{"role": "user", "content": "hello <|im_end|> there"}, {"role": "assistant", "content": "ok"}]}]


def test_merged_folder_loads_without_peft_and_answers_like_the_adapter(tiny_project, tiny_model_dir):
    from pipelines.evaluate import build_examples, generate, load_models

    merged_model.run(tiny_project)
    check = merged_model.check_merged(tiny_project.path("merged"), tiny_model_dir, tiny_project.path("promoted"),
                                      HELLO, max_new_tokens=6, tolerance=1e-4)
    models, tokenizer = load_models(tiny_model_dir, tiny_project.path("promoted"), full=False)
    with models.use("base") as base:
        base_answer = generate(base, tokenizer, [e.prompt_ids for e in build_examples(HELLO, tokenizer)],
                               batch_size=1, max_new_tokens=6)
    assert check.passed and check.same_prompt_ids and check.answers != base_answer  # the adapter's answers


def test_merge_check_fails_on_another_base(tiny_project, tmp_path):
    """The check can fail: the same adapter on a perturbed base gives other logits."""
    import torch
    from transformers import AutoModelForCausalLM

    merged_model.run(tiny_project)
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_project.path("base_model"))
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(other)
    shutil.copy(tiny_project.path("base_model") / "tokenizer.json", other)
    shutil.copy(tiny_project.path("base_model") / "tokenizer_config.json", other)
    check = merged_model.check_merged(tiny_project.path("merged"), other, tiny_project.path("promoted"), HELLO,
                                      max_new_tokens=4, tolerance=1e-3)
    assert not check.passed and check.max_abs_logit_diff > 1e-2


def test_merge_without_a_promoted_adapter_says_run_promote(tiny_project):
    shutil.rmtree(tiny_project.path("promoted"))
    with pytest.raises(StageError, match=r"no promoted adapter.*run the 'promote' stage first"):
        merged_model.run(tiny_project)
    assert not tiny_project.path("merged").exists()


def test_merge_cli_exits_2_with_one_sentence(tiny_project, capsys):
    from pipelines.__main__ import main

    shutil.rmtree(tiny_project.path("promoted"))
    assert main(["merge", "--params", str(tiny_project.root / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: there is no promoted adapter") and "Traceback" not in err and err.count("\n") == 0


# --------------------------------------------------------------------------------------------- Modelfile

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.mark.parametrize(("template", "family", "system"), [
    (CHATML, "chatml", None),
    (SMOL, "chatml", "You are SmolLM"),
    (ZEPHYR, "unknown", None),
])
def test_modelfile_template_is_derived_from_the_chat_template(tiny_tokenizer, template, family, system):
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        found = gguf_model.template_family(tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    finally:
        tokenizer.chat_template = saved
    assert (found.family, found.default_system, found.stops) == (family, system, ["<|im_end|>"])
    text = gguf_model.modelfile("model-Q8_0.gguf", found)
    assert "FROM ./model-Q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    if family == "chatml":
        assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
        assert (f'SYSTEM """{system}"""' in text) == (system is not None)
    else:
        assert "TEMPLATE" not in text.replace("# No TEMPLATE", "").replace("write a TEMPLATE", "")


# ------------------------------------------------------------------------------------ GGUF (real SmolLM2)


def test_llama_cpp_is_built_for_the_pinned_version():
    """The set-up step must have run: a missing build fails here instead of skipping the GGUF tests."""
    build = llama_cpp.find()
    assert build.server.is_file() and build.quantize.is_file() and build.convert_hf.is_file()
    assert (build.root / "gguf-py" / "gguf" / "__init__.py").is_file() and (build.root / "conversion").is_dir()
    assert build.info()["version"] == llama_cpp.pinned_version()


@pytest.mark.parametrize("line", ["llama-cpp-python==0.3.36", "llama_cpp_python == 0.3.36  # pinned"])
def test_pinned_version_is_read_from_constraints(tmp_path, line):
    (tmp_path / "c.txt").write_text(f"numpy==2.0\n{line}\n")
    assert llama_cpp.pinned_version(tmp_path / "c.txt") == "0.3.36"


def test_build_folder_is_keyed_by_version_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_FACTORY_CACHE", str(tmp_path))
    key = llama_cpp.build_key("0.3.36")
    assert key.startswith("llama.cpp-0.3.36-") and llama_cpp.build_dir("0.3.36") == tmp_path / key
    assert llama_cpp.build_key("0.3.37") != key and llama_cpp.build_key("0.3.36", ("-DGGML_NATIVE=OFF",)) != key
    with pytest.raises(llama_cpp.LlamaCppMissing, match="make setup"):
        llama_cpp.find()


def test_gguf_export_answers_like_the_merged_model(exported):
    params, merge, export = exported
    assert merge.metrics["check_passed"] and merge.metrics["max_abs_logit_diff"] < params.export.merge_tolerance
    m = export.metrics
    assert m["f16_match_rate"] == 1.0 and m["f16_tokenizer_match_rate"] == 1.0
    assert m["Q8_0_match_rate"] >= params.export.min_quant_match and m["Q8_0_tokenizer_match_rate"] == 1.0
    assert 200 < m["f16_size_mb"] < 300 and m["Q8_0_size_mb"] < 0.6 * m["f16_size_mb"]
    out = params.path("gguf")
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf" in modelfile and "{{ .Role }}" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    record = read_json(out / gguf_model.MANIFEST)
    assert record["modelfile_template"] == "chatml" and [c["file"] for c in record["checks"]] == [
        "model-f16.gguf", "model-Q8_0.gguf"]
    assert len(record["checks"][0]["answers"]) == 4


def test_gguf_metadata_is_what_llama_cpp_needs(exported):
    """The converter wrote the chat template, the stop token and no BOS (SmolLM2's prompts start without one)."""
    import sys

    params = exported[0]
    sys.path.insert(0, str(llama_cpp.find().root / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    fields = GGUFReader(params.path("gguf") / "model-f16.gguf").fields

    def value(key):
        field = fields[key]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if part.dtype.kind == "u" and part.dtype.itemsize == 1 else part.tolist()[0]

    assert "<|im_start|>" in value("tokenizer.chat_template")
    assert value("tokenizer.ggml.eos_token_id") == 2 and value("tokenizer.ggml.add_bos_token") is False


def test_export_gguf_of_a_vocabulary_llama_cpp_does_not_know_fails_in_one_sentence(tiny_project):
    """The tiny test tokenizer is no model llama.cpp's converter knows: the stage says so and writes nothing."""
    merged_model.run(tiny_project)
    with pytest.raises(StageError, match=r"convert_hf_to_gguf.py could not convert .*BPE pre-tokenizer was not "
                       r"recognized.*--print-supported-models") as error:
        gguf_model.run(tiny_project)
    assert "\n" not in str(error.value) and not tiny_project.path("gguf").exists()


def test_export_gguf_without_merged_model_says_run_merge(tmp_path):
    path = write_project(tmp_path)
    with pytest.raises(StageError, match=r"run the 'merge' stage first"):
        gguf_model.run(load_params(path))


# -------------------------------------------------------------------------------------------------- hub


def test_push_to_hub_needs_a_repo_id(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"export": {"push_to_hub": True}}))
    with pytest.raises(ConfigError, match="export.hub_repo_id is not set"):
        load_params(path)


@pytest.mark.parametrize(("token", "offline", "message"), [
    ("", False, "HF_TOKEN environment variable is empty"),
    ("hf_x", True, "HF_HUB_OFFLINE is set"),
])
def test_push_to_hub_fails_fast(monkeypatch, token, offline, message):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(StageError, match=message):
        hub.preflight_push(ExportConfig(push_to_hub=True, hub_repo_id="me/model"))


def test_push_to_hub_fails_fast_when_the_hub_does_not_answer(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    with pytest.raises(StageError, match=r"did not answer within 1 s"):
        hub.preflight_push(ExportConfig(push_to_hub=True, hub_repo_id="me/model"), timeout_s=1)


def test_token_is_never_a_param():
    """The token comes only from the environment: no params.yaml key could hold it (and DVC track it)."""
    assert not [name for name in ExportConfig.model_fields if name == "token" or name.endswith("_token")]
