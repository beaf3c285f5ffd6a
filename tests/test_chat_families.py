"""Chat templates of other model families (issue 12 kind 10), each rendered the way its users expect.

The templates below are written here from each family's documented rules (the real ones cannot be downloaded
in CI); they run on the tiny test tokenizer:
- GEMMA: no system role (raises "System role not supported"), strict user/model alternation starting with the
  user, turns as `<start_of_turn>{user|model}\\n...<end_of_turn>\\n` (Gemma's model card, "Chat template").
- MISTRAL: Llama-2 / Mistral-Instruct `[INST] ... [/INST]answer</s>`, only user and assistant roles, strict
  alternation ("Conversation roles must alternate user/assistant/user/assistant/...").
- QWEN3: ChatML whose assistant turns before the last user query lose their `<think>...</think>` reasoning
  and whose later turns show it (Qwen3's model card: "historical model output should only include the final
  output part and does not need to include the thinking content").
- R1: DeepSeek-R1 style, ChatML-like markers; every assistant turn but the conversation's last loses its
  reasoning (DeepSeek's reasoning-model docs: earlier turns' reasoning_content is not put into the context).

    .venv/bin/python -m pytest tests/test_chat_families.py
"""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from pipelines import chat, evaluate
from pipelines import format as fmt
from pipelines.chat import tokenize_conversation
from pipelines.config import FormatConfig, load_params
from pipelines.io import StageError, read_json, read_jsonl, write_jsonl
from pipelines.train import encode_example
from tests.conftest import tiny_overrides, write_project

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{%- set content = '<think>\n' + reasoning + '\n</think>\n\n' + content -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
R1 = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}"
    "{% if not loop.last and '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|Assistant|>' + content + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}"
)
TEMPLATES = {"gemma": GEMMA, "mistral": MISTRAL, "qwen3": QWEN3, "r1": R1}
SPECIALS = {"gemma": ["<start_of_turn>", "<end_of_turn>"], "r1": ["<|User|>", "<|Assistant|>"]}


def family(model_dir, name: str):
    """A fresh tiny tokenizer with the family's template (and its turn markers as special tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if name in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[name]
    if name in SPECIALS:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[name]})
    return tokenizer


def trained_text(tokenizer, tc) -> str:
    return tokenizer.decode([t for t, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m])


def _row(i: int, messages: list[dict], tools=None) -> dict:
    return {"id": f"{i:04x}", "source": "data/raw/x.jsonl", "line": i + 1, "format": "messages",
            "messages": messages, "tools": tools, "meta": {}}


SYSTEM = {"role": "system", "content": "You classify support tickets."}
Q = {"role": "user", "content": "My card was charged twice."}
A = {"role": "assistant", "content": '{"category": "billing"}'}


@pytest.mark.parametrize("name, expected", [
    ("chatml", (True, False, True)), ("gemma", (False, True, False)), ("mistral", (False, True, False)),
    ("qwen3", (True, False, True)), ("r1", (True, False, True)),
])
def test_profile_says_what_each_template_can_render(tiny_model_dir, name, expected):
    p = chat.profile(family(tiny_model_dir, name))
    assert (p.system, p.alternation, p.opening_assistant) == expected


@pytest.mark.parametrize("name, text, changes", [
    ("gemma", "<|im_start|><start_of_turn>user\nYou classify support tickets.\n\nMy card was charged twice."
              '<end_of_turn>\n<start_of_turn>model\n{"category": "billing"}<end_of_turn>\n', ("system_merged",)),
    ("mistral", "<|im_start|>[INST] You classify support tickets.\n\nMy card was charged twice. [/INST]"
                '{"category": "billing"}<|im_end|>', ("system_merged",)),
    ("chatml", "<|im_start|>system\nYou classify support tickets.<|im_end|>\n<|im_start|>user\nMy card was charged "
               'twice.<|im_end|>\n<|im_start|>assistant\n{"category": "billing"}<|im_end|>\n', ()),
])
def test_system_text_goes_into_the_first_user_turn_where_there_is_no_system_role(tiny_model_dir, name, text, changes):
    tokenizer = family(tiny_model_dir, name)
    tc = tokenize_conversation(tokenizer, [SYSTEM, Q, A])
    assert tc.text == text and tc.changes == changes
    assert trained_text(tokenizer, tc) == A["content"] + ("<end_of_turn>" if name == "gemma" else "<|im_end|>")


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_consecutive_same_role_turns_are_merged_for_strict_alternation(tiny_model_dir, name):
    tokenizer = family(tiny_model_dir, name)
    messages = [Q, {"role": "user", "content": "Please refund."}, A, {"role": "assistant", "content": "Done."}]
    tc = tokenize_conversation(tokenizer, messages)
    assert "My card was charged twice.\n\nPlease refund." in tc.text and tc.changes == ("turns_merged",)
    end = "<end_of_turn>" if name == "gemma" else "<|im_end|>"
    assert trained_text(tokenizer, tc) == A["content"] + "\n\nDone." + end


def test_turns_of_different_weight_cannot_be_merged(tiny_model_dir):
    tokenizer = family(tiny_model_dir, "mistral")
    messages = [Q, {**A, "weight": 0}, {"role": "assistant", "content": "Done."}]
    result = fmt.format_rows([_row(0, messages)], tokenizer, FormatConfig())
    (bad,) = result.quarantine
    assert bad["rule"] == "template" and "differ in weight" in bad["reason"] and not result.rows


GREETING = {"role": "assistant", "content": "Hello! How can I help?"}


@pytest.mark.parametrize("name, kept", [("chatml", True), ("qwen3", True), ("gemma", False), ("mistral", False)])
def test_an_opening_assistant_greeting_is_kept_where_the_template_renders_it(tiny_model_dir, name, kept):
    tokenizer = family(tiny_model_dir, name)
    result = fmt.format_rows([_row(0, [SYSTEM, GREETING, Q, A])], tokenizer, FormatConfig())
    (out,) = result.rows
    tc = tokenize_conversation(tokenizer, out["messages"])
    assert (GREETING["content"] in tc.text) == kept
    assert result.rendering[chat.OPENING_ASSISTANT] == (0 if kept else 1)
    assert out["messages"] == [SYSTEM, GREETING, Q, A]  # the row keeps what the user wrote


def test_a_refusal_is_named_as_the_templates_not_as_a_length_problem(tmp_path, tiny_model_dir):
    tokenizer = family(tiny_model_dir, "mistral")
    tool_chat = [Q, {"role": "assistant", "content": '{"name": "refund"}'}, {"role": "tool", "content": "{}"}, A]
    result = fmt.format_rows([_row(0, tool_chat), _row(1, [SYSTEM, Q, A])], tokenizer, FormatConfig())
    (bad,) = result.quarantine
    assert bad["rule"] == "template" and "Conversation roles must alternate" in bad["reason"]  # the template's text
    assert [r["id"] for r in result.rows] == ["0001"]
    params = _project(tmp_path, tiny_model_dir, "mistral", [_row(i, tool_chat) for i in range(3)])
    with pytest.raises(StageError, match=r"3 of 3 quarantined by rule 'template' \(first: the chat template refuses "
                                         r"this row: Conversation roles must alternate user/assistant") as err:
        fmt.run(params, workers=1)
    assert "max_length" not in str(err.value)


def _project(tmp_path, model_dir, name: str, rows: list[dict], **format_overrides):
    overrides = tiny_overrides(model_dir)
    overrides["format"] = {**overrides["format"], **format_overrides}
    params = load_params(write_project(tmp_path, overrides))
    family(model_dir, name).save_pretrained(params.path("base_model"))
    for weights in model_dir.glob("*.safetensors"):
        shutil.copy(weights, params.path("base_model"))
    write_jsonl(params.path("cleaned") / "examples.jsonl", rows)
    return params


def test_gemma_style_template_formats_every_demo_like_row(tmp_path, tiny_model_dir):
    """Every demo row has a system prompt: with a Gemma-style template all of them used to be quarantined."""
    rows = [_row(i, [SYSTEM, {"role": "user", "content": f"Ticket {i}: my card was charged twice."}, A])
            for i in range(5)]
    params = _project(tmp_path, tiny_model_dir, "gemma", rows)
    result = fmt.run(params, workers=1)
    report = read_json(params.path("formatted") / "report.json")
    assert result.metrics["rows_out"] == 5 and report["quarantined"] == 0
    assert report["rendering"]["system_merged"] == 5
    tokenizer = AutoTokenizer.from_pretrained(params.path("base_model"))
    (example,) = evaluate.build_examples(rows[:1], tokenizer)  # the evaluation prompt is adapted alike
    assert example.prompt.endswith("You classify support tickets.\n\nTicket 0: my card was charged twice."
                                   "<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in evaluate.stop_token_ids(None, tokenizer)


def test_gemma_style_tools_reach_the_first_user_turn(tiny_model_dir):
    tokenizer = family(tiny_model_dir, "gemma")
    tool = {"name": "refund", "parameters": {"type": "object"}}
    tc = tokenize_conversation(tokenizer, [Q, A], tools=[tool])
    assert tc.text.startswith("<|im_start|><start_of_turn>user\n# Tools\n\n")
    assert '<tools>\n{"name": "refund", "parameters": {"type": "object"}}\n</tools>\n\nMy card' in tc.text
    assert tc.changes == ("tools_in_system", "system_merged")


THINK_CHAT = [SYSTEM, Q, {"role": "assistant", "content": "<think>\nA double charge.\n</think>\n\nbilling"},
              {"role": "user", "content": "The app crashes."},
              {"role": "assistant", "content": "<think>bug</think>bug"}]
EXPECTED_TURNS = {  # what each family generates for each trained turn, end-of-turn token included
    "qwen3": ["<think>\nA double charge.\n</think>\n\nbilling<|im_end|>", "<think>\nbug\n</think>\n\nbug<|im_end|>"],
    "r1": ["<think>\nA double charge.\n</think>\n\nbilling<|im_end|>", "<think>bug</think>bug<|im_end|>"],
}


@pytest.mark.parametrize("name", ["qwen3", "r1"])
def test_history_rewriting_templates_get_one_row_per_trained_turn(tiny_model_dir, name):
    tokenizer = family(tiny_model_dir, name)
    with pytest.raises(chat.NotPrefixStable):
        tokenize_conversation(tokenizer, THINK_CHAT)
    result = fmt.format_rows([_row(0, THINK_CHAT), _row(1, THINK_CHAT[:3])], tokenizer, FormatConfig())
    assert [r["id"] for r in result.rows] == ["0000-1", "0000-2", "0001"] and not result.quarantine
    assert result.expanded == 1 and result.rendering[fmt.HISTORY_EXPANDED] == 1
    first, second, single = result.rows
    assert first["messages"] == THINK_CHAT[:3] and first["expanded_from"] == "0000"
    assert second["messages"][2] == {**THINK_CHAT[2], "weight": 0} and second["messages"][3:] == THINK_CHAT[3:]
    for row, expected in zip([first, second], EXPECTED_TURNS[name], strict=True):
        tc = tokenize_conversation(tokenizer, row["messages"])
        assert trained_text(tokenizer, tc) == expected and row["n_completion_tokens"] == tc.n_completion_tokens
        example, _ = encode_example(tokenizer, row, max_length=512)  # the train stage sees the same
        assert tokenizer.decode([t for t in example["labels"] if t != -100]) == expected
    history = tokenize_conversation(tokenizer, second["messages"]).text
    assert "A double charge" not in history and "billing" in history  # earlier reasoning as the template drops it
    (example,) = evaluate.build_examples([second], tokenizer)
    assert "A double charge" not in example.prompt and example.reference == THINK_CHAT[4]["content"]
    assert single["id"] == "0001" and "expanded_from" not in single  # stable rows are not expanded


@pytest.mark.parametrize("name", ["qwen3", "r1"])
def test_prompt_completion_output_trains_the_last_turn_without_expanding(tiny_model_dir, name):
    tokenizer = family(tiny_model_dir, name)
    result = fmt.format_rows([_row(0, THINK_CHAT)], tokenizer, FormatConfig(output="prompt_completion"))
    (out,) = result.rows
    assert out["completion"].startswith(EXPECTED_TURNS[name][1].removesuffix("<|im_end|>"))
    assert "A double charge" not in out["prompt"] and result.expanded == 0


def test_expanded_rows_go_through_the_format_stage(tmp_path, tiny_model_dir):
    params = _project(tmp_path, tiny_model_dir, "qwen3", [_row(0, THINK_CHAT), _row(1, [SYSTEM, Q, A])])
    result = fmt.run(params, workers=1)
    data = list(read_jsonl(params.path("formatted") / "dataset.jsonl"))
    report = read_json(params.path("formatted") / "report.json")
    assert [r["id"] for r in data] == ["0000-1", "0000-2", "0001"]
    assert (report["rows_in"], report["rows_out"], report["expanded_rows"]) == (2, 3, 1)
    assert report["rendering"]["history_expanded"] == 1 and result.metrics["rows_out"] == 3
