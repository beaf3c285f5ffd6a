"""Library internals behind one fence: every private name of TRL or transformers the project relies on.

    python -m pipelines.fence        # check each internal against the installed libraries; exit 1 if one moved

The training stage's CPU speed-ups and its exact resume reach into names that TRL and transformers do not
document as public API. Each is listed in `INTERNALS` with what the project relies on and a probe that checks it
on the installed version; code elsewhere gets them only through the accessors below, never by importing them
itself. `SUPPORTED` is the version range these were tested on, pinned in pyproject.toml too.

tests/test_fence.py runs every probe and FAILS when a name moved or changed shape (a silent slowdown, or a resume
that trains on other batches, is worse than a red test); at run time the training stage instead logs a warning
and falls back to the library's own path where one exists (`available()`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The versions the internals below were tested on; pyproject.toml pins the same ranges.
SUPPORTED = {"trl": ">=1.16,<1.17", "transformers": ">=5.23,<5.24"}


class InternalMoved(RuntimeError):
    """A library no longer has an internal name this project relies on (or it changed shape)."""


@dataclass(frozen=True)
class Internal:
    key: str  # the name the project uses for it
    library: str  # PyPI distribution
    path: str  # module:attribute
    relied_on: str  # what the project relies on (read by a person when the probe fails)
    probe: Callable[[Any], str | None]  # the resolved object -> None if it still has the expected shape

    def resolve(self) -> Any:
        module, _, attribute = self.path.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        return obj

    def problem(self) -> str | None:
        """None if the internal is there with the expected shape, else what is wrong (one sentence)."""
        version = _version(self.library)
        try:
            obj = self.resolve()
        except (ImportError, AttributeError) as exc:
            return (f"{self.library} {version} has no {self.path} ({exc}); the project relies on it for: "
                    f"{self.relied_on}")
        shape = self.probe(obj)
        if shape:
            return f"{self.library} {version}: {self.path} {shape}; the project relies on it for: {self.relied_on}"
        return None


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _parameters(*names: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return "is not callable"
        missing = [n for n in names if n not in params]
        return f"lost the parameters {', '.join(missing)}" if missing else None

    return probe


def _fields(*names: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        have = getattr(obj, "__dataclass_fields__", {})
        missing = [n for n in names if n not in have]
        return f"lost the fields {', '.join(missing)}" if missing else None

    return probe


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "use_triton", "trl", "trl.trainer.utils:_use_triton",
        "the switch that makes TRL's fused LM head score only labelled positions; replaced by one that says yes "
        "on CPU too (pipelines.cpu_speedups.score_only_label_positions)",
        _parameters("device"),
    ),
    Internal(
        "fused_output", "trl", "trl.trainer.utils:FusedCausalLMOutput",
        "the output contract of a model forward with fused_lm_head=True, which the CPU LM head returns "
        "(pipelines.cpu_speedups.plain_head_on_cpu)",
        _fields("loss", "log_probs", "entropy", "is_top1", "label_mask"),
    ),
    Internal(
        "padding_collator", "trl", "trl.trainer.sft_trainer:DataCollatorForLanguageModeling",
        "TRL's padding collator for pre-tokenised rows (input_ids + labels), wrapped by the counting collator; its "
        "padding_free mode (one flattened row, restarting position ids, no attention mask) for train.padding_free",
        _parameters("pad_token_id", "padding_free"),
    ),
    Internal(
        "length_grouped_sampler", "transformers", "transformers.trainer_pt_utils:LengthGroupedSampler",
        "the sampler of group_by_length, rebuilt with an epoch-seeded shuffle so a resumed run sees the same "
        "batches (its batch_size and lengths attributes and constructor)",
        _parameters("batch_size", "lengths", "generator"),
    ),
    Internal(
        "get_train_sampler", "transformers", "transformers:Trainer._get_train_sampler",
        "the Trainer method that builds the train sampler, wrapped per trainer instance for the epoch-seeded "
        "shuffle",
        _parameters("train_dataset"),
    ),
)
BY_KEY = {internal.key: internal for internal in INTERNALS}


def problems() -> list[str]:
    """One sentence per internal that moved or changed shape on the installed versions (empty: all fine)."""
    return [p for p in (internal.problem() for internal in INTERNALS) if p]


def available(key: str) -> bool:
    """True if the internal `key` is usable; otherwise log why (once per call) and return False."""
    problem = BY_KEY[key].problem()
    if problem:
        log.warning("%s; using the library's own path instead (tested range: %s)", problem,
                    ", ".join(f"{k} {v}" for k, v in SUPPORTED.items()))
    return problem is None


def get(key: str) -> Any:
    """The internal object `key`; InternalMoved (one sentence) if it is not there with the expected shape."""
    internal = BY_KEY[key]
    problem = internal.problem()
    if problem:
        raise InternalMoved(problem)
    return internal.resolve()


def patch_module_function(key: str, replacement: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace a module-level function internal by `replacement(original)`; idempotent; False if it moved."""
    if not available(key):
        return False
    module_name, _, attribute = BY_KEY[key].path.partition(":")
    module = importlib.import_module(module_name)
    current = getattr(module, attribute)
    if getattr(current, "_fenced_original", None) is not None:
        return True
    patched = replacement(current)
    patched._fenced_original = current  # type: ignore[attr-defined]
    setattr(module, attribute, patched)
    return True


def wrap_train_sampler(trainer: Any, wrap: Callable[[Any], Any]) -> bool:
    """Make `trainer` build its train sampler as wrap(default sampler) (this instance only); False if it moved."""
    if not (available("get_train_sampler") and available("length_grouped_sampler")):
        return False
    default = trainer._get_train_sampler  # looked up when the train dataloader is built
    trainer._get_train_sampler = lambda dataset=None: wrap(default(dataset))
    return True


def main() -> int:
    found = problems()
    for line in found:
        print(f"moved: {line}")
    if not found:
        print(f"every internal is in place ({len(INTERNALS)} checked; tested range: "
              f"{', '.join(f'{k} {v}' for k, v in SUPPORTED.items())})")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
