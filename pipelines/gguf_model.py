"""Convert the merged model to GGUF with llama.cpp's own tools, write an Ollama Modelfile, and check both files.

    python -m pipelines export-gguf [--params params.yaml]

Reads:  paths.merged (the `merge` stage's folder), the first `export.check_prompts` rows of paths.splits/test.jsonl,
        and the llama.cpp build of this machine (`make setup`, pipelines.llama_cpp).
Writes: paths.gguf/ model-<float_type>.gguf (llama.cpp's convert_hf_to_gguf.py), model-<quant_type>.gguf
        (llama-quantize, unless export.quant_type is null), Modelfile (Ollama, FROM the quantised file),
        GGUF.json (sizes, the check's figures and answers, the llama.cpp version; no timestamp).

The check (`check_gguf`) starts llama-server on 127.0.0.1 with each file, sends every check prompt to /completion
as the token ids the pipeline itself feeds the model (pipelines.chat.tokenize_prompt, via evaluate.build_examples),
decodes greedily (temperature 0) and compares the generated token ids with the merged model's own greedy ids
(transformers, fp32, pipelines.evaluate.generate_ids). It also asks the server to tokenize each rendered prompt
text (/tokenize, special tokens parsed, BOS added if the GGUF asks for one) and compares with the Hugging Face
tokenizer: that is what /v1/chat/completions does with the template it renders, so a vocabulary or BOS difference
shows as its own figure. The stage fails when the float file's match rate is below
export.min_float_match or the quantised file's below export.min_quant_match, keeping the previous folder.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipelines import llama_cpp
from pipelines.config import Params
from pipelines.evaluate import _load_causal_lm, build_examples, generate_ids, stop_token_ids
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, require, write_json
from pipelines.merged_model import check_rows

log = logging.getLogger(__name__)

MANIFEST = "GGUF.json"
MODELFILE = "Modelfile"


# ------------------------------------------------------------------------------------------ conversion


def _last_line(text: str) -> str:
    """The last non-empty line of a tool's output: for a Python traceback, the exception and its message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def convert(llama: llama_cpp.LlamaCpp, merged_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a HF folder; it imports the gguf-py shipped beside it (not PyPI's)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run([sys.executable, str(llama.convert_hf), str(merged_dir), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.is_file():
        raise StageError(f"llama.cpp's convert_hf_to_gguf.py could not convert '{merged_dir}' (exit {done.returncode}:"
                         f" {_last_line(done.stderr or done.stdout)}); it converts the architectures and tokenizers of "
                         "the models it lists with --print-supported-models, so this model cannot go to GGUF")
    return out


def quantize(llama: llama_cpp.LlamaCpp, src: Path, out: Path, qtype: str, threads: int) -> Path:
    """llama-quantize SRC OUT TYPE THREADS (tools/quantize/README.md)."""
    done = subprocess.run([str(llama.quantize), str(src), str(out), qtype, str(threads)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise StageError(f"llama-quantize could not make a {qtype} file from '{src.name}' (exit {done.returncode}: "
                         f"{_last_line(done.stderr or done.stdout)}); choose another export.quant_type")
    return out


# ------------------------------------------------------------------------------------------- Modelfile

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ollama's Go template for ChatML (docs.ollama.com/template): every message of .Messages, then the assistant
# header. Ollama puts the Modelfile's SYSTEM first in .Messages when a request has no system message of its own.
CHATML_OLLAMA = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")


@dataclass
class TemplateFamily:
    family: str  # "chatml", or "unknown" when no Ollama template could be derived
    default_system: str | None  # the system message the template inserts when a conversation has none
    stops: list[str]  # token strings that end an answer


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def template_family(tokenizer: Any, stop_ids: list[int]) -> TemplateFamily:
    """Which Ollama template reproduces the model's chat template, found by rendering probe conversations.

    ChatML is recognised when the template renders a system/user/assistant/user conversation exactly as ChatML
    does; a default system prompt is read from what it renders for a conversation without one.
    """
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        alone = tokenizer.apply_chat_template(probe[1:2], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 (a template may reject any conversation shape; then it is not ChatML)
        return TemplateFamily("unknown", None, stops)
    generation = f"{IM_START}assistant\n"
    if rendered != _chatml(probe) + generation:
        return TemplateFamily("unknown", None, stops)
    expected_tail = _chatml(probe[1:2]) + generation
    if alone == expected_tail:
        return TemplateFamily("chatml", None, stops)
    match = re.fullmatch(re.escape(IM_START) + r"system\n(.*)" + re.escape(IM_END) + "\n", alone[:-len(expected_tail)],
                         flags=re.DOTALL) if alone.endswith(expected_tail) else None
    if match is None:
        return TemplateFamily("unknown", None, stops)
    return TemplateFamily("chatml", match.group(1), stops)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError("a Modelfile value cannot contain three double quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, family: TemplateFamily) -> str:
    """An Ollama Modelfile (docs.ollama.com/modelfile) for the GGUF file `gguf_name` in the same folder."""
    lines = ["# Ollama Modelfile written by `python -m pipelines export-gguf`.",
             "#   ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}"]
    if family.family == "chatml":
        lines.append(f"TEMPLATE {_quoted(CHATML_OLLAMA)}")
        if family.default_system is not None:
            lines.append(f"SYSTEM {_quoted(family.default_system)}")
    else:
        lines += ["# No TEMPLATE: the model's chat template is not ChatML, the one family this project translates to",
                  "# Ollama's Go templates. Ollama then uses the template it recognises from the GGUF's",
                  "# tokenizer.chat_template metadata, or sends prompts verbatim; write a TEMPLATE by hand if needed."]
    lines += [f'PARAMETER stop "{stop}"' for stop in family.stops]
    lines += ["# greedy decoding, as the pipeline's evaluation and checks decode", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- check


@dataclass
class GgufCheck:
    """One GGUF file's greedy answers vs the merged model's, on the same prompts."""

    file: str
    size_mb: float
    n_prompts: int
    match_rate: float  # share of prompts with identical generated token ids
    tokenizer_match_rate: float  # share of prompts llama.cpp tokenizes exactly as transformers does
    answers: list[str]
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # the first few, with both answers


def server_args(gguf: Path, *, parallel: int = 1, ctx_per_slot: int = 4096, threads: int = 1) -> list[str]:
    """llama-server flags for the check (tools/server/README.md): one model, `parallel` slots of `ctx_per_slot`
    tokens each (the context is the slots' total: they share one KV buffer), no web UI. One thread: the check
    sends one request at a time, and on a busy machine llama.cpp's spinning thread pool lost 6x (4 completions:
    3.7 s with 1 thread, 22.6 s with 2, load average 8 on 2 cores)."""
    return ["-m", str(gguf), "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot),
            "--threads", str(threads), "--no-webui", "--seed", "0"]


def greedy_completion(server: llama_cpp.LlamaServer, prompt_ids: list[int], max_new_tokens: int
                      ) -> tuple[list[int], str]:
    """(token ids, text) of llama-server's greedy continuation of `prompt_ids` (temperature 0 keeps only the
    highest logit: llama.cpp src/llama-sampler.cpp), stopping at an end-of-generation token. A prompt of ids gets
    no BOS added (tools/server/README.md, POST /completion)."""
    reply = server.post("/completion", {"prompt": prompt_ids, "n_predict": max_new_tokens, "temperature": 0.0,
                                        "top_k": 1, "return_tokens": True, "cache_prompt": False})
    return [int(t) for t in reply.get("tokens", [])], reply.get("content", "")


def check_gguf(llama: llama_cpp.LlamaCpp, files: list[Path], merged_dir: Path, rows: list[dict[str, Any]], *,
               max_new_tokens: int, trust_remote_code: bool = False) -> list[GgufCheck]:
    """Each GGUF in llama-server vs the merged model in transformers, greedy, on the prompts of `rows`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    examples = build_examples(rows, tokenizer)
    model = _load_causal_lm(merged_dir, trust_remote_code)
    stops = set(stop_token_ids(model, tokenizer))
    expected = generate_ids(model, tokenizer, [e.prompt_ids for e in examples], batch_size=len(examples),
                            max_new_tokens=max_new_tokens, desc="merged (transformers)")
    del model
    results = []
    for gguf in files:
        got, answers, mismatches, same_tokens = [], [], [], 0
        with llama_cpp.LlamaServer(llama.server, server_args(gguf)) as server:
            for i, example in enumerate(examples):
                text_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
                same_tokens += server.post("/tokenize", {"content": example.prompt, "add_special": True})[
                    "tokens"] == text_ids
                ids, text = greedy_completion(server, example.prompt_ids, max_new_tokens)
                ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
                got.append(ids)
                answers.append(text.strip())
                if ids != expected[i] and len(mismatches) < 3:
                    mismatches.append({"prompt": i, "expected": tokenizer.decode(expected[i], skip_special_tokens=True),
                                       "got": text})
        matches = sum(a == b for a, b in zip(got, expected, strict=True))
        results.append(GgufCheck(file=gguf.name, size_mb=round(gguf.stat().st_size / 2**20, 1),
                                 n_prompts=len(examples), match_rate=matches / len(examples),
                                 tokenizer_match_rate=same_tokens / len(examples), answers=answers,
                                 mismatches=mismatches))
    return results


# ------------------------------------------------------------------------------------------------ run


def find_llama_cpp() -> llama_cpp.LlamaCpp:
    try:
        return llama_cpp.find()
    except llama_cpp.LlamaCppMissing as exc:
        raise StageError(str(exc)) from None


def run(params: Params) -> StageResult:
    cfg = params.export
    merged_dir = require(params.path("merged"), "merge")
    out = claim_output(params, "gguf")  # before any work: the folder is the stage's own, and writable
    llama = find_llama_cpp()
    if cfg.push_to_hub:
        from pipelines.hub import preflight_push

        preflight_push(cfg)  # fail before minutes of work, not after
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=params.model.trust_remote_code)
    rows = check_rows(params)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    with atomic_dir(out, "gguf") as tmp:
        t = time.perf_counter()
        float_file = convert(llama, merged_dir, tmp / f"model-{cfg.float_type}.gguf", cfg.float_type)
        seconds["convert"] = round(time.perf_counter() - t, 2)
        files = [float_file]
        if cfg.quant_type:
            t = time.perf_counter()
            files.append(quantize(llama, float_file, tmp / f"model-{cfg.quant_type}.gguf", cfg.quant_type,
                                  max(1, min(os.cpu_count() or 1, 8))))
            seconds["quantize"] = round(time.perf_counter() - t, 2)
        stops = stop_token_ids(SimpleNamespace(generation_config=GenerationConfig.from_pretrained(merged_dir)),
                               tokenizer)
        family = template_family(tokenizer, stops)
        (tmp / MODELFILE).write_text(modelfile(files[-1].name, family), encoding="utf-8")
        t = time.perf_counter()
        checks = check_gguf(llama, files, merged_dir, rows, max_new_tokens=cfg.max_new_tokens,
                            trust_remote_code=params.model.trust_remote_code)
        seconds["check"] = round(time.perf_counter() - t, 2)
        floors = [cfg.min_float_match] + [cfg.min_quant_match] * (len(checks) - 1)
        failed = [f"{c.file} {c.match_rate:.0%} < {floor:.0%}" for c, floor in zip(checks, floors, strict=True)
                  if c.match_rate < floor]
        if failed:
            example = next((c.mismatches[0] for c in checks if c.mismatches), {})
            raise StageError(f"the GGUF files in '{out}' do not answer like the merged model on {len(rows)} test "
                             f"prompts (greedy match {', '.join(failed)}; e.g. prompt {example.get('prompt')}: "
                             f"expected {example.get('expected')!r}, llama.cpp said {example.get('got')!r}); the "
                             "previous folder is kept. Lower export.min_float_match / min_quant_match only if this "
                             "is rounding, or choose a less lossy export.quant_type")
        write_json(tmp / MANIFEST, {
            "llama_cpp": llama.info().get("version"), "float_type": cfg.float_type, "quant_type": cfg.quant_type,
            "modelfile_template": family.family, "stops": family.stops,
            "checks": [asdict(c) for c in checks],
        })
    metrics: dict[str, Any] = {"modelfile_template": family.family, "check_prompts": len(rows)}
    for c in checks:
        key = Path(c.file).stem.removeprefix("model-")
        metrics[f"{key}_match_rate"] = c.match_rate
        metrics[f"{key}_tokenizer_match_rate"] = c.tokenizer_match_rate
        metrics[f"{key}_size_mb"] = c.size_mb
    metrics["seconds"] = {**seconds, "total": round(time.perf_counter() - started, 2)}
    if cfg.push_to_hub:
        from pipelines.hub import push

        metrics["hub_url"] = push(cfg, [merged_dir, out])
    return StageResult("export-gguf", outputs={"gguf": out, **{Path(c.file).stem: out / c.file for c in checks},
                                               "modelfile": out / MODELFILE}, metrics=metrics)


__all__ = ["GgufCheck", "MANIFEST", "MODELFILE", "TemplateFamily", "check_gguf", "convert", "greedy_completion",
           "modelfile", "quantize", "run", "server_args", "template_family"]
