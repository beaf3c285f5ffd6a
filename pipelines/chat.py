"""Chat-template rendering and tokenisation with an exact assistant-token mask.

One function, `tokenize_conversation`, is the single source of truth for how a conversation becomes
tokens: the formatting stage uses it for token counts and length policy, the training stage for
input_ids and the loss mask, the evaluation stage for prompts. It works with any chat template
(no `{% generation %}` markers needed): each assistant turn's text is located by rendering the
conversation up to that turn with and without it, and the tokens whose characters fall inside it
are the ones the loss is computed on, up to and including the end-of-turn token (so the model learns
to stop), excluding the whitespace a template puts after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render this conversation as a prefix-stable sequence."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token is trained on (assistant text + end-of-turn), else 0
    text: str  # the full rendered conversation

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_completion_tokens(self) -> int:
        return sum(self.assistant_mask)


def _template_kwargs(tools: str | list | None) -> dict[str, Any]:
    if not tools:
        return {}
    parsed = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": parsed if isinstance(parsed, list) else [parsed]}


def render(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
           add_generation_prompt: bool = False) -> str:
    """The conversation as the model sees it (a string), via the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **_template_kwargs(tools)
    )


def render_prompt(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None) -> str:
    """Everything before the last assistant turn, ending with the assistant generation header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], tools=tools, add_generation_prompt=True)


def assistant_spans(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
                    only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant turns to train on."""
    text = render(tokenizer, messages, tools=tools)
    spans: list[tuple[int, int]] = []
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if only_last:
        indices = indices[-1:]
    for i in indices:
        before = render(tokenizer, messages[:i], tools=tools, add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], tools=tools)
        if not text.startswith(through) or not through.startswith(before):
            raise TemplateError(
                "the chat template does not render conversations as stable prefixes "
                f"(turn {i}); use a template without history-dependent rewriting"
            )
        start, end = len(before), len(through)
        while end > start and through[end - 1].isspace():  # the newline after <|im_end|> is not generated
            end -= 1
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
                          only_last: bool = False) -> TokenizedConversation:
    """Token ids of the rendered conversation and a mask that is 1 on assistant tokens (EOS included)."""
    text, spans = assistant_spans(tokenizer, messages, tools=tools, only_last=only_last)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    k = 0  # spans and token offsets are both in text order: one pass over each
    for start, end in enc["offset_mapping"]:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start and end <= spans[k][1] and end > start
        mask.append(1 if inside else 0)
    return TokenizedConversation(list(enc["input_ids"]), mask, text)
