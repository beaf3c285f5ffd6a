"""`python -m pipelines chat` driven through a pseudo terminal (pexpect), on the tiny model with two adapters.

    .venv/bin/python -m pytest tests/test_chat_cli.py
"""

from __future__ import annotations

import os
import sys
import threading

import pexpect
import pytest

from pipelines.chat import tokenize_prompt
from pipelines.config import load_params
from pipelines.errors import StageError
from pipelines.evaluate import generate, load_models
from pipelines.terminal_chat import ChatSession, resolve_adapter
from tests.conftest import REPO, make_lora_adapter, write_project

QUESTION = "My card was charged twice"
MAX_NEW = 8


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chat")
    make_lora_adapter(tiny_model_dir, root / "data" / "promoted", seed=1)
    make_lora_adapter(tiny_model_dir, root / "other_adapter", seed=2)
    return load_params(write_project(root, {"paths": {"base_model": str(tiny_model_dir)}}))


def greedy(model_dir, adapter_dir, messages, which):
    """The evaluation's greedy answer to `messages` (pipelines.evaluate: prompt ids from pipelines.chat)."""
    models, tokenizer = load_models(model_dir, adapter_dir, full=False)
    prompt = tokenize_prompt(tokenizer, [*messages, {"role": "assistant", "content": "x"}]).input_ids
    with models.use(which) as model:
        return generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=MAX_NEW)[0]


def spawn(params, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "pipelines", "chat", "--params", str(params.root / "params.yaml"),
                                           "--max-new-tokens", str(MAX_NEW), *args],
                          cwd=str(params.root), env=env, encoding="utf-8", timeout=120, echo=False)
    child.expect("model ready; adapter: ")
    child.expect("you> ")
    return child


def answer(child, text):
    """Send a user line; the printed answer (what came between the reply label and the next prompt)."""
    child.sendline(text)
    child.expect("assistant> ")
    child.expect("\r\nyou> ")
    return child.before.replace("\r\n", "\n").strip()


def test_chat_streams_the_adapters_answer_and_switches_without_reloading(project, tiny_model_dir):
    messages = [{"role": "user", "content": QUESTION}]
    promoted = project.path("promoted")
    child = spawn(project)
    try:
        assert answer(child, QUESTION) == greedy(tiny_model_dir, promoted, messages, "fine_tuned")
        # second turn: the history is part of the prompt
        first = greedy(tiny_model_dir, promoted, messages, "fine_tuned")
        follow = [*messages, {"role": "assistant", "content": first}, {"role": "user", "content": "thanks"}]
        assert answer(child, "thanks") == greedy(tiny_model_dir, promoted, follow, "fine_tuned")

        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("you> ")
        child.sendline("/adapter none")
        child.expect(r"adapter: none \(\d+\.\d s, base model kept in memory\)")
        child.expect("you> ")
        base_answer = greedy(tiny_model_dir, promoted, messages, "base")
        assert answer(child, QUESTION) == base_answer

        child.sendline(f"/adapter {project.root / 'other_adapter'}")
        child.expect("adapter: other_adapter")
        child.expect("you> ")
        # switching adapters keeps the conversation: the other adapter answers with the base's turn in its prompt
        history = [*messages, {"role": "assistant", "content": base_answer}, *messages]
        assert answer(child, QUESTION) == greedy(tiny_model_dir, project.root / "other_adapter", history, "fine_tuned")
        child.sendline("/adapters")
        child.expect("loaded: none, promoted, other_adapter; active: other_adapter")
        child.expect("you> ")

        child.sendline("/system Answer in JSON.")
        child.expect("system prompt set; conversation cleared")
        child.expect("you> ")
        with_system = [{"role": "system", "content": "Answer in JSON."}, *messages]
        assert answer(child, QUESTION) == greedy(tiny_model_dir, project.root / "other_adapter", with_system,
                                                 "fine_tuned")

        child.sendline("/adapter nowhere")
        child.expect("error: 'nowhere' is not a peft adapter folder")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_stops_on_end_of_input_and_refuses_a_missing_adapter(project, tmp_path):
    child = spawn(project, "--adapter", "none")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out, status = pexpect.run(f"{sys.executable} -m pipelines chat --params {project.root / 'params.yaml'} "
                              f"--adapter {tmp_path / 'missing'}", env=env, withexitstatus=True, encoding="utf-8",
                              timeout=120)
    assert status == 2 and "is not a peft adapter folder" in out and "Traceback" not in out


def test_stream_yields_pieces_and_adapters_share_one_base(project, tiny_model_dir):
    """Streaming: the answer arrives in several pieces; stopping mid-answer leaves the model usable; switching
    adapters keeps the same base weights in memory."""
    from transformers import AutoTokenizer

    from pipelines.evaluate import _load_causal_lm

    session = ChatSession(_load_causal_lm(tiny_model_dir, False), AutoTokenizer.from_pretrained(tiny_model_dir),
                          max_new_tokens=MAX_NEW)
    session.use_adapter(*resolve_adapter(project, "promoted"))
    pieces = list(session.stream(QUESTION))
    assert len(pieces) > 1 and len(session.history) == 2
    stop = threading.Event()
    stream = session.stream("again", stop)
    next(stream)
    stream.close()  # what Ctrl-C does: the generation thread is stopped and joined
    assert len(session.history) == 2  # the interrupted turn is not kept
    session.history.clear()
    assert "".join(session.stream(QUESTION)) == "".join(pieces)

    base = session.model.get_base_model()
    embedding = base.get_input_embeddings().weight
    session.use_adapter(*resolve_adapter(project, str(project.root / "other_adapter")))
    session.use_adapter(*resolve_adapter(project, "none"))
    session.use_adapter(*resolve_adapter(project, "promoted"))
    assert session.model.get_base_model() is base and base.get_input_embeddings().weight is embedding
    assert session.adapters == ["promoted", "other_adapter"]


def test_adapters_load_only_from_safetensors_and_a_full_model_is_named(project, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StageError, match="no adapter_model.safetensors; only safetensors"):
        resolve_adapter(project, str(pickled))
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    with pytest.raises(StageError, match=f"a full model, not an adapter: use --model {full} --adapter none"):
        resolve_adapter(project, str(full))
