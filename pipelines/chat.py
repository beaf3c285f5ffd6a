"""Chat-template rendering and tokenisation with an exact loss mask: how a conversation becomes tokens.

This module is the single source of truth for it: the format stage uses it for token counts and the
length policy, the train stage for input_ids and labels, the evaluate stage for generation prompts (as
token ids) and for the completion loss. It works with any chat template (no `{% generation %}`
markers needed):

1. The conversation is adapted to what the template can render (`prepare`), the way each model
   family's users expect; every adaptation is named in `TokenizedConversation.changes` and counted by
   the format stage's report:
   - `untrained_tail_dropped`: turns after the last trained assistant turn (an assistant turn with
     `"weight": 0` at the end) are not rendered: under causal attention they cannot change any loss.
   - `opening_assistant_dropped`: a conversation that opens with an assistant turn (a greeting), for a
     template that cannot render one (Gemma and Llama-2/Mistral demand that the user speaks first).
   - `system_merged`: system text goes to the start of the next user turn, separated by a blank line,
     for a template without a system role (one that raises on it, as Gemma's does, or drops its text).
     Gemma 3's own template does exactly this (its `first_user_prefix`).
   - `turns_merged`: consecutive turns of the same role are joined with a blank line, for a template
     that demands strict alternation (Llama-2, Mistral, Gemma: "Conversation roles must alternate").
   - `tools_in_system`: a row's tool schemas, when the template ignores `tools` (rendering with and
     without them gives the same text), are written into the system message in the Hermes function-
     calling convention that Qwen2.5's template also uses (NousResearch/Hermes-Function-Calling; the
     `# Tools` section of Qwen2.5's chat_template): one JSON schema per line inside `<tools></tools>`.
     See `tools_block`. Templates that render `tools` themselves are left to do so.
   - `control_token_text`: message text that contains the literal text of a special token
     (`<|im_end|>`, `</s>`, `<|eot_id|>`, ...) is encoded as ordinary text, exactly what
     `tokenizer.tokenize(text, split_special_tokens=True)` gives, while the special tokens the template
     itself writes stay special. So no stop or turn token appears where the template did not put one.
2. The trained assistant turns (`pipelines.schemas.trained`: weight 1 or absent) are located by
   rendering the conversation up to each of them with and without it; the tokens whose characters fall
   inside are the ones the loss is computed on, up to and including the end-of-turn token (so the model
   learns to stop), excluding the whitespace a template puts after it. A weight-0 assistant turn stays
   in the context with label -100. An opening assistant turn (a greeting before any user turn) is trained
   like every other, as TRL's `assistant_only_loss` and Axolotl's `roles_to_train` do; the text a template
   writes before it (a default system message such as SmolLM2's, the turn header) never is (see `_before`).

A template that rewrites history (Qwen3 and DeepSeek-R1 drop the `<think>...</think>` reasoning of
earlier turns) does not render a conversation as a sequence of stable prefixes: `NotPrefixStable` is
raised and the caller expands the row with `expand_turns` into one conversation per trained assistant
turn, each rendered exactly as the template renders history when that turn is generated (the
step-wise training of multi-turn reasoning data).
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import jinja2

from pipelines.schemas import trained

Message = dict[str, Any]

# What a chat template raises for a conversation it refuses: raise_exception() -> jinja2.TemplateError,
# a missing key or a wrong type -> the rest.
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError)

UNTRAINED_TAIL = "untrained_tail_dropped"
OPENING_ASSISTANT = "opening_assistant_dropped"
SYSTEM_MERGED = "system_merged"
TURNS_MERGED = "turns_merged"
TOOLS_IN_SYSTEM = "tools_in_system"
CONTROL_TEXT = "control_token_text"
CHANGES = (UNTRAINED_TAIL, OPENING_ASSISTANT, SYSTEM_MERGED, TURNS_MERGED, TOOLS_IN_SYSTEM, CONTROL_TEXT)


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render this conversation as the product needs it."""


class TemplateRefusal(TemplateError):
    """The chat template raised for this conversation after every adaptation; the message is its own text."""


class NotPrefixStable(TemplateError):
    """The template renders an earlier turn differently once later turns follow (it rewrites history)."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token is trained on (trained assistant text + end-of-turn), else 0
    text: str  # the full rendered conversation
    changes: tuple[str, ...] = ()  # the adaptations of `prepare` (and control_token_text) this row needed

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_completion_tokens(self) -> int:
        return sum(self.assistant_mask)


@dataclass
class TokenizedPrompt:
    """A generation prompt: everything before the last trained assistant turn + the assistant header."""

    input_ids: list[int]
    text: str
    changes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- template profile


@dataclass(frozen=True)
class TemplateProfile:
    """What a chat template can render, probed once per tokenizer and template text."""

    system: bool  # renders a system message's text (neither raises nor drops it)
    alternation: bool  # raises on two user turns in a row
    opening_assistant: bool  # renders a conversation whose first non-system turn is the assistant's
    specials: re.Pattern[str] | None  # the literal texts of the tokenizer's special tokens
    special_ids: frozenset[int]


_PROFILES: weakref.WeakKeyDictionary[Any, tuple[Any, TemplateProfile]] = weakref.WeakKeyDictionary()
_PROBE = "Zq7 probe"  # text no template adds on its own


def _renders(tokenizer: Any, messages: list[Message], needle: str) -> bool:
    try:
        return needle in _apply(tokenizer, messages, None, False)
    except RENDER_ERRORS:
        return False


def profile(tokenizer: Any) -> TemplateProfile:
    """The tokenizer's template profile (cached per tokenizer object, template text and vocabulary size)."""
    key = (getattr(tokenizer, "chat_template", None), len(tokenizer))  # a changed template or added token: re-probe
    cached = _PROFILES.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    system = _renders(tokenizer, [{"role": "system", "content": _PROBE}, user, answer], _PROBE)
    alternation = not _renders(tokenizer, [{"role": "user", "content": _PROBE}, user, answer], _PROBE)
    opening = _renders(tokenizer, [{"role": "assistant", "content": _PROBE}, user, answer], _PROBE)
    special = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(t, "special", False) and t.content}
    texts = sorted(set(special.values()), key=len, reverse=True)  # longest first: `</s>` before `<s>`
    pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
    result = TemplateProfile(system, alternation, opening, pattern, frozenset(special))
    _PROFILES[tokenizer] = (key, result)
    return result


# ------------------------------------------------------------------------------------------------ adaptation


def parse_tools(tools: str | list | dict | None) -> list | None:
    """The row's tool schemas as a list (a JSON string is parsed; ValueError when it is not JSON)."""
    if not tools:
        return None
    parsed = json.loads(tools) if isinstance(tools, str) else tools
    if not parsed:
        return None
    return parsed if isinstance(parsed, list) else [parsed]


def tools_block(tools: list) -> str:
    """The tool schemas as system-message text, in the Hermes function-calling convention.

    Source: NousResearch/Hermes-Function-Calling and the `# Tools` section of Qwen2.5's chat template,
    which render each schema as one JSON line (`tool | tojson`) inside `<tools></tools>`. The line that
    tells the model to wrap calls in `<tool_call>` tags is left out: the assistant turns of the row show
    the call format the model is trained on. The block is appended to the row's system message after a
    blank line, or becomes the system message of a row without one (a template's built-in default
    system text, such as SmolLM2's, is then not rendered for that row, as with any row that has a
    system message).
    """
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>")


@dataclass
class Prepared:
    """A conversation adapted to the template: what is rendered, the tools kwarg, the adaptations made."""

    messages: list[Message]
    tools: list | None
    changes: tuple[str, ...]


def _merge_system(messages: list[Message]) -> list[Message]:
    """Each system message's text prepended to the next user turn (blank-line separated)."""
    out: list[Message] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({**m, "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    if pending:  # no user turn follows: nothing to merge into, the template decides
        raise TemplateRefusal("the chat template has no system role and no user turn follows the system message")
    return out


def _merge_runs(messages: list[Message]) -> list[Message]:
    """Consecutive user (or assistant) turns joined with a blank line."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if prev is not None and prev["role"] == m["role"] and m["role"] in ("user", "assistant"):
            if trained(prev) != trained(m):
                raise TemplateRefusal("the chat template demands alternating roles, and two consecutive assistant "
                                      "turns differ in weight, so they cannot be merged into one")
            out[-1] = {**prev, "content": prev["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    return out


def _shape(prof: TemplateProfile, msgs: list[Message]) -> tuple[list[Message], list[str]]:
    """System text merged into the user turn and same-role runs merged, where the template needs it."""
    changes = []
    if not prof.system and any(m["role"] == "system" for m in msgs):
        msgs = _merge_system(msgs)
        changes.append(SYSTEM_MERGED)
    if prof.alternation:
        merged = _merge_runs(msgs)
        if len(merged) < len(msgs):
            msgs = merged
            changes.append(TURNS_MERGED)
    return msgs, changes


def _with_system_text(messages: list[Message], text: str) -> list[Message]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def prepare(tokenizer: Any, messages: list[Message], tools: str | list | dict | None = None) -> Prepared:
    """`messages` adapted to the tokenizer's template (see the module docstring); raises TemplateRefusal
    when an adaptation is impossible and ValueError when `tools` is not JSON."""
    prof = profile(tokenizer)
    changes: list[str] = []
    msgs = list(messages)
    last = max((i for i, m in enumerate(msgs) if trained(m)), default=None)
    if last is not None and last < len(msgs) - 1:
        msgs = msgs[: last + 1]
        changes.append(UNTRAINED_TAIL)
    if not prof.opening_assistant:
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
        end = next((i for i in range(first, len(msgs)) if msgs[i]["role"] != "assistant"), len(msgs))
        if end > first:
            msgs = msgs[:first] + msgs[end:]
            changes.append(OPENING_ASSISTANT)
    shaped, structural = _shape(prof, msgs)
    schemas = parse_tools(tools)
    if schemas is not None and _apply(tokenizer, shaped, schemas, False) == _apply(tokenizer, shaped, None, False):
        shaped, structural = _shape(prof, _with_system_text(msgs, tools_block(schemas)))
        schemas = None
        changes.append(TOOLS_IN_SYSTEM)
    return Prepared(shaped, schemas, tuple(changes + structural))


# ----------------------------------------------------------------------------------------- control-token text


@dataclass
class _Protected:
    """Messages whose special-token literals are replaced by sentinels, and how to undo it."""

    messages: list[Message]
    literals: list[str]  # literal text of each sentinel, by number
    open: str  # sentinel delimiters: characters that occur in no message
    close: str

    def restore(self, text: str) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """(real text, character ranges of the literals in it, [(end in sentinel text, shift)] for map_pos)."""
        if not self.literals:
            return text, [], []
        pattern = re.compile(re.escape(self.open) + r"(\d+)" + re.escape(self.close))
        parts: list[str] = []
        ranges: list[tuple[int, int]] = []
        shifts: list[tuple[int, int]] = []
        pos = shift = 0
        for match in pattern.finditer(text):
            parts.append(text[pos: match.start()])
            literal = self.literals[int(match.group(1))]
            start = match.start() + shift
            ranges.append((start, start + len(literal)))
            parts.append(literal)
            shift += len(literal) - (match.end() - match.start())
            shifts.append((match.end(), shift))
            pos = match.end()
        parts.append(text[pos:])
        return "".join(parts), ranges, shifts


def _map_pos(pos: int, shifts: list[tuple[int, int]]) -> int:
    """A position of the sentinel text (never inside a sentinel) in the real text."""
    k = bisect.bisect_right(shifts, (pos, float("inf"))) - 1
    return pos + (shifts[k][1] if k >= 0 else 0)


def _protect(prof: TemplateProfile, messages: list[Message]) -> _Protected:
    if prof.specials is None or not any(prof.specials.search(m["content"]) for m in messages):
        return _Protected(messages, [], "", "")
    seen = "".join(m["content"] for m in messages)
    open_, close = next((chr(c), chr(c + 1)) for c in range(0xF0000, 0xFFFFD, 2)
                        if chr(c) not in seen and chr(c + 1) not in seen)
    literals: list[str] = []

    def swap(match: re.Match[str]) -> str:
        literals.append(match.group(0))
        return f"{open_}{len(literals) - 1}{close}"

    out = [{**m, "content": prof.specials.sub(swap, m["content"])} for m in messages]
    return _Protected(out, literals, open_, close)


def _encode(tokenizer: Any, prof: TemplateProfile, text: str,
            plain: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; the characters in `plain` ranges are ordinary text.

    The tokenizer cuts text at special tokens and encodes the pieces between them independently, so
    re-encoding only the pieces that hold a `plain` range with split_special_tokens=True gives exactly
    the ids of plain text there and leaves every other token as the tokenizer made it.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if not plain:
        return ids, offsets

    def inside(start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in plain)

    edges = [k for k, t in enumerate(ids) if t in prof.special_ids and not inside(*offsets[k])]
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    for a, b in zip([-1, *edges], [*edges, len(ids)], strict=True):
        start = offsets[a][1] if a >= 0 else 0
        end = offsets[b][0] if b < len(ids) else len(text)
        if any(s < end and e > start for s, e in plain):
            sub = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            out_ids += sub["input_ids"]
            out_offsets += [(s + start, e + start) for s, e in sub["offset_mapping"]]
        else:
            out_ids += ids[a + 1: b]
            out_offsets += offsets[a + 1: b]
        if b < len(ids):
            out_ids.append(ids[b])
            out_offsets.append(offsets[b])
    return out_ids, out_offsets


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text` as plain message text (special-token literals are ordinary text)."""
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


# ---------------------------------------------------------------------------------------------- rendering


def _apply(tokenizer: Any, messages: list[Message], tools: list | None, add_generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def render(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
           add_generation_prompt: bool = False) -> str:
    """The conversation as the model sees it (a string): adapted by `prepare`, rendered by the template."""
    prep = prepare(tokenizer, messages, tools)
    return _apply(tokenizer, prep.messages, prep.tools, add_generation_prompt)


def _last_trained(messages: list[Message]) -> int:
    last = max((i for i, m in enumerate(messages) if trained(m)), default=None)
    if last is None:
        raise TemplateError("the conversation has no trained assistant turn (none, or every one has weight 0)")
    return last


def _before(tokenizer: Any, messages: list[Message], i: int, tools: list | None) -> str:
    """The rendered text before the content of turn i (an assistant turn): what the model is given to write it.

    For a later turn, the conversation before it rendered with the assistant generation header. For the first
    turn (an opening greeting) rendering no messages is not enough: a template may write text before the first
    turn only (SmolLM2's default system message when there is none), so it is the text the template writes
    before the content of that turn, found by rendering it with a probe in place of its content.
    """
    if i:
        return _apply(tokenizer, messages[:i], tools, True)
    probe = _apply(tokenizer, [{**messages[0], "content": _PROBE}], tools, False)
    if _PROBE not in probe:
        raise TemplateError("the chat template does not render the content of the opening assistant turn")
    return probe[: probe.index(_PROBE)]


def _spans(tokenizer: Any, messages: list[Message], tools: list | None,
           only_last: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the trained assistant turns."""
    text = _apply(tokenizer, messages, tools, False)
    indices = [i for i, m in enumerate(messages) if trained(m)]
    if only_last:
        indices = indices[-1:]
    spans: list[tuple[int, int]] = []
    for i in indices:
        before = _before(tokenizer, messages, i, tools)
        through = _apply(tokenizer, messages[: i + 1], tools, False)
        if not text.startswith(through) or not through.startswith(before):
            raise NotPrefixStable(
                f"the chat template renders turn {i} differently once later turns follow (it rewrites history)"
            )
        start, end = len(before), len(through)
        while end > start and through[end - 1].isspace():  # the newline after <|im_end|> is not generated
            end -= 1
        spans.append((start, end))
    return text, spans


def assistant_spans(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
                    only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text (as `render`) and the [start, end) character spans of the trained assistant turns."""
    prep = prepare(tokenizer, messages, tools)
    guarded = _protect(profile(tokenizer), prep.messages)
    text, spans = _spans(tokenizer, guarded.messages, prep.tools, only_last)
    real, _, shifts = guarded.restore(text)
    return real, [(_map_pos(s, shifts), _map_pos(e, shifts)) for s, e in spans]


def tokenize_conversation(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None,
                          only_last: bool = False) -> TokenizedConversation:
    """Token ids of the rendered conversation and a mask that is 1 on the trained assistant tokens (EOS
    included); only_last: only the last trained turn. Raises NotPrefixStable for a history-rewriting
    template, TemplateRefusal / RENDER_ERRORS when the template refuses the conversation."""
    prof = profile(tokenizer)
    prep = prepare(tokenizer, messages, tools)
    guarded = _protect(prof, prep.messages)
    text, spans = _spans(tokenizer, guarded.messages, prep.tools, only_last)
    real, plain, shifts = guarded.restore(text)
    spans = [(_map_pos(s, shifts), _map_pos(e, shifts)) for s, e in spans]
    ids, offsets = _encode(tokenizer, prof, real, plain)
    mask = []
    k = 0  # spans and token offsets are both in text order: one pass over each
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start and end <= spans[k][1] and end > start
        mask.append(1 if inside else 0)
    changes = prep.changes + ((CONTROL_TEXT,) if plain else ())
    return TokenizedConversation(ids, mask, real, changes)


def _prompt(tokenizer: Any, messages: list[Message],
            tools: str | list | None) -> tuple[str, list[tuple[int, int]], tuple[str, ...]]:
    """(prompt text, its control-text ranges, adaptations): the conversation before the last trained turn."""
    prep = prepare(tokenizer, messages, tools)
    last = _last_trained(prep.messages)
    guarded = _protect(profile(tokenizer), prep.messages[: last + 1])
    real, plain, _ = guarded.restore(_before(tokenizer, guarded.messages, last, prep.tools))
    return real, plain, prep.changes + ((CONTROL_TEXT,) if plain else ())


def tokenize_prompt(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None) -> TokenizedPrompt:
    """The generation prompt of the last trained assistant turn: the adapted conversation before it,
    rendered with the assistant generation header, as token ids (control-token text as plain text)."""
    text, plain, changes = _prompt(tokenizer, messages, tools)
    ids, _ = _encode(tokenizer, profile(tokenizer), text, plain)
    return TokenizedPrompt(ids, text, changes)


def render_prompt(tokenizer: Any, messages: list[Message], *, tools: str | list | None = None) -> str:
    """Everything before the last trained assistant turn, ending with the assistant generation header (text)."""
    return _prompt(tokenizer, messages, tools)[0]


def expand_turns(messages: list[Message]) -> list[list[Message]]:
    """One conversation per trained assistant turn: the turns up to it, the earlier assistant turns as
    context (weight 0). For templates that rewrite history (see NotPrefixStable)."""
    out = []
    for i, m in enumerate(messages):
        if trained(m):
            out.append([{**p, "weight": 0} if trained(p) else dict(p) for p in messages[:i]] + [dict(m)])
    return out
