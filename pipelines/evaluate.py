"""Evaluate the base model and the fine-tuned adapter on the held-out test split; write the report.

    python -m pipelines evaluate [--params params.yaml]

Both models see the same prompts (the chat template rendered up to the last trained assistant turn, as
token ids built by pipelines.chat.tokenize_prompt, the way training encodes them) and are scored on the
same references (that turn's text). The base model is loaded once and wrapped with the
adapter: base outputs come from `with model.disable_adapter():`, fine-tuned outputs with it enabled,
so nothing but the adapter differs. Generation is batched and greedy (left padding, prompts sorted by
length so a batch holds prompts of similar length). Completion loss is the mean NLL per answer token
under the same mask the trainer uses (pipelines.chat.tokenize_conversation).

A fixed general-instruction probe set shipped in this package (probe_general.jsonl) measures
forgetting: the rise of its completion loss from base to fine-tuned, in nats/token.

When the SFT adapter is the final candidate (align.method none), the champion, the adapter promoted before
(paths.promoted, read as it is now: not a DVC dependency), answers the same test rows too, and the `champion`
section of metrics.json compares them side by side (pipelines.champion; the rule is applied by promote).

Chain-of-thought rows: exact match and the task metrics compare final answers, taken out of the reference
and of each output by pipelines.metrics.extract_answer (evaluate.reasoning_pattern, answer_patterns: <think>
blocks, an "Answer:" line, "the answer is X"); a text without reasoning is scored as it is. metrics.json
"reasoning" counts, per side, the rows with reasoning, those cut off before an answer, and the reasoning
length in tokens of the evaluation tokenizer; examples.jsonl keeps the raw output and the extracted answer.

Every metric is also broken down per value of each evaluate.breakdown_by field (default: `source`, the raw
file of the row), each value with its own bootstrap intervals and paired delta interval (metrics.json
"breakdown"; the report's "Metrics per ..." tables).

Reads:  paths.base_model, paths.adapter (+ train_log.json), paths.splits/test.jsonl (+ train and
        validation for the token histogram fallback), paths.formatted/report.json (token histogram),
        paths.promoted (the champion, when align.method is none).
Writes: paths.evaluation/ report.html (self-contained), report.md (+ the PNGs it shows), examples.jsonl,
        train_loss.csv and eval_loss.csv (DVC plots); paths.metrics (metrics.json, DVC metrics).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pandera.errors import SchemaErrors

from pipelines import champion as champion_seat
from pipelines import report
from pipelines.chat import (
    RENDER_ERRORS,
    TemplateError,
    TokenizedConversation,
    encode_text,
    tokenize_conversation,
    tokenize_prompt,
)
from pipelines.config import EvaluateConfig, Params
from pipelines.io import (
    StageError,
    StageResult,
    atomic_dir,
    claim_output,
    read_json,
    read_jsonl,
    require,
    sha256_tree,
    write_json,
)
from pipelines.methods import safetensors_adapter, saves_full_model
from pipelines.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    Answer,
    ModelScores,
    extract_answer,
    gate,
    paired_bootstrap_ci,
    score_example,
    summarise,
)
from pipelines.schemas import (
    PROBE_FILE,
    SplitSchema,
    conversation_problem,
    describe_failures,
    field_label,
    field_names,
    field_value,
    package_rows,
    trained,
    validate,
)
from pipelines.train_env import TrainEnv

log = logging.getLogger(__name__)

N_SHOWN = 5  # best and worst examples shown in the report, each
BREAKDOWN_VALUES = 20  # values per evaluate.breakdown_by field with their own metrics (the largest); the rest counted
Which = Literal["base", "fine_tuned", "champion"]


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class EvalExample:
    id: str
    messages: list[dict[str, Any]]  # the conversation up to and including the reference answer
    tools: str | None
    prompt: str  # rendered with the chat template, ending with the assistant generation header (for the report)
    reference: str
    prompt_ids: list[int]  # the prompt as the model gets it (pipelines.chat.tokenize_prompt)


def build_examples(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[EvalExample]:
    """Prompt and reference per row: the reference is the last trained assistant turn (weight 1 or absent),
    the prompt everything before it (pipelines.chat.tokenize_prompt: the same adaptations and encoding as
    in training). Turns after the reference (weight-0 answers at the end) are not part of the example:
    they were never trained on, and they would follow the answer being scored."""
    out = []
    for i, row in enumerate(rows):
        messages = row["messages"]
        last = max(j for j, m in enumerate(messages) if trained(m))
        prompt = tokenize_prompt(tokenizer, messages, tools=row.get("tools"))
        out.append(EvalExample(
            id=str(row.get("id", i)), messages=messages[: last + 1], tools=row.get("tools"), prompt=prompt.text,
            reference=messages[last]["content"], prompt_ids=prompt.input_ids,
        ))
    return out


def load_probe() -> list[dict[str, Any]]:
    """The general-instruction probe set shipped with the package (a fixed yardstick for forgetting)."""
    return package_rows(PROBE_FILE)


def _read_test_rows(path: Path, max_examples: int | None) -> list[dict[str, Any]]:
    rows = []
    for n, row in enumerate(read_jsonl(path), start=1):
        problem = conversation_problem(row.get("messages"))
        if problem:
            raise StageError(f"{path}:{n}: {problem}; re-run the 'split' stage or fix the row")
        rows.append(row)
        if max_examples is not None and len(rows) >= max_examples:
            break
    if not rows:
        raise StageError(f"test split '{path}' has no rows; raise split.test in params.yaml or add data, "
                         "then re-run the 'split' stage")
    try:  # the row contract of the split stage, checked again at this stage's boundary
        validate(SplitSchema, rows)
    except SchemaErrors as exc:
        raise StageError(describe_failures(exc, f"test split '{path}'", "re-run the 'split' stage")) from None
    return rows


def check_breakdown_fields(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """StageError (one sentence) for an evaluate.breakdown_by field that none of the test rows has: a typo would
    otherwise put every row under '(missing)'. Checked before any model is loaded, as split checks
    split.stratify_by."""
    for name in names:
        if all(field_value(row, name) is None for row in rows):
            close = difflib.get_close_matches(name, field_names(rows), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StageError(f"evaluate.breakdown_by lists '{name}', which is not a field of any row in '{path}'"
                             f"{hint}; use a dotted field of the rows such as 'source' or 'meta.category', or remove "
                             "it from params.yaml")


# ----------------------------------------------------------------------------------------- models


@dataclass
class Models:
    """The fine-tuned model and the way to get the base: the same weights with the adapter disabled
    (peft), or a separately loaded base model (full fine-tuning). The champion (pipelines.champion), when it is
    measured too, is a second adapter on `tuned` (`champion_adapter`) or a separate model (`champion`)."""

    tuned: Any
    separate_base: Any | None = None
    champion: Any | None = None
    champion_adapter: str | None = None

    @contextlib.contextmanager
    def use(self, which: Which) -> Iterator[Any]:
        if which == "champion":
            with champion_seat.use(self, self.tuned) as model:
                yield model
        elif which == "fine_tuned":
            yield self.tuned
        elif self.separate_base is not None:
            yield self.separate_base
        else:
            with self.tuned.disable_adapter():
                yield self.tuned


def evaluation_precision(env: TrainEnv | None) -> str:
    """The dtype evaluation computes in: the trainer environment's precision on a GPU, fp32 on the CPU."""
    return "fp32" if env is None or env.device != "cuda" else env.precision


def _load_causal_lm(folder: Path, trust_remote_code: bool, env: TrainEnv | None = None,
                    four_bit: bool = False) -> Any:
    """A causal LM from safetensors only, on the environment's device and precision (fp32 on the CPU); 4-bit NF4
    (as QLoRA trained it) when `four_bit`."""
    import torch
    from transformers import AutoModelForCausalLM

    if not any(folder.glob("*.safetensors")):
        raise StageError(f"model folder '{folder}' has no .safetensors weights; only safetensors are loaded "
                         "(pickled .bin files can run code): re-save the model with safe_serialization=True")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[evaluation_precision(env)]
    device = env.device if env is not None else "cpu"
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not four_bit and device != "cpu":
        model = model.to(device)
    return model.eval()


def load_models(base_dir: Path, adapter_dir: Path, *, full: bool, trust_remote_code: bool = False,
                env: TrainEnv | None = None, four_bit: bool = False) -> tuple[Models, Any]:
    """Base + adapter on the trainer environment's device and precision (None: CPU, fp32), and the tokenizer the
    adapter was trained with. `four_bit` loads the frozen base in NF4, as QLoRA trained on it (CUDA only)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    base = _load_causal_lm(base_dir, trust_remote_code, env, four_bit=four_bit and not full)
    if full:
        return Models(tuned=_load_causal_lm(adapter_dir, trust_remote_code, env), separate_base=base), tokenizer
    safetensors_adapter(adapter_dir, "re-run the 'train' stage (python -m pipelines train)")
    tuned = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    return Models(tuned=tuned.eval()), tokenizer


# ------------------------------------------------------------------------------------- batching


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"]) -> tuple[Any, Any]:
    """(batch, seq) ids and attention mask, padded on `side`."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: a too-long batch fails early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(batches: list[list[int]], desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="batch")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the template's end-of-turn token (the last token the trainer puts
    in the loss), the tokenizer's EOS and the model's generation-config EOS."""
    ids: list[int] = []
    try:
        probe = tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "ok"}], only_last=True)
        masked = [t for t, m in zip(probe.input_ids, probe.assistant_mask, strict=True) if m]
        ids += masked[-1:]
    except (TemplateError, *RENDER_ERRORS):
        pass
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, batch_size: int,
                 max_new_tokens: int, desc: str = "generate") -> list[list[int]]:
    """Greedy continuation token ids of `prompts` (token ids from pipelines.chat.tokenize_prompt; input order),
    batched with left padding, cut before the first stop token.

    Prompts are ids, not strings: re-tokenising a rendered prompt would turn special-token text inside a
    message (a user quoting `<|im_start|>`) into real control tokens."""
    import torch
    from transformers import GenerationConfig

    encoded = [list(p) for p in prompts]
    stops = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stops, pad_token_id=pad_id)
    outputs: list[list[int]] = [[] for _ in prompts]
    for batch in _progress(_length_batches([len(e) for e in encoded], batch_size), desc):
        ids, mask = (t.to(model.device) for t in _pad([encoded[i] for i in batch], pad_id, "left"))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in zip(out[:, ids.shape[1]:].tolist(), batch, strict=True):  # (batch, new tokens)
            outputs[i] = row[: next((k for k, t in enumerate(row) if t in stops), len(row))]
    return outputs


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
             desc: str = "generate") -> list[str]:
    """Greedy answers to `prompts` (token ids) as text (special tokens dropped, surrounding whitespace stripped)."""
    ids = generate_ids(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def _accepts_logits_to_keep(model: Any) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def completion_nll(model: Any, tokenizer: Any, conversations: Sequence[TokenizedConversation], *,
                   batch_size: int, desc: str = "loss") -> tuple[list[float], list[int]]:
    """Summed NLL (nats) over each conversation's masked (answer) tokens, and how many there are."""
    import torch
    import torch.nn.functional as F

    nll = [0.0] * len(conversations)
    counts = [int(sum(c.assistant_mask)) for c in conversations]
    keep_tail = _accepts_logits_to_keep(model)
    for batch in _progress(_length_batches([c.n_tokens for c in conversations], batch_size), desc):
        ids, attention = (t.to(model.device) for t in _pad([conversations[i].input_ids for i in batch],
                                                             _pad_id(tokenizer), "right"))
        labels_mask = _pad([conversations[i].assistant_mask for i in batch], 0, "right")[0].to(model.device)
        targets, scored = ids[:, 1:], labels_mask[:, 1:].bool()  # token t is predicted at position t-1
        if not scored.any():
            continue
        # Only the answer positions need logits: keep the tail from the earliest answer on, which
        # cuts the (batch, seq, vocab) logits tensor to the answers' span (large vocabularies).
        first = int(scored.float().argmax(dim=1)[scored.any(dim=1)].min())
        kwargs = {"logits_to_keep": ids.shape[1] - first} if keep_tail and first > 0 else {}
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention, **kwargs).logits  # (batch, kept, vocab)
        # prompt-tuning / p-tuning adapters prepend their virtual tokens' positions: keep the rows' own
        logits = logits[:, -ids.shape[1]:]
        logits = logits[:, :-1] if kwargs else logits[:, first:-1]  # positions first .. seq-2
        targets, scored = targets[:, first:], scored[:, first:]
        token_nll = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
        rows = torch.arange(len(batch), device=ids.device).unsqueeze(1).expand_as(scored)[scored]
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=ids.device).index_add_(0, rows,
                                                                                            token_nll.double())
        for i, value in zip(batch, per_row.tolist(), strict=True):
            nll[i] = value
    return nll, counts


def tokenize_for_loss(tokenizer: Any, conversations: Sequence[tuple[list[dict[str, Any]], str | None]]
                      ) -> list[TokenizedConversation]:
    """Each conversation's tokens, masked on its last trained assistant turn (the reference answer)."""
    return [tokenize_conversation(tokenizer, m, tools=t, only_last=True) for m, t in conversations]


# ----------------------------------------------------------------------------------------- core


@dataclass
class Evaluation:
    """Everything measured, before anything is written."""

    summary: dict[str, Any]  # the content of metrics.json
    examples: list[dict[str, Any]]  # one record per test row: prompt, reference, both outputs + scores
    seconds: dict[str, float] = field(default_factory=dict)
    champion: dict[str, Any] | None = None  # champion vs fine-tuned (pipelines.champion.compare) when measured


def _score_model(models: Any, which: str, tokenizer: Any, examples: list[EvalExample],
                 test_tok: list[TokenizedConversation], probe_tok: list[TokenizedConversation] | None,
                 cfg: EvaluateConfig, seconds: dict[str, float]) -> tuple[ModelScores, tuple[list[float], list[int]]]:
    """Greedy answers and completion losses of one seat of `models` on the test rows, and its probe-set losses
    (([], []) when `probe_tok` is None: the champion is measured on the test rows only)."""
    with models.use(which) as model:
        t0 = time.perf_counter()
        predictions = generate(model, tokenizer, [e.prompt_ids for e in examples], batch_size=cfg.batch_size,
                               max_new_tokens=cfg.max_new_tokens, desc=f"generate {which}")
        t1 = time.perf_counter()
        nll, counts = completion_nll(model, tokenizer, test_tok, batch_size=cfg.batch_size, desc=f"loss {which}")
        probe = ([], []) if probe_tok is None else completion_nll(model, tokenizer, probe_tok,
                                                                  batch_size=cfg.batch_size, desc=f"probe {which}")
        seconds[f"generate_{which}"] = round(t1 - t0, 3)
        seconds[f"loss_{which}"] = round(time.perf_counter() - t1, 3)
    return ModelScores(predictions, nll, counts), probe


def _probe_summary(base: tuple[list[float], list[int]], tuned: tuple[list[float], list[int]],
                   cfg: EvaluateConfig) -> dict[str, Any]:
    (b_nll, counts), (t_nll, _) = base, tuned
    tokens = max(sum(counts), 1)
    b_loss, t_loss = sum(b_nll) / tokens, sum(t_nll) / tokens
    b_ex = [s / max(n, 1) for s, n in zip(b_nll, counts, strict=True)]
    t_ex = [s / max(n, 1) for s, n in zip(t_nll, counts, strict=True)]
    ci = paired_bootstrap_ci(b_ex, t_ex, counts, samples=cfg.bootstrap_samples, confidence=cfg.confidence)
    return {"base_loss": b_loss, "fine_tuned_loss": t_loss, "forgetting_ci": ci.as_dict(),
            "n": len(counts), "n_tokens": sum(counts), "max_forgetting": cfg.max_forgetting}


@dataclass
class Answers:
    """The scored answers of the test rows (pipelines.metrics.extract_answer), in example order, and the length of
    each one's reasoning in tokens of the evaluation tokenizer (pipelines.chat.encode_text; 0 without reasoning)."""

    reference: list[Answer]
    base: list[Answer]
    fine_tuned: list[Answer]
    tokens: dict[str, list[int]]  # "reference" | "base" | "fine_tuned" -> reasoning tokens per example


def extract_answers(tokenizer: Any, references: Sequence[str], base: Sequence[str], tuned: Sequence[str],
                    cfg: EvaluateConfig) -> Answers:
    """Final answers and reasoning lengths of the references and both models' outputs (cfg's patterns)."""
    def extract(texts: Sequence[str]) -> list[Answer]:
        return [extract_answer(t, cfg.reasoning_pattern, cfg.answer_patterns) for t in texts]

    answers = Answers(extract(references), extract(base), extract(tuned), {})
    for name in ("reference", "base", "fine_tuned"):
        answers.tokens[name] = [len(encode_text(tokenizer, a.reasoning)[0]) if a.has_reasoning else 0
                                for a in getattr(answers, name)]
    return answers


def reasoning_summary(answers: Answers, cfg: EvaluateConfig) -> dict[str, Any]:
    """Per side: rows whose text carries reasoning, rows with reasoning but no answer (cut off while reasoning),
    and the mean and largest reasoning length (tokens) over the rows that have reasoning."""
    out: dict[str, Any] = {"unit": "tokens", "reasoning_pattern": cfg.reasoning_pattern,
                           "answer_patterns": list(cfg.answer_patterns)}
    for name in ("reference", "base", "fine_tuned"):
        items = getattr(answers, name)
        lengths = [n for a, n in zip(items, answers.tokens[name], strict=True) if a.has_reasoning]
        out[name] = {"with_reasoning": len(lengths),
                     "no_answer": sum(a.has_reasoning and not a.text.strip() for a in items),
                     "reasoning_tokens_mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
                     "reasoning_tokens_max": max(lengths, default=0)}
    return out


def breakdown(labels: Sequence[str], references: Sequence[str], base: ModelScores, tuned: ModelScores,
              cfg: EvaluateConfig) -> dict[str, Any]:
    """Every metric of summarise() per label value (the test rows of one source, one task, ...), each with its
    bootstrap intervals and paired delta interval; the BREAKDOWN_VALUES largest values, the rest counted."""
    by_value: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_value.setdefault(label, []).append(i)
    ordered = sorted(by_value.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    shown, rest = ordered[:BREAKDOWN_VALUES], ordered[BREAKDOWN_VALUES:]
    values = []
    for value, idx in shown:
        def pick(m: ModelScores, idx: list[int] = idx) -> ModelScores:
            return ModelScores([m.predictions[i] for i in idx], [m.nll_sum[i] for i in idx],
                               [m.n_tokens[i] for i in idx])

        part, _, _ = summarise([references[i] for i in idx], pick(base), pick(tuned), samples=cfg.bootstrap_samples,
                               confidence=cfg.confidence)
        values.append({"value": value, "n": len(idx), "n_json": part["n_json"],
                       **{k: part[k] for k in ("base", "fine_tuned", "delta", "ci")}})
    return {"values": values, "left_out": {"values": len(rest), "rows": sum(len(idx) for _, idx in rest)}}


def _example_records(examples: list[EvalExample], base: ModelScores, tuned: ModelScores,
                     base_scores: list[dict[str, Any]], tuned_scores: list[dict[str, Any]], answers: Answers,
                     sources: Sequence[Any], champion: tuple[ModelScores, list[Answer]] | None = None
                     ) -> list[dict[str, Any]]:
    def side(m: ModelScores, i: int, scores: dict[str, Any], which: Which) -> dict[str, Any]:
        return {"output": m.predictions[i], "answer": getattr(answers, which)[i].text,
                "reasoning_tokens": answers.tokens[which][i], "loss": m.example_loss[i], "n_tokens": m.n_tokens[i],
                **scores}

    records = []
    for i, ex in enumerate(examples):
        records.append({"id": ex.id, "source": sources[i], "messages": ex.messages[:-1], "prompt": ex.prompt,
                        "reference": ex.reference, "reference_answer": answers.reference[i].text,
                        "reference_reasoning_tokens": answers.tokens["reference"][i],
                        "base": side(base, i, base_scores[i], "base"),
                        "fine_tuned": side(tuned, i, tuned_scores[i], "fine_tuned")})
        if champion is not None:
            scores, extracted = champion
            records[-1]["champion"] = {"output": scores.predictions[i], "answer": extracted[i].text,
                                       "loss": scores.example_loss[i], "n_tokens": scores.n_tokens[i],
                                       **score_example(extracted[i].text, answers.reference[i].text)}
    return records


def _answers_of(scores: ModelScores, cfg: EvaluateConfig) -> tuple[ModelScores, list[Answer]]:
    """`scores` with each prediction replaced by its final answer (pipelines.metrics.extract_answer); the answers."""
    extracted = [extract_answer(t, cfg.reasoning_pattern, cfg.answer_patterns) for t in scores.predictions]
    return ModelScores([a.text for a in extracted], scores.nll_sum, scores.n_tokens), extracted


def evaluate_models(models: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                    probe_rows: Sequence[dict[str, Any]], cfg: EvaluateConfig, *, champion: bool = False) -> Evaluation:
    """Generate, score and compare both models on `rows`; measure forgetting on `probe_rows`.

    Exact match and the task metrics compare the final answers (extract_answers: reasoning removed); the loss is
    over the whole reference answer, reasoning included, as it was trained. With `champion`, the champion seat of
    `models` (pipelines.champion) answers the same rows too, scored the same way, and `Evaluation.champion` compares
    the fine-tuned model with it (one more generation and loss pass; no probe)."""
    examples = build_examples(rows, tokenizer)
    test_tok = tokenize_for_loss(tokenizer, [(e.messages, e.tools) for e in examples])
    probe_tok = tokenize_for_loss(tokenizer, [(r["messages"], r.get("tools")) for r in probe_rows])
    seconds: dict[str, float] = {}
    base, base_probe = _score_model(models, "base", tokenizer, examples, test_tok, probe_tok, cfg, seconds)
    tuned, tuned_probe = _score_model(models, "fine_tuned", tokenizer, examples, test_tok, probe_tok, cfg, seconds)
    answers = extract_answers(tokenizer, [e.reference for e in examples], base.predictions, tuned.predictions, cfg)
    references = [a.text for a in answers.reference]
    scored_base = ModelScores([a.text for a in answers.base], base.nll_sum, base.n_tokens)
    scored_tuned = ModelScores([a.text for a in answers.fine_tuned], tuned.nll_sum, tuned.n_tokens)
    summary, base_scores, tuned_scores = summarise(
        references, scored_base, scored_tuned, samples=cfg.bootstrap_samples, confidence=cfg.confidence
    )
    champ = None
    if champion:
        champ, _ = _score_model(models, "champion", tokenizer, examples, test_tok, None, cfg, seconds)
    probe = _probe_summary(base_probe, tuned_probe, cfg)
    summary.update({
        "n_test": len(examples), "primary_metric": cfg.primary_metric, "probe": probe,
        "forgetting": probe["fine_tuned_loss"] - probe["base_loss"],
        "reasoning": reasoning_summary(answers, cfg),
        "breakdown": {name: breakdown([field_label(r, name) for r in rows], references, scored_base, scored_tuned, cfg)
                      for name in cfg.breakdown_by},
    })
    passed, reasons = gate(summary, cfg)
    summary["gate"] = {"passed": passed, "reasons": reasons, "min_improvement": cfg.min_improvement,
                       "max_forgetting": cfg.max_forgetting}
    champion_answers, comparison = None, None
    if champ is not None:
        scored_champ, extracted = _answers_of(champ, cfg)
        champion_answers = (champ, extracted)
        comparison = champion_seat.compare(references, scored_champ, scored_tuned, cfg)
    records = _example_records(examples, base, tuned, base_scores, tuned_scores, answers,
                               [r.get("source") for r in rows], champion_answers)
    return Evaluation(summary, records, seconds, comparison)


def compare_with_champion(models: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: EvaluateConfig
                          ) -> tuple[dict[str, Any], dict[str, float]]:
    """The fine-tuned seat of `models` vs its champion seat on `rows` alone (no base, no probe): the comparison of
    pipelines.champion.compare, on final answers as evaluate_models scores them, and the seconds each pass took. For
    a candidate whose other evaluation was skipped."""
    examples = build_examples(rows, tokenizer)
    test_tok = tokenize_for_loss(tokenizer, [(e.messages, e.tools) for e in examples])
    seconds: dict[str, float] = {}
    tuned, _ = _score_model(models, "fine_tuned", tokenizer, examples, test_tok, None, cfg, seconds)
    champ, _ = _score_model(models, "champion", tokenizer, examples, test_tok, None, cfg, seconds)
    references = [extract_answer(e.reference, cfg.reasoning_pattern, cfg.answer_patterns).text for e in examples]
    return champion_seat.compare(references, _answers_of(champ, cfg)[0], _answers_of(tuned, cfg)[0], cfg), seconds


def rank_examples(records: list[dict[str, Any]], primary: str, k: int = N_SHOWN) -> tuple[list[dict], list[dict]]:
    """(best, worst) test rows by the fine-tuned model: primary metric, then ROUGE-L, then loss."""
    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        ft = r["fine_tuned"]
        if primary in ("loss", "perplexity"):
            score = -ft["loss"]
        else:
            score = ft.get(primary, ft["rouge_l"])
        return (score, ft["rouge_l"], -ft["loss"])

    ranked = sorted(records, key=key)
    k_worst = min(k, len(ranked) // 2 + len(ranked) % 2)
    worst = ranked[:k_worst]
    best = list(reversed(ranked[k_worst:]))[:k]
    return best, worst


# ---------------------------------------------------------------------------------- loss curves


def loss_points(log_history: Any) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(train, eval) loss points [{step, loss}] from an HF Trainer log_history list, one per step (the
    last logged wins: a final trainer.evaluate() repeats the last step); junk entries are skipped."""
    curves: dict[str, dict[float, float]] = {"loss": {}, "eval_loss": {}}
    for entry in log_history if isinstance(log_history, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), (int, float)):
            continue
        for key, points in curves.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points[entry["step"]] = float(value)
    train, evals = ([{"step": k, "loss": v} for k, v in sorted(c.items())] for c in curves.values())
    return train, evals


def loss_csv(points: list[dict[str, float]], column: str) -> str:
    """One dense `step,<column>` CSV per curve for DVC plots: a blank cell in a shared CSV is read by
    Vega-Lite as 0, which would draw the sparser validation curve down to zero between evaluations."""
    return f"step,{column}\n" + "".join(f"{p['step']:g},{p['loss']:.6g}\n" for p in points)


# ----------------------------------------------------------------------------- token histogram

_COUNT_KEYS = ("counts", "count", "frequencies", "hist", "histogram", "values")
_EDGE_KEYS = ("edges", "bin_edges", "bins", "bounds")


def _as_histogram(node: dict[str, Any]) -> dict[str, list[float]] | None:
    counts = next((node[k] for k in _COUNT_KEYS if isinstance(node.get(k), list)), None)
    edges = next((node[k] for k in _EDGE_KEYS if isinstance(node.get(k), list)), None)
    if not counts or not edges or not all(isinstance(v, (int, float)) for v in counts + edges):
        return None
    if len(edges) == len(counts) + 1:
        return {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}
    if len(edges) == len(counts) and len(edges) > 1:  # left edges: extend by the last bin's width
        return {"edges": [float(e) for e in edges] + [2 * edges[-1] - edges[-2]], "counts": [float(c) for c in counts]}
    return None


def find_token_histogram(report_json: Any) -> dict[str, list[float]] | None:
    """A {edges, counts} histogram anywhere in the formatting report (its exact shape belongs to the
    format stage, so look for it rather than assume one layout); token-named keys are preferred."""
    found: list[tuple[int, dict[str, list[float]]]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            hist = _as_histogram(node)
            if hist:
                found.append((0 if "token" in path.lower() else 1, hist))
            for k, v in node.items():
                walk(v, f"{path}.{k}")

    walk(report_json, "")
    return sorted(found, key=lambda f: f[0])[0][1] if found else None


def histogram_from_lengths(lengths: Sequence[int], bins: int = 30) -> dict[str, list[float]] | None:
    if not lengths:
        return None
    counts, edges = np.histogram(np.asarray(lengths, dtype=float), bins=bins)
    return {"edges": edges.tolist(), "counts": counts.astype(float).tolist()}


def _token_histogram(params: Params) -> tuple[dict[str, list[float]] | None, str]:
    path = params.path("formatted") / "report.json"
    try:
        hist = find_token_histogram(read_json(path))
        if hist:
            return hist, str(path.relative_to(params.root))
    except (OSError, ValueError):
        pass
    lengths = []
    for name in ("train", "validation", "test"):
        split = params.path("splits") / f"{name}.jsonl"
        if split.exists():
            lengths += [int(r["n_tokens"]) for r in read_jsonl(split) if isinstance(r.get("n_tokens"), int)]
    return histogram_from_lengths(lengths), "n_tokens of the split files"


# ------------------------------------------------------------------------------------------- run


def _is_full_model(params: Params, adapter_dir: Path) -> bool:
    if saves_full_model(params.train.method):  # full, freeze
        return True
    return not (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "config.json").exists()


def run(params: Params, env: TrainEnv | None = None) -> StageResult:
    """Evaluate on the trainer environment's device (`env`, the Dagster trainer resource; None: the
    PIPELINES_TRAIN_* variables, else the machine's default): a GPU in its precision with batched generation,
    the CPU in fp32."""
    env = env or TrainEnv.auto()
    cfg = params.evaluate
    if cfg.primary_metric not in METRICS:
        raise StageError(f"params.yaml evaluate.primary_metric = '{cfg.primary_metric}' is unknown; "
                         f"use one of: {', '.join(METRICS)}")
    out_dir = claim_output(params, "evaluation")  # before any work: the outputs are the stage's own, and writable
    claim_output(params, "metrics")
    base_dir = require(params.path("base_model"), "fetch-model")
    adapter_dir = require(params.path("adapter"), "train")
    test_path = require(params.path("splits") / "test.jsonl", "split")
    rows = _read_test_rows(test_path, cfg.max_examples)
    check_breakdown_fields(rows, cfg.breakdown_by, test_path)
    adapter_sha = sha256_tree(adapter_dir)  # promote checks metrics.json belongs to the adapter it copies
    started = time.perf_counter()
    full = _is_full_model(params, adapter_dir)
    four_bit = env.device == "cuda" and (params.train.method == "qlora" or env.load_in_4bit) and not full
    trust = params.model.trust_remote_code
    if params.align.method == "none":  # the SFT adapter is the final candidate: compare it with the champion here
        found, section = champion_seat.locate(params, adapter_dir, candidate="sft", measured_by="evaluate")
    else:
        found, section = None, champion_seat.deferred(
            "sft", "evaluate-alignment", f"align.method is {params.align.method}, so the final candidate is the "
            "adapter after the align stage: evaluate-alignment compares it with the champion")
    models, tokenizer = load_models(base_dir, adapter_dir, full=full, trust_remote_code=trust, env=env,
                                    four_bit=four_bit)
    measured = champion_seat.attach(models, models.tuned, found, section, base_dir=base_dir, trust_remote_code=trust,
                                    env=env, four_bit=four_bit)
    try:
        result = evaluate_models(models, tokenizer, rows, load_probe(), cfg, champion=measured)
    except TemplateError as exc:
        raise StageError(f"the chat template of '{base_dir}' cannot render the test rows: {exc}") from None
    result.summary["champion"] = champion_seat.decide({**section, **(result.champion or {})}, cfg)
    result.summary["adapter_sha256"] = adapter_sha
    result.summary["evaluated_on"] = {"device": env.device, "precision": evaluation_precision(env),
                                      "four_bit_base": four_bit}
    log_path = adapter_dir / "train_log.json"
    try:
        train_pts, eval_pts = loss_points(read_json(log_path))
    except (OSError, ValueError):
        log.warning("no readable %s: the report has no loss curves", log_path)
        train_pts, eval_pts = [], []
    hist, hist_source = _token_histogram(params)
    best, worst = rank_examples(result.examples, cfg.primary_metric)
    ctx = report.ReportContext(
        metrics=result.summary, best=best, worst=worst, train_loss=train_pts, eval_loss=eval_pts,
        token_histogram=hist, histogram_source=hist_source,
        base_model=str(base_dir.relative_to(params.root) if base_dir.is_relative_to(params.root) else base_dir),
        adapter=str(adapter_dir.relative_to(params.root) if adapter_dir.is_relative_to(params.root) else adapter_dir),
    )
    images = report.plots(ctx)
    with atomic_dir(out_dir, "evaluation") as tmp:
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.html").write_text(report.render_html(ctx, images), encoding="utf-8")
        (tmp / "report.md").write_text(report.render_markdown(ctx, list(images)), encoding="utf-8")
        (tmp / "train_loss.csv").write_text(loss_csv(train_pts, "train_loss"), encoding="utf-8")
        (tmp / "eval_loss.csv").write_text(loss_csv(eval_pts, "eval_loss"), encoding="utf-8")
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in result.examples)
    write_json(claim_output(params, "metrics"), result.summary)  # checked again: evaluation takes minutes
    s = result.summary
    primary = cfg.primary_metric
    figures: dict[str, Any] = {
        "n_test": s["n_test"], "n_json": s["n_json"], "primary_metric": primary,
        f"base_{primary}": round(s["base"][primary], 4) if primary in s["base"] else None,
        f"fine_tuned_{primary}": round(s["fine_tuned"][primary], 4) if primary in s["fine_tuned"] else None,
        "base_loss": round(s["base"]["loss"], 4), "fine_tuned_loss": round(s["fine_tuned"]["loss"], 4),
        "forgetting": round(s["forgetting"], 4), "gate_passed": s["gate"]["passed"],
        "gate_reasons": s["gate"]["reasons"], "metric_table_md": report.metric_table_markdown(s),
        "breakdown_md": "\n\n".join(report.breakdown_markdown(s)) or "no breakdown (evaluate.breakdown_by: [])",
        **champion_seat.figures(s["champion"], primary),
        "champion_table_md": report.champion_table_markdown(s["champion"], ("base", s["base"])),
        "loss_curve": {"train": train_pts, "eval": eval_pts}, "token_histogram": hist,
        "seconds": {**result.seconds, "total": round(time.perf_counter() - started, 3)},
    }
    outputs = {"evaluation": out_dir, "metrics": params.path("metrics"), "report_html": out_dir / "report.html",
               "report_md": out_dir / "report.md", **{Path(n).stem: out_dir / n for n in images}}
    log.info("gate %s: %s", "passed" if s["gate"]["passed"] else "failed", " ".join(s["gate"]["reasons"]))
    return StageResult("evaluate", outputs=outputs, metrics=figures)


__all__ = ["EvalExample", "Evaluation", "HIGHER_IS_BETTER", "Models", "build_examples", "compare_with_champion",
           "completion_nll", "evaluate_models", "find_token_histogram", "gate", "generate", "generate_ids",
           "load_models", "load_probe", "loss_csv", "loss_points", "rank_examples", "run", "stop_token_ids"]
