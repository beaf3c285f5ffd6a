"""`python -m pipelines serve` against the official `openai` client: the real llama-server with the exported GGUF.

    .venv/bin/python -m pytest tests/test_serve.py

Uses the session's `exported` project (tests/conftest.py: real SmolLM2 + a random LoRA adapter through the
merge and export-gguf stages) and llama.cpp built by `make setup`; without the build these tests fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from pipelines import llama_cpp, serve
from pipelines.chat import tokenize_prompt
from pipelines.evaluate import _load_causal_lm, generate
from tests.conftest import REPO, demo_conversations

TICKET = demo_conversations(1)[0]  # system + user + the reference answer


def start_serve(params, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m pipelines serve` as a user starts it; returns (process, base URL) once /health says ok.
    Its output (llama-server's log) goes to a file: an unread pipe would fill up and block the server."""
    port = llama_cpp.free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(params.root / f"serve-{port}.log", "w")  # noqa: SIM115 (the child holds it; closed when it exits)
    command = [sys.executable, "-m", "pipelines", "serve", "--params", str(params.root / "params.yaml"),
               "--port", str(port), "--threads", "1", *args]  # 1 thread: robust on a busy CI machine
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, Path(log.name).read_text()
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"serve did not come up:\n{Path(log.name).read_text()}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


def engine_of(process: subprocess.Popen) -> psutil.Process:
    (child,) = psutil.Process(process.pid).children()
    assert Path(child.exe()).name == "llama-server"
    return child


@pytest.fixture(scope="module")
def served(exported):
    params = exported[0]
    process, url = start_serve(params, "--gguf", "f16", "--parallel", "8")
    yield params, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    stop(process)


@pytest.fixture(scope="module")
def pipeline_answer(exported):
    """The pipeline's own greedy answer to the demo ticket: the merged model in transformers, as evaluate runs it."""
    from transformers import AutoTokenizer

    params = exported[0]
    merged = params.path("merged")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenize_prompt(tokenizer, TICKET).input_ids
    return generate(_load_causal_lm(merged, False), tokenizer, [prompt], batch_size=1,
                    max_new_tokens=params.export.max_new_tokens)[0]


def test_chat_completion_and_models(served):
    _, client = served
    assert [m.id for m in client.models.list().data] == [serve.MERGED_NAME]
    reply = client.chat.completions.create(model=serve.MERGED_NAME, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8


def test_demo_ticket_answer_equals_the_pipelines_greedy_output(served, pipeline_answer):
    params, client = served
    request = {"model": serve.MERGED_NAME, "messages": TICKET[:-1], "temperature": 0,
               "max_tokens": params.export.max_new_tokens}
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].message.content.strip() == pipeline_answer
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(**request, stream=True)
              if chunk.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == pipeline_answer


def test_eight_concurrent_clients_ten_requests_each(served):
    _, client = served
    prompts = [c[:-1] for c in demo_conversations(8)]

    def client_run(i: int) -> list[str]:
        return [client.chat.completions.create(model=serve.MERGED_NAME, messages=prompts[(i + k) % 8], max_tokens=6,
                                               temperature=0).choices[0].message.content for k in range(10)]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(client_run, range(8)) for a in batch]  # re-raises any error
    assert len(answers) == 80 and all(isinstance(a, str) for a in answers)


def test_sigterm_stops_the_engine_and_a_killed_serve_leaves_no_orphan(exported):
    params = exported[0]
    process, _ = start_serve(params, "--gguf", "f16", "--parallel", "1")
    engine = engine_of(process)
    assert stop(process) == 0
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE

    process, _ = start_serve(params, "--gguf", "f16", "--parallel", "1")
    engine = engine_of(process)
    process.kill()  # SIGKILL: no Python cleanup runs; the kernel's parent-death signal stops the engine
    process.wait()
    engine.wait(15)
    assert not engine.is_running()


def test_adapters_share_one_base_as_gguf_loras(exported, pipeline_answer):
    """--adapters promoted,adapter: the base GGUF + two adapters as GGUF LoRAs on one slot; each request gets the
    answer of the model it picked (transformers, fp32), also right after another adapter ran on that slot."""
    from transformers import AutoTokenizer

    from pipelines.evaluate import load_models

    params = exported[0]
    base_dir = params.path("base_model")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = [tokenize_prompt(tokenizer, TICKET).input_ids]
    models, _ = load_models(base_dir, params.path("adapter"), full=False)
    expected = {}
    for which in ("base", "fine_tuned"):
        with models.use(which) as model:
            expected[which] = generate(model, tokenizer, prompt, batch_size=1,
                                       max_new_tokens=params.export.max_new_tokens)[0]
    process, url = start_serve(params, "--adapters", "promoted,adapter", "--parallel", "1")  # one slot for all
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        request = {"model": serve.BASE_NAME, "messages": TICKET[:-1], "temperature": 0,
                   "max_tokens": params.export.max_new_tokens}
        answers = []
        for lora_id in (None, 0, 1, None):
            lora = {"lora": [{"id": lora_id, "scale": 1.0}]} if lora_id is not None else None
            reply = client.chat.completions.create(**request, extra_body=lora)
            answers.append(reply.choices[0].message.content.strip())
    finally:
        assert stop(process) == 0
    assert answers == [expected["base"], pipeline_answer, expected["fine_tuned"], expected["base"]]
    assert expected["fine_tuned"] != expected["base"]


def test_vllm_command_is_built_from_the_project(tmp_path, tiny_model_dir):
    """vLLM needs CUDA, so only its command line is checked here (flags of `vllm serve`, docs.vllm.ai)."""
    from pipelines.config import load_params
    from tests.conftest import make_lora_adapter, write_project

    make_lora_adapter(tiny_model_dir, tmp_path / "data" / "promoted", r=4)
    (tmp_path / "data" / "merged").mkdir()
    params = load_params(write_project(tmp_path, {"paths": {"base_model": str(tiny_model_dir)}}))
    merged = serve.vllm_plan(params, adapters=[], parallel=8, program=Path("/opt/vllm"))
    assert merged.args == ["serve", str(params.path("merged")), "--served-model-name", "fine-tuned",
                           "--max-num-seqs", "8", "--generation-config", "auto"]
    with_loras = serve.vllm_plan(params, adapters=["promoted"], parallel=4, program=Path("/opt/vllm"))
    assert with_loras.args[:3] == ["serve", str(params.path("base_model")), "--served-model-name"]
    tail = with_loras.args[with_loras.args.index("--enable-lora"):]
    assert tail == ["--enable-lora", "--lora-modules", f"promoted={params.path('promoted')}", "--max-loras", "1",
                    "--max-lora-rank", "8"]  # r=4 rounded up to vLLM's smallest LoRA buffer above it
    assert with_loras.models == ["base", "promoted"]


@pytest.mark.parametrize(("installed", "cuda", "engine"), [(False, False, "llama.cpp"), (True, False, "llama.cpp"),
                                                            (True, True, "vllm")])
def test_auto_engine_is_vllm_only_with_vllm_and_cuda(monkeypatch, installed, cuda, engine):
    import torch

    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: object() if installed else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert serve.choose_engine("auto") == engine and serve.choose_engine("llama.cpp") == "llama.cpp"


def test_serve_without_gguf_says_run_export_gguf(tmp_path, capsys):
    from pipelines.__main__ import main
    from tests.conftest import write_project

    path = write_project(tmp_path)
    assert main(["serve", "--params", str(path), "--engine", "llama.cpp"]) == 2
    err = capsys.readouterr().err
    assert "run `python -m pipelines export-gguf` first" in err and err.count("\n") == 1


def test_server_only_binds_loopback():
    with pytest.raises(ValueError, match="loopback"):
        llama_cpp.LlamaServer(Path("llama-server"), [], host="0.0.0.0")
