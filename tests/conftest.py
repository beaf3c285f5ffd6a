"""Shared fixtures: a tiny chat model built from a config, and a throw-away project folder.

The tiny model is a 2-layer Llama with a byte-level BPE tokenizer trained on a few sentences and a
ChatML chat template (the same template family as SmolLM2), so every stage runs in seconds on CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

# 2 cores on CI: one torch pool, no tokenizer threads fighting it.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A long system prompt of varied text (~200 words), shared by every row of a support bot's data: on whole
# conversations it dominates the word shingles, so rows that share only it look like near duplicates.
LONG_SYSTEM_PROMPT = (
    "You are the support assistant of Fjordline Bikes, a bicycle rental shop in Bergen. Answer in one short "
    "sentence. Be polite and never promise refunds; refunds are handled by the store manager. If the customer "
    "asks about opening hours, say we are open from 9 to 18 on weekdays and 10 to 16 on Saturdays. If the "
    "customer asks about prices, tell them that city bikes cost 200 NOK per day and e-bikes cost 450 NOK per day. "
    "Always end with a friendly tone and do not use emojis or markdown. When a customer reports a flat tyre or a "
    "broken chain during a rental, tell them to call the workshop line, which is staffed from 8 to 20 every day, "
    "and explain that a mechanic can meet them anywhere inside the city centre within about forty minutes. Group "
    "bookings of more than eight bikes need a written request at least three days ahead, and school classes get "
    "a discount of twenty percent on weekdays. Children under twelve must always wear a helmet and ride with an "
    "adult. Guided tours leave from the fish market at ten and at two, last about three hours, include a coffee "
    "stop, and must be booked the day before."
)

_CORPUS = [
    "My card was charged twice for the same order, please refund.",
    "I cannot log in to my account since the password reset.",
    "The app crashes when I open the settings page.",
    "Where is my parcel? Tracking has not updated in a week.",
    "Could you add a dark mode to the dashboard?",
    '{"category": "billing", "priority": "high"}',
    '{"category": "login", "priority": "low"}',
    "Give three tips for staying healthy. Eat well, sleep, exercise.",
    "system user assistant tool You are a helpful assistant.",
] * 4


def build_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 64, context: int = 1024) -> Path:
    """Save a random-weight Llama + trained BPE tokenizer with a ChatML template into `folder`.

    `context` (max_position_embeddings): raise it to format real data, which the 400-token BPE makes ~4x longer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_project(root: Path, overrides: dict | None = None, *, raw_from: Path | None = None) -> Path:
    """A params.yaml in `root` (paths relative to it) with `overrides` deep-merged; returns its path.

    `raw_from` copies a folder of raw files into root/data/raw (default: the bundled demo data).
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def merge(into: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(params, overrides or {})
    raw = root / params["paths"]["raw_dir"]
    raw.parent.mkdir(parents=True, exist_ok=True)
    if not raw.exists():
        shutil.copytree(raw_from or REPO / "data" / "raw", raw)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tiny_overrides(model_dir: Path) -> dict:
    """Params for a fast end-to-end run with the tiny model (seconds, not minutes)."""
    return {
        "model": {"source": "local", "name": str(model_dir)},
        "format": {"max_length": 1024},  # the tiny 400-token BPE needs ~4x the tokens of a real one
        "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1},
        "evaluate": {"max_examples": 8, "max_new_tokens": 8, "bootstrap_samples": 100},
        "align": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
                  "max_eval_pairs": 8},
    }


# ---------------------------------------------------------------------------------- no silent skips
# `make test` (and so CI) sets PIPELINES_STRICT_SKIPS=1: a test that skips because something is missing (a
# browser, a tool, the shared datasets) then FAILS, because the README's test command sets all of it up. A skip
# that reflects the hardware (no CUDA, no 4-bit kernels on this CPU) is allowed: its reason starts with HARDWARE.
HARDWARE = "hardware: "


def skip_for_hardware(reason: str) -> None:
    """Skip a test that cannot run on this machine's hardware (allowed even under PIPELINES_STRICT_SKIPS)."""
    pytest.skip(HARDWARE + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("PIPELINES_STRICT_SKIPS") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if HARDWARE in reason:
        return
    report.outcome = "failed"
    report.longrepr = f"skipped for a missing dependency, which `make test` must set up: {reason}"


# ---------------------------------------------------------------------------------- the real base model
SMOLLM2_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-factory" / "smollm2-base"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder: the project's data/base_model when it has been fetched, else
    converted once per machine (the fetch-model stage, ~20 s) into SMOLLM2_CACHE and reused by later runs."""
    import fcntl

    from pipelines import base_model
    from pipelines.config import load_params

    if (REPO / "data" / "base_model" / "model.safetensors").is_file():
        return REPO / "data" / "base_model"
    folder = SMOLLM2_CACHE / "model"
    SMOLLM2_CACHE.mkdir(parents=True, exist_ok=True)
    with open(SMOLLM2_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time (parallel pytest sessions)
        if not (folder / "model.safetensors").is_file():
            params_file = write_project(SMOLLM2_CACHE / "project", {"paths": {"base_model": str(folder)}})
            base_model.run(load_params(params_file))
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return smollm2_folder()


# ------------------------------------------------------------------ the deployment end (merge, GGUF, chat, serve)


def make_lora_adapter(base_dir: Path, folder: Path, *, r: int = 4, std: float = 0.3, seed: int = 1) -> Path:
    """A peft LoRA adapter on `base_dir` whose B matrices are random (std `std`), so it changes the outputs;
    saved with the base's tokenizer, as the train stage saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # before get_peft_model, which draws the A matrices
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    peft_model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


def demo_conversations(n: int) -> list[list[dict]]:
    """The first `n` well-formed conversations of the bundled demo (support tickets -> JSON triage)."""
    import json

    out = []
    with open(REPO / "data" / "raw" / "tickets_helpdesk.jsonl", encoding="utf-8") as fh:
        for line in fh:
            try:
                messages = json.loads(line).get("messages")
            except ValueError:  # the demo has deliberately broken lines
                continue
            if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
                out.append(messages)
            if len(out) == n:
                break
    return out


def write_test_split(splits_dir: Path, conversations: list[list[dict]]) -> Path:
    """splits_dir/test.jsonl with rows that pass the split stage's contract (pipelines.schemas.SplitSchema)."""
    import json

    splits_dir.mkdir(parents=True, exist_ok=True)
    path = splits_dir / "test.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, messages in enumerate(conversations):
            fh.write(json.dumps({"id": f"t{i}", "source": "data/raw/tickets_helpdesk.jsonl", "line": i + 1,
                                 "format": "messages", "messages": messages, "n_tokens": 100,
                                 "n_completion_tokens": 10, "truncated": False, "group": f"g{i}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def exported(smollm2_dir, tmp_path_factory):
    """A project on the real base model with a promoted random LoRA adapter (and another one in paths.adapter),
    run through the real `merge` and `export-gguf` stages: (params, merge StageResult, export-gguf StageResult)."""
    from pipelines import gguf_model, merged_model
    from pipelines.config import load_params

    root = tmp_path_factory.mktemp("exported")
    make_lora_adapter(smollm2_dir, root / "data" / "promoted", r=8, std=0.005)
    make_lora_adapter(smollm2_dir, root / "data" / "adapter", r=8, std=0.02, seed=3)  # a second, stronger one
    write_test_split(root / "data" / "splits", demo_conversations(4))
    # A random adapter leaves SmolLM2 answering in free text, where Q8_0 rounding flips near-tied tokens (2 or 3 of 4
    # answers matched for three seeds); the trained demo's JSON answers matched 8 of 8. f16 must match exactly.
    path = write_project(root, {"paths": {"base_model": str(smollm2_dir)},
                                "export": {"check_prompts": 4, "max_new_tokens": 24, "min_quant_match": 0.25}})
    params = load_params(path)
    return params, merged_model.run(params), gguf_model.run(params)
