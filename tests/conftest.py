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


def build_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 64) -> Path:
    """Save a random-weight Llama + trained BPE tokenizer with a ChatML template into `folder`."""
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
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
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
