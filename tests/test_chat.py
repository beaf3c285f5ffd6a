"""pipelines.chat, the one place where a conversation becomes tokens, and every consumer of it (format, train,
evaluate): per-turn weights (issue 12 kind 3), tool schemas a template ignores (kind 4) and special-token text
inside messages (kind 5), on the tiny ChatML tokenizer and, where it is present, the real SmolLM2 one.

    .venv/bin/python -m pytest tests/test_chat.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipelines import chat, evaluate
from pipelines import format as fmt
from pipelines.chat import encode_text, tokenize_conversation, tokenize_prompt
from pipelines.config import FormatConfig, load_params
from pipelines.io import read_json, read_jsonl
from pipelines.train import encode_example
from tests.conftest import REPO, tiny_overrides, write_project

CASES = REPO.parent / "shared" / "cases" / "fidelity"
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"{CASES} is absent")


def runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Each contiguous trained run of tokens, decoded (special tokens kept)."""
    out, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    return out + ([tokenizer.decode(current)] if current else [])


def _row(i: int, messages: list[dict], tools=None) -> dict:
    return {"id": f"{i:04x}", "source": "data/raw/x.jsonl", "line": i + 1, "format": "messages",
            "messages": messages, "tools": tools, "meta": {}}


# ------------------------------------------------------------------------------------ kind 3: per-turn weight

SYDNEY = "The capital of Australia is Sydney."
CANBERRA = "You are right, I apologise: the capital of Australia is Canberra."


def australia(w_first: int | None, w_second: int | None) -> list[dict]:
    """The handed case 03-weight-zero-turn, with the two answers' weights as given (None: no key)."""
    def answer(text: str, weight: int | None) -> dict:
        return {"role": "assistant", "content": text, **({} if weight is None else {"weight": weight})}

    return [{"role": "user", "content": "What is the capital of Australia?"}, answer(SYDNEY, w_first),
            {"role": "user", "content": "That is not right, please check again."}, answer(CANBERRA, w_second)]


@pytest.mark.parametrize("weights, trained_turns", [
    ((0, 1), [CANBERRA]),
    ((1, 1), [SYDNEY, CANBERRA]),
    ((None, None), [SYDNEY, CANBERRA]),
    ((None, 0), [SYDNEY]),  # a weight-0 last answer: the conversation ends, for training, at the trained one
])
def test_weight_zero_turns_stay_in_the_context_without_loss(tiny_tokenizer, weights, trained_turns):
    messages = australia(*weights)
    tc = tokenize_conversation(tiny_tokenizer, messages)
    assert runs(tiny_tokenizer, tc.input_ids, tc.assistant_mask) == [t + "<|im_end|>" for t in trained_turns]
    assert tc.n_completion_tokens == sum(len(encode_text(tiny_tokenizer, t)[0]) + 1 for t in trained_turns)
    assert SYDNEY in tc.text  # the weight-0 answer is context either way
    assert (CANBERRA in tc.text) == (weights[1] != 0)
    example, _ = encode_example(tiny_tokenizer, {"messages": messages}, max_length=512)  # the train stage
    labelled = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tiny_tokenizer.decode(labelled) == "".join(t + "<|im_end|>" for t in trained_turns)


@pytest.mark.parametrize("weights, kept, tail_dropped", [((0, 1), 4, 0), ((1, 0), 2, 1)])
def test_format_counts_only_trained_tokens_and_reports_a_dropped_tail(tiny_tokenizer, weights, kept, tail_dropped):
    result = fmt.format_rows([_row(0, australia(*weights))], tiny_tokenizer, FormatConfig())
    (out,) = result.rows
    answer = CANBERRA if weights == (0, 1) else SYDNEY
    assert out["n_completion_tokens"] == len(encode_text(tiny_tokenizer, answer)[0]) + 1
    assert len(out["messages"]) == kept and out["messages"][-1]["content"] == answer
    assert result.rendering[chat.UNTRAINED_TAIL] == tail_dropped and not result.quarantine


@pytest.mark.parametrize("weights, reference, prompt_end", [
    ((0, 1), CANBERRA, "That is not right, please check again.<|im_end|>\n<|im_start|>assistant\n"),
    ((1, 0), SYDNEY, "What is the capital of Australia?<|im_end|>\n<|im_start|>assistant\n"),
])
def test_evaluation_scores_the_last_trained_turn(tiny_tokenizer, weights, reference, prompt_end):
    (example,) = evaluate.build_examples([{"id": "a", "messages": australia(*weights)}], tiny_tokenizer)
    assert example.reference == reference and example.messages[-1]["content"] == reference
    assert example.prompt.endswith(prompt_end)
    assert example.prompt_ids == tiny_tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    (loss,) = evaluate.tokenize_for_loss(tiny_tokenizer, [(example.messages, None)])
    assert runs(tiny_tokenizer, loss.input_ids, loss.assistant_mask) == [reference + "<|im_end|>"]
    assert loss.input_ids[: len(example.prompt_ids)] == example.prompt_ids


@needs_cases
def test_case_03_weight_zero_turn_with_smollm2(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    line = (CASES / "03-weight-zero-turn" / "input" / "weighted.jsonl").read_text().splitlines()[0]
    result = fmt.format_rows([_row(0, json.loads(line)["messages"])], tokenizer, FormatConfig())
    (out,) = result.rows
    tc = tokenize_conversation(tokenizer, out["messages"])
    assert tokenizer.decode([t for t, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]) == (
        "You are right, I apologise: the capital of Australia is Canberra.<|im_end|>")
    assert (out["n_tokens"], out["n_completion_tokens"]) == (81, 16)  # before: (81, 24), Sydney trained too


# ------------------------------------------------------------------------------ kind 4: tool schemas rendered

TOOL = {"name": "track", "description": "Track a parcel", "parameters": {"type": "object"}}
TOOL_LINE = '{"name": "track", "description": "Track a parcel", "parameters": {"type": "object"}}'
BLOCK = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
         "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
         f"{TOOL_LINE}\n</tools>")
CALL = '{"name": "track", "arguments": {"order": 7}}'
TOOL_CHAT = [{"role": "user", "content": "Where is my parcel?"}, {"role": "assistant", "content": CALL},
             {"role": "tool", "content": '{"status": "in transit"}'},
             {"role": "assistant", "content": "Your parcel is in transit."}]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.mark.parametrize("tools", [json.dumps([TOOL]), [TOOL], TOOL, json.dumps(TOOL)],
                         ids=["json-list", "list", "dict", "json-object"])
@pytest.mark.parametrize("system, expected_system", [
    (None, BLOCK), (SYSTEM, "You are a helpful assistant.\n\n" + BLOCK)], ids=["no-system", "system"])
def test_tools_a_template_ignores_go_into_the_system_message(tiny_tokenizer, tools, system, expected_system):
    messages = ([system] if system else []) + TOOL_CHAT
    tc = tokenize_conversation(tiny_tokenizer, messages, tools=tools)
    assert tc.text.startswith(f"<|im_start|>system\n{expected_system}<|im_end|>\n<|im_start|>user\nWhere is my")
    assert tc.changes == (chat.TOOLS_IN_SYSTEM,)
    assert runs(tiny_tokenizer, tc.input_ids, tc.assistant_mask) == [CALL + "<|im_end|>",
                                                                     "Your parcel is in transit.<|im_end|>"]
    prompt = tokenize_prompt(tiny_tokenizer, messages, tools=tools)  # the evaluation prompt has them too
    assert BLOCK in prompt.text and tc.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_templates_that_render_tools_render_them_themselves(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools = "{% if tools %}{{ '<|im_start|>tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    tokenizer.chat_template = tools + tokenizer.chat_template
    tc = tokenize_conversation(tokenizer, TOOL_CHAT, tools=[TOOL])
    assert tc.text.startswith("<|im_start|>tools\n[" + TOOL_LINE + "]<|im_end|>\n<|im_start|>user\n")
    assert "# Tools" not in tc.text and tc.changes == ()


def test_format_reports_rows_whose_tools_were_rendered_into_the_system_message(tiny_tokenizer):
    rows = [_row(0, TOOL_CHAT, tools=json.dumps([TOOL])), _row(1, TOOL_CHAT), _row(2, [SYSTEM, *TOOL_CHAT], [TOOL])]
    result = fmt.format_rows(rows, tiny_tokenizer, FormatConfig())
    assert len(result.rows) == 3 and result.rendering[chat.TOOLS_IN_SYSTEM] == 2
    with_tools = tokenize_conversation(tiny_tokenizer, TOOL_CHAT, tools=[TOOL]).n_tokens
    assert result.rows[0]["n_tokens"] == with_tools > result.rows[1]["n_tokens"]


def _project(tmp_path: Path, model_dir: Path, case: str, copy_model: bool = True):
    overrides = tiny_overrides(model_dir)
    if not copy_model:
        overrides["paths"] = {"base_model": str(model_dir)}
    params = load_params(write_project(tmp_path, overrides, raw_from=CASES / case / "input"))
    if copy_model:
        shutil.copytree(model_dir, params.path("base_model"))
    from pipelines import clean, ingest

    for stage in (ingest, clean, fmt):
        stage.run(params)
    out = params.path("formatted")
    return list(read_jsonl(out / "dataset.jsonl")), read_json(out / "report.json")


@needs_cases
@pytest.mark.parametrize("real", [False, True], ids=["tiny", "smollm2"])
def test_case_04_tool_schemas_reach_training_and_evaluation(tmp_path, tiny_model_dir, real, request):
    model = request.getfixturevalue("smollm2_dir") if real else tiny_model_dir
    rows, report = _project(tmp_path, model, "04-tool-schemas-not-rendered", copy_model=not real)
    (row,) = rows
    assert report["rendering"][chat.TOOLS_IN_SYSTEM] == 1
    tokenizer = AutoTokenizer.from_pretrained(model)
    tc = tokenize_conversation(tokenizer, row["messages"], tools=row["tools"])
    system = tc.text.split("<|im_start|>user")[0]
    assert '{"name": "book_table", "description": "Reserve a restaurant table"' in system
    assert row["n_tokens"] == tc.n_tokens
    (example,) = evaluate.build_examples([row], tokenizer)
    assert "Reserve a restaurant table" in example.prompt
    if real:
        assert (row["n_tokens"], row["n_completion_tokens"]) == (280, 85)  # before: (164, 85), schema never seen


# -------------------------------------------------------------------------- kind 5: control-token text is text

# Special-token text a user or an answer may quote, and the role it is quoted in.
QUOTES = ["the marker <|im_end|> ends a turn", "it prints <|im_start|>assistant in replies",
          "<|endoftext|>", "a<|endoftext|>b<|im_start|>c", "<|im_end|><|im_end|>"]


@pytest.mark.parametrize("quote", QUOTES)
@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_special_token_text_in_a_message_is_plain_text(tiny_tokenizer, quote, role):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain ChatML."},
                {"role": "assistant", "content": "It wraps turns."}]
    at = {"system": 0, "user": 1, "assistant": 2}[role]
    messages[at] = {**messages[at], "content": messages[at]["content"] + " " + quote}
    tc = tokenize_conversation(tiny_tokenizer, messages)
    start, end = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    # Only the template's own tokens are special: one turn start and one turn end per message, nothing else.
    assert (tc.input_ids.count(start), tc.input_ids.count(end)) == (3, 3)
    assert tc.input_ids.count(tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")) == 0
    trained = [t for t, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]
    assert trained == encode_text(tiny_tokenizer, messages[2]["content"])[0] + [end]  # one stop token, at the end
    assert trained[:-1] == tiny_tokenizer.convert_tokens_to_ids(
        tiny_tokenizer.tokenize(messages[2]["content"], split_special_tokens=True))
    assert tiny_tokenizer.decode(tc.input_ids) == tc.text  # nothing lost or added
    assert chat.CONTROL_TEXT in tc.changes
    prompt = tokenize_prompt(tiny_tokenizer, messages)  # generation prompts are built the same way
    assert prompt.input_ids == tc.input_ids[: len(prompt.input_ids)] and prompt.input_ids.count(start) == 3


@pytest.mark.parametrize("literal", ["</s>", "<|eot_id|>", "<end_of_turn>"])
def test_other_families_special_tokens_are_text_inside_messages(tiny_model_dir, literal):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [literal]})
    special = tokenizer.convert_tokens_to_ids(literal)
    messages = [{"role": "user", "content": f"What does {literal} mean?"},
                {"role": "assistant", "content": f"{literal} ends a turn."}]
    tc = tokenize_conversation(tokenizer, messages)
    assert special not in tc.input_ids and tokenizer.decode(tc.input_ids) == tc.text
    assert tokenizer(literal, add_special_tokens=False)["input_ids"] == [special]  # outside messages: special


def test_plain_rows_keep_their_exact_tokens(tiny_tokenizer):
    """Rows without special-token text are tokenised exactly as the tokenizer tokenises the rendered text."""
    messages = [SYSTEM, {"role": "user", "content": "My card was charged twice <b>|im_end|</b>."},
                {"role": "assistant", "content": '{"category": "billing"}'}]
    tc = tokenize_conversation(tiny_tokenizer, messages)
    assert tc.input_ids == tiny_tokenizer(tc.text, add_special_tokens=False)["input_ids"] and tc.changes == ()


@needs_cases
@pytest.mark.parametrize("real", [False, True], ids=["tiny", "smollm2"])
def test_case_05_control_token_text_in_format_train_and_evaluate(tmp_path, tiny_model_dir, real, request):
    model = request.getfixturevalue("smollm2_dir") if real else tiny_model_dir
    rows, report = _project(tmp_path, model, "05-control-token-text", copy_model=not real)
    assert report["rows_out"] == 2 and report["rendering"][chat.CONTROL_TEXT] == 2
    tokenizer = AutoTokenizer.from_pretrained(model)
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    first, second = sorted(rows, key=lambda r: r["line"])
    turns = 3 if real else 2  # SmolLM2's template adds its default system turn, the tiny ChatML one does not
    tc = tokenize_conversation(tokenizer, first["messages"])
    assert tc.input_ids.count(end) == turns  # SmolLM2 before: 4 (one inside the answer)
    trained_ends = [i for i, (t, m) in enumerate(zip(tc.input_ids, tc.assistant_mask, strict=True)) if t == end and m]
    assert trained_ends == [max(i for i, m in enumerate(tc.assistant_mask) if m)]  # only the real end of the answer
    if real:
        assert trained_ends == [79] and (first["n_tokens"], first["n_completion_tokens"]) == (81, 38)
    example, _ = encode_example(tokenizer, first, max_length=512)  # the train stage: one trained stop token
    assert [label for label in example["labels"] if label == end] == [end] and example["labels"][-1] == end
    assert tokenize_conversation(tokenizer, second["messages"]).input_ids.count(start) == turns  # SmolLM2 before: 4
    (prompt,) = evaluate.build_examples([second], tokenizer)
    assert prompt.prompt_ids.count(start) == turns  # the generation prompt: the quoted marker is plain text
    (loss,) = evaluate.tokenize_for_loss(tokenizer, [(prompt.messages, None)])
    assert loss.input_ids.count(start) == turns and loss.input_ids[: len(prompt.prompt_ids)] == prompt.prompt_ids


def test_truncation_cuts_a_final_user_message_with_control_text_as_text(tiny_tokenizer):
    question = " ".join(f"my bot prints <|im_start|>assistant {k} times." for k in range(12))
    messages = [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": "Stop it."}]
    full = tokenize_conversation(tiny_tokenizer, messages).n_tokens
    result = fmt.format_rows([_row(0, messages)], tiny_tokenizer, FormatConfig(max_length=full - 20,
                                                                               overlong="truncate"))
    (out,) = result.rows
    assert out["truncated"] and out["n_tokens"] <= full - 20 and question.endswith(out["messages"][1]["content"])
    tc = tokenize_conversation(tiny_tokenizer, out["messages"])
    assert tc.input_ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


# ------------------------------------------------- a conversation that opens with an assistant greeting

# SmolLM2's template: a conversation without a system message gets a default system turn (SmolLM2-135M-Instruct's
# chat_template.jinja, here on the tiny tokenizer's markers).
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WELCOME = "Welcome to Fjordline Bikes, how can I help?"
HELMETS = "Yes, helmets are free with every rental."
GREETING_FIRST = [{"role": "assistant", "content": WELCOME}, {"role": "user", "content": "Do you rent helmets?"},
                  {"role": "assistant", "content": HELMETS}]


def _greeting_tokenizer(model_dir, default_system: bool):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if default_system:
        tokenizer.chat_template = CHATML_DEFAULT_SYSTEM
    return tokenizer


@pytest.mark.parametrize("default_system", [False, True], ids=["chatml", "default-system"])
@pytest.mark.parametrize("system, greeting_weight, trained_turns", [
    (None, None, [WELCOME, HELMETS]),  # every assistant turn is trained, as TRL's assistant_only_loss does
    ("Be brief.", None, [WELCOME, HELMETS]),
    (None, 0, [HELMETS]),  # "weight": 0 keeps the greeting as context only
])
def test_an_opening_greeting_trains_its_own_text_never_the_templates(tiny_model_dir, default_system, system,
                                                                      greeting_weight, trained_turns):
    tokenizer = _greeting_tokenizer(tiny_model_dir, default_system)
    messages = [dict(m) for m in GREETING_FIRST]
    if greeting_weight is not None:
        messages[0]["weight"] = greeting_weight
    if system:
        messages.insert(0, {"role": "system", "content": system})
    expected = [t + "<|im_end|>" for t in trained_turns]
    tc = tokenize_conversation(tokenizer, messages)  # format
    assert runs(tokenizer, tc.input_ids, tc.assistant_mask) == expected
    assert (DEFAULT_SYSTEM in tc.text) == (default_system and not system)  # the template's text is rendered...
    example, _ = encode_example(tokenizer, {"messages": messages}, max_length=512)  # ...and never trained (train)
    assert runs(tokenizer, example["input_ids"], [label != -100 for label in example["labels"]]) == expected
    result = fmt.format_rows([_row(0, messages)], tokenizer, FormatConfig())
    assert result.rows[0]["n_completion_tokens"] == sum(len(encode_text(tokenizer, t)[0]) + 1 for t in trained_turns)
    (loss,) = evaluate.tokenize_for_loss(tokenizer, [(messages, None)])  # evaluate: the last trained turn only
    assert runs(tokenizer, loss.input_ids, loss.assistant_mask) == [HELMETS + "<|im_end|>"]
    # Scored alone, the greeting is what follows the template's opening, exactly as it is rendered in training.
    opening = [{"role": m["role"], "content": m["content"]} for m in messages[: len(messages) - 2]]
    alone = tokenize_conversation(tokenizer, opening, only_last=True)
    assert runs(tokenizer, alone.input_ids, alone.assistant_mask) == [WELCOME + "<|im_end|>"]
    prompt = tokenize_prompt(tokenizer, opening)
    assert alone.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert prompt.text.endswith("<|im_start|>assistant\n") and (DEFAULT_SYSTEM in prompt.text) == (
        default_system and not system)


def test_an_opening_greeting_with_smollm2_trains_only_the_answers(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tc = tokenize_conversation(tokenizer, GREETING_FIRST)
    assert tc.text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>assistant\n{WELCOME}")
    # before: '<|im_start|>system\nYou are a helpful AI ...<|im_end|>\n<|im_start|>assistant\nWelcome ...' trained
    assert runs(tokenizer, tc.input_ids, tc.assistant_mask) == [WELCOME + "<|im_end|>", HELMETS + "<|im_end|>"]
    example, _ = encode_example(tokenizer, {"messages": GREETING_FIRST}, max_length=512)
    assert tokenizer.decode([t for t in example["labels"] if t != -100]) == f"{WELCOME}<|im_end|>{HELMETS}<|im_end|>"
