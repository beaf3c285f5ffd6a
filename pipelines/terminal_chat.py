"""Chat with the fine-tuned model in a terminal: streamed tokens, the model's chat template, adapters switched live.

    python -m pipelines chat                          # the promoted adapter on the base model
    python -m pipelines chat --adapter none           # the base model alone
    python -m pipelines chat --adapter data/adapter   # any adapter folder (peft)
    python -m pipelines chat --model data/merged --adapter none   # the merged model

Commands inside the chat:
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (empty TEXT: none) and forget the conversation
    /adapter NAME   switch to `none`, `promoted`, `adapter` (paths.adapter) or an adapter folder; the base model
                    stays loaded: peft `load_adapter` adds a new one, `set_adapter` picks it, and `none`
                    generates inside `disable_adapter()`
    /adapters       list the loaded adapters
    /quit           leave (also Ctrl-D); Ctrl-C stops the answer being generated

Prompts are rendered with the tokenizer's own chat template (pipelines.chat.tokenize_prompt), decoding is greedy unless
--temperature > 0, and an answer stops at the template's end-of-turn token or the EOS
(pipelines.evaluate.stop_token_ids), exactly as in the evaluation. Tokens are printed as they are generated
(transformers' TextIteratorStreamer, generation in a background thread).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipelines.chat import tokenize_prompt
from pipelines.config import Params, load_params
from pipelines.errors import run_command
from pipelines.evaluate import _load_causal_lm, stop_token_ids
from pipelines.io import StageError
from pipelines.methods import safetensors_adapter

NONE = "none"
PROMPT = "you> "
REPLY = "assistant> "


def resolve_adapter(params: Params, name: str) -> tuple[str, Path | None]:
    """(display name, folder) for `none`, `promoted`, `adapter` or a folder path; StageError if it is not one."""
    if name in (NONE, "base"):
        return NONE, None
    if name in ("promoted", "adapter"):
        folder = params.path(name)
        if not folder.exists():
            stage = "promote" if name == "promoted" else "train"
            raise StageError(f"there is no {name} adapter in '{folder}'; run `python -m pipelines {stage}` first, or "
                             "pass --adapter none or --adapter PATH")
        display = name
    else:
        folder = Path(name).expanduser()
        if not folder.is_absolute() and not folder.exists():
            folder = params.root / folder
        display = folder.name
    if not (folder / "adapter_config.json").is_file():
        full = (folder / "config.json").is_file()
        what = (f"a full model, not an adapter: use --model {folder} --adapter none" if full
                else "not a peft adapter folder (no adapter_config.json)")
        raise StageError(f"'{name}' is {what}")
    return display, _safetensors_adapter(folder)


def _safetensors_adapter(folder: Path) -> Path:
    return safetensors_adapter(folder, "re-save the adapter with safe_serialization=True")


@dataclass
class ChatSession:
    """One model in memory (base + any number of peft adapters) and one conversation."""

    model: Any
    tokenizer: Any
    active: str = NONE  # adapter name, or NONE for the base model
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    max_new_tokens: int = 256
    temperature: float = 0.0

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}) or {})

    def use_adapter(self, name: str, folder: Path | None) -> str:
        """Switch to adapter `name` (loading it from `folder` once) or to the base model (NONE)."""
        from peft import PeftModel

        if name != NONE and name not in self.adapters:
            _safetensors_adapter(folder)  # checked again here: peft loads adapter_model.safetensors and nothing else
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
            self.model.eval()
        if name != NONE:
            self.model.set_adapter(name)
        self.active = name
        return name

    def messages(self, user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> list[int]:
        """The conversation + `user` as the model gets it: pipelines.chat.tokenize_prompt, the prompt of an (empty)
        assistant turn, so the template adaptations and the encoding are the evaluation's and training's (text
        such as "<|im_end|>" typed by the user stays text, not a control token)."""
        return tokenize_prompt(self.tokenizer, [*self.messages(user), {"role": "assistant", "content": ""}]).input_ids

    def stream(self, user: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer to `user` piece by piece as it is generated; the turn is added to the history."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = stop or threading.Event()

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stop.is_set()

        ids = torch.tensor([self.prompt_ids(user)])  # (1, prompt tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature}
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, eos_token_id=stop_token_ids(self.model,
                                  self.tokenizer), pad_token_id=self.tokenizer.pad_token_id, **sampling)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode(), self._adapter_context():
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([Interrupted()]))
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        pieces: list[str] = []
        ended = False
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
            ended = True
        finally:  # also on Ctrl-C or close(): stop the generation thread before the next turn uses the model
            if not ended:
                stop.set()
                for _ in streamer:  # up to the streamer's end mark, which generate() always puts
                    pass
            thread.join()
        if errors:
            raise errors[0]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def _adapter_context(self) -> Any:
        import contextlib

        if self.active == NONE and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def load_session(params: Params, *, model_dir: Path | None, adapter: str, max_new_tokens: int,
                 temperature: float) -> ChatSession:
    from transformers import AutoTokenizer

    base_dir = model_dir or params.path("base_model")
    if not base_dir.exists():
        raise StageError(f"model folder '{base_dir}' is missing; run `python -m pipelines fetch-model` first, or pass "
                         "--model PATH")
    name, folder = resolve_adapter(params, adapter)
    # The adapter's tokenizer is the one it was trained with (same as evaluation); the base's otherwise.
    tok_dir = folder if folder and (folder / "tokenizer_config.json").exists() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=params.model.trust_remote_code)
    session = ChatSession(_load_causal_lm(base_dir, params.model.trust_remote_code), tokenizer,
                          system=params.data.system_prompt, max_new_tokens=max_new_tokens, temperature=temperature)
    session.use_adapter(name, folder)
    return session


def repl(session: ChatSession, params: Params, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """The read-eval-print loop; returns the exit status. `read` raises EOFError at the end of input."""
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    say(f"model ready; adapter: {session.active}. /reset, /system TEXT, /adapter NAME, /adapters, /quit")
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            say("")
            return 0
        except KeyboardInterrupt:
            say("")
            return 0
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.history.clear()
            say("conversation cleared")
        elif command == "/system":
            session.system = argument.strip() or None
            session.history.clear()
            say(f"system prompt {'set' if session.system else 'removed'}; conversation cleared")
        elif command == "/adapters":
            say(f"loaded: {', '.join([NONE, *session.adapters])}; active: {session.active}")
        elif command == "/adapter":
            try:
                started = time.perf_counter()
                name = session.use_adapter(*resolve_adapter(params, argument.strip() or NONE))
                say(f"adapter: {name} ({time.perf_counter() - started:.1f} s, base model kept in memory)")
            except StageError as exc:
                say(f"error: {exc}")
        elif command.startswith("/"):
            say(f"unknown command {command}; use /reset, /system TEXT, /adapter NAME, /adapters or /quit")
        else:
            stop = threading.Event()
            out.write(REPLY)
            out.flush()
            pieces = session.stream(text, stop)
            try:
                for piece in pieces:
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                pieces.close()  # stops the generation; the unfinished turn is not kept
                out.write(" [stopped]")
            say("")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines chat", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--adapter", default="promoted", help="promoted (default), adapter, none, or a folder")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: paths.base_model)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines chat [...]`: load, then talk until /quit or end of input; a user error exits 2."""
    return run_command(command, parser().parse_args(argv), load_params)


def command(args: argparse.Namespace, params: Params) -> int:
    session = load_session(params, model_dir=args.model, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature)
    if sys.stdin.isatty():
        import readline  # noqa: F401 (line editing and history for input())
    return repl(session, params)
