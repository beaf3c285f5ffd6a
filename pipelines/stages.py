"""The stage manifest: every lifecycle stage's facts, written once.

    python -m pipelines dvc-yaml            # write dvc.yaml from this manifest
    python -m pipelines dvc-yaml --check    # exit 1 if dvc.yaml differs from what this manifest gives

A `Stage` names the command (`python -m pipelines <name>`, also the DVC stage), the module whose
`run(params) -> StageResult` does the work, the params keys it reads, the `paths.*` keys it reads and writes,
the code its result depends on, and the Dagster asset that shows it (name, group, kinds, description). Everything
else is derived from it, so the three stay in step:

- `dvc.yaml` (`dvc_yaml()`): cmd, deps (input paths + code files), params, outs, metrics, plots;
- the Dagster assets (`assets/stage.py: stage_asset_def`): asset deps (the assets that write the input paths),
  code_version (a hash of the code files), DataVersion files (`versioned`), automation conditions;
- the command line (`pipelines/__main__.py`).

To add a stage: write `pipelines/<module>.py` with `run(params)`, append a `Stage` to `STAGES` (the order is the
lifecycle order), run `python -m pipelines dvc-yaml`, and add its asset checks in `assets/checks.py`.
`tests/test_stages.py` fails when dvc.yaml drifts from this file, when a stage reads a params key it does not
declare (keys are recorded while each stage runs on the tiny model), or when two stages write one path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ALIGN_TRAINING_KEYS

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    """One lifecycle stage. Path keys are the field names of `paths:` in params.yaml (pipelines/config.py)."""

    name: str  # the verb: `python -m pipelines <name>`; the DVC stage is the same with '-' -> '_'
    module: str  # the module with run(params) -> StageResult
    help: str  # one line for --help
    asset: str  # the Dagster asset (a noun for the thing that exists)
    group: str  # Dagster asset group: data | training | evaluation | export
    description: str  # the asset's description in the UI
    params: tuple[str, ...]  # params keys it reads (a section or a dotted key); its input/output paths are implied
    inputs: tuple[str, ...] = ()  # path keys it reads (written by earlier stages, or raw_dir)
    outputs: tuple[str, ...] = ()  # path keys it writes (DVC outs, cached)
    metrics: tuple[str, ...] = ()  # path keys it writes as DVC metrics (small JSON, in git, not cached)
    scratch: tuple[str, ...] = ()  # path keys it writes that are deliberately not versioned (checkpoints)
    # outputs DVC must not delete before the stage runs (`persist: true`): promote reads the folder it replaces
    # (the champion) and must leave it in place when it refuses a challenger
    persist: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # modules its result depends on besides `module` (helpers it calls)
    files: tuple[str, ...] = ()  # package data files its result depends on (e.g. the forgetting probe)
    kinds: tuple[str, ...] = ()  # Dagster kinds (icons in the UI)
    # DataVersion of the asset: (path key, file name inside that folder or None for the whole path); empty:
    # every file of the outputs except run records (timings, logs), which change on every rebuild.
    versioned: tuple[tuple[str, str | None], ...] = ()
    rebuild_on: tuple[str, ...] = ()  # assets whose new data version requests this one (retrain_sensor)
    uses_trainer: bool = False  # the asset gets the trainer resource's environment (device, precision, ...)
    plots: dict[str, Any] = field(default_factory=dict)  # DVC plots this stage writes (dvc.yaml top level)

    @property
    def dvc_name(self) -> str:
        return self.name.replace("-", "_")

    @property
    def code_modules(self) -> tuple[str, ...]:
        return (self.module, *self.code)

    def code_files(self) -> list[str]:
        """Source files (relative to the repository) of the stage's code, then its data files."""
        out = []
        for name in self.code_modules:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise ValueError(f"stage {self.name!r}: module {name!r} does not exist")
            out.append(Path(spec.origin).resolve().relative_to(PACKAGE_ROOT).as_posix())
        return out + [f"pipelines/{f}" for f in self.files]

    def declared_keys(self) -> tuple[str, ...]:
        """Every params key the stage may read: its params plus paths.<key> of its inputs and outputs."""
        paths = (*self.inputs, *self.outputs, *self.metrics, *self.scratch)
        return (*self.params, *(f"paths.{key}" for key in paths))


_SCHEMAS = "pipelines.schemas"

STAGES: tuple[Stage, ...] = (
    Stage(
        name="fetch-model", module="pipelines.base_model", asset="base_model", group="training",
        help="materialise the base model as a plain HF folder",
        description="The base model as a plain Hugging Face folder (safetensors, config, tokenizer with chat "
        "template), from params.model (offline default: SmolLM2-135M-Instruct converted from GGUF).",
        params=("model",), outputs=("base_model",), kinds=("huggingface", "safetensors"),
    ),
    Stage(
        name="ingest", module="pipelines.ingest", asset="raw_examples", group="data",
        help="read data/raw/ and normalise every row to one conversation schema",
        description="Every raw row normalised to one conversation schema (messages ending with an assistant "
        "turn); malformed rows go to quarantine.jsonl with file, line and reason.",
        params=("data.format", "data.system_prompt", "data.max_bad_fraction", "data.max_line_bytes",
                "data.follow_links", "data.replay", "clean.redact_pii"), inputs=("raw_dir",), outputs=("raw_examples",),
        code=("pipelines.pii", _SCHEMAS), files=("replay_general.jsonl",),
        kinds=("python", "pandas"), versioned=(("raw_examples", "examples.jsonl"),),
    ),
    Stage(
        name="clean", module="pipelines.clean", asset="cleaned_examples", group="data",
        help="normalise, redact PII, drop exact and near duplicates",
        description="Rows normalised (Unicode, HTML), PII redacted, exact and near duplicates removed; the "
        "per-rule counts of rows touched and removed are in the metadata.",
        params=("clean",), inputs=("raw_examples",), outputs=("cleaned",),
        code=("pipelines.pii", "pipelines.dedup", _SCHEMAS), kinds=("python", "pandas"),
        versioned=(("cleaned", "examples.jsonl"),),
    ),
    Stage(
        name="format", module="pipelines.format", asset="formatted_dataset", group="data",
        help="render with the chat template, count tokens, apply the length policy",
        description="Rows rendered with the base model's chat template, with token counts and the length "
        "policy applied (overlong rows dropped or their prompt truncated).",
        params=("format", "model.trust_remote_code"), inputs=("cleaned", "base_model"), outputs=("formatted",),
        code=("pipelines.chat", "pipelines.preflight", _SCHEMAS), kinds=("python", "pandas", "huggingface"),
        versioned=(("formatted", "dataset.jsonl"),),
    ),
    Stage(
        name="split", module="pipelines.split", asset="dataset_splits", group="data",
        help="deterministic train/validation/test split without leakage",
        description="Deterministic train / validation / test split; near-duplicate groups stay within one split "
        "so nothing leaks from training into evaluation. The train split alone is mixed: per-source weights and "
        "caps, balancing, replayed general data.",
        params=("split", "clean.num_perm", "clean.shingle_size", "clean.near_dup_threshold", "clean.boilerplate_share",
                "clean.own_similarity_ratio", "data.replay", "data.sources", "data.balance_by", "data.balance_rows",
                "paths.raw_dir"),  # data.sources globs are relative to paths.raw_dir
        inputs=("formatted",), outputs=("splits",), code=("pipelines.dedup", "pipelines.mixing", _SCHEMAS),
        files=("probe_general.jsonl",), kinds=("python", "pandas"),
        versioned=tuple(("splits", f"{name}.jsonl") for name in ("train", "validation", "test")),
    ),
    Stage(
        name="preference-data", module="pipelines.preferences", asset="preference_pairs", group="data",
        help="read preference pairs / labelled rows from data/raw/, clean them, split them by prompt",
        description="Preference rows (chosen/rejected pairs, KTO rows with a boolean label) from the raw files, "
        "cleaned by the clean stage's rules and split by prompt consistently with the SFT split (near-duplicate "
        "prompts grouped); bad pairs go to quarantine.jsonl with file, line and reason.",
        params=("data.system_prompt", "data.max_bad_fraction", "data.max_line_bytes", "data.follow_links", "clean",
                "split"),
        inputs=("raw_dir", "splits"), outputs=("preferences",),
        code=("pipelines.ingest", "pipelines.clean", "pipelines.pii", "pipelines.dedup", "pipelines.split",
              _SCHEMAS),
        kinds=("python", "pandas"),
        versioned=tuple(("preferences", f"{name}.jsonl") for name in ("train", "validation", "test")),
    ),
    Stage(
        name="train", module="pipelines.train", asset="lora_adapter", group="training",
        help="fine-tune the adapter with TRL SFTTrainer + peft",
        description="The fine-tuned adapter (peft format, or a whole model for train.method full / freeze) with "
        "tokenizer and run card, trained with TRL SFTTrainer on the train split by train.method (LoRA by default); "
        "per-step losses stream to the run log.",
        # paths.promoted: train.init_from may name it ('promoted'). The parent folder cannot be a DVC dep (promote
        # writes it after train: a cycle) and an optional dep cannot be declared; its content hash is in the run
        # hash, train_metrics.json and the run card (README "Continuing from an adapter").
        params=("train", "format.max_length", "model.trust_remote_code", "paths.promoted"),
        inputs=("splits", "base_model"), outputs=("adapter",), scratch=("checkpoints",),
        code=("pipelines.chat", "pipelines.cpu_speedups", "pipelines.checkpoints", "pipelines.runcard",
              "pipelines.preflight", "pipelines.methods", "pipelines.train_env"), kinds=("pytorch", "huggingface"),
        rebuild_on=("dataset_splits",), uses_trainer=True,
    ),
    Stage(
        name="evaluate", module="pipelines.evaluate", asset="evaluation_report", group="evaluation",
        help="base vs fine-tuned on the test split; report + metrics",
        description="Base model vs fine-tuned adapter on the held-out test split: exact match, ROUGE-L, loss, "
        "JSON validity with bootstrap confidence intervals, forgetting on a general probe set; with align.method "
        "none also the champion (the adapter promoted before) side by side; report.html/.md and metrics.json.",
        # paths.promoted: the champion, read as it is when the stage runs. Not a dep: promote writes it after this
        # stage (a cycle); a new champion does not by itself rerun evaluate (pipelines/champion.py).
        params=("evaluate", "train.method", "model.trust_remote_code", "align.method", "paths.promoted"),
        inputs=("adapter", "base_model", "splits", "formatted"), outputs=("evaluation",), metrics=("metrics",),
        code=("pipelines.metrics", "pipelines.report", "pipelines.chat", "pipelines.methods", "pipelines.champion",
              _SCHEMAS),
        files=("probe_general.jsonl",),
        kinds=("pytorch", "huggingface", "html"), versioned=(("metrics", None),), rebuild_on=("lora_adapter",),
        uses_trainer=True,
        plots={"loss_curves": {"template": "linear", "x": "step", "y": {
            "${paths.evaluation}/train_loss.csv": "train_loss", "${paths.evaluation}/eval_loss.csv": "eval_loss"}}},
    ),
    Stage(
        name="align", module="pipelines.align", asset="preference_adapter", group="training",
        help="preference-tune the SFT adapter (TRL DPO / KTO; ORPO / SimPO from trl.experimental)",
        description="The SFT adapter after preference tuning (TRL DPOTrainer / KTOTrainer, ORPO / SimPO from "
        "trl.experimental) on the preference pairs, with the SFT model as the reference; run card and per-step "
        "rewards. With align.method none, or no preference rows, it records why nothing was trained.",
        params=(*(f"align.{key}" for key in ALIGN_TRAINING_KEYS), "train.method", "format.max_length",
                "model.trust_remote_code"),
        inputs=("preferences", "adapter", "base_model"), outputs=("aligned_adapter",), scratch=("align_checkpoints",),
        code=("pipelines.train", "pipelines.train_env", "pipelines.chat", "pipelines.runcard"),
        kinds=("pytorch", "huggingface"),
        rebuild_on=("preference_pairs", "lora_adapter"), uses_trainer=True,
    ),
    Stage(
        name="evaluate-alignment", module="pipelines.evaluate_alignment", asset="alignment_report",
        group="evaluation",
        help="SFT vs aligned: held-out preference accuracy, task metrics, forgetting; the alignment gate",
        description="SFT vs aligned adapter: preference accuracy and reward margin on the held-out preference pairs, "
        "task metrics and the forgetting probe on the SFT test split, with paired bootstrap intervals; the alignment "
        "gate; the final candidate beside the champion (the adapter promoted before); report.html/.md and "
        "alignment_metrics.json.",
        # paths.promoted: the champion, read, not a dep (as for evaluate)
        params=("align.max_eval_pairs", "align.gate", "align.method", "evaluate", "model.trust_remote_code",
                "paths.promoted"),
        inputs=("aligned_adapter", "adapter", "base_model", "preferences", "splits"), outputs=("alignment",),
        metrics=("alignment_metrics",),
        code=("pipelines.evaluate", "pipelines.metrics", "pipelines.report", "pipelines.chat", "pipelines.champion",
              "pipelines.methods"),
        files=("probe_general.jsonl",), kinds=("pytorch", "huggingface", "html"),
        versioned=(("alignment_metrics", None),), rebuild_on=("preference_adapter",),
        plots={"reward_margins": {"template": "linear", "x": "step", "y": {
            "${paths.alignment}/reward_margins.csv": "reward_margin",
            "${paths.alignment}/eval_reward_margins.csv": "eval_reward_margin"}}},
    ),
    Stage(
        name="promote", module="pipelines.promote", asset="promoted_adapter", group="evaluation",
        help="copy the final adapter (aligned, or SFT without alignment) to the promoted folder if its gates passed",
        description="The adapter that passed the promotion gates (copied with PROMOTED.json): the aligned adapter "
        "when preference tuning ran and passed the alignment gate, the SFT adapter when there was no alignment; in "
        "either case not worse than the champion (the adapter promoted before) by more than "
        "evaluate.champion_margin. In a run it starts only after the blocking checks fine_tuned_beats_base and "
        "aligned_beats_sft passed; the stage re-applies every gate itself.",
        params=("evaluate.primary_metric", "evaluate.min_improvement", "evaluate.max_forgetting",
                "evaluate.champion_margin", "align.gate"),
        inputs=("metrics", "adapter", "alignment_metrics", "aligned_adapter"), outputs=("promoted",),
        persist=("promoted",),
        code=("pipelines.metrics", "pipelines.champion", "pipelines.methods", "pipelines.report"),
        kinds=("huggingface",),
        rebuild_on=("evaluation_report", "alignment_report"),
    ),
    Stage(
        name="merge", module="pipelines.merged_model", asset="merged_model", group="export",
        help="merge the promoted adapter into the base; check it reproduces base + adapter",
        description="The promoted adapter merged into the base model (peft merge_and_unload, fp32) as a plain "
        "Hugging Face folder with tokenizer, chat template, stop tokens and a model card; its logits and greedy "
        "answers on the first test prompts equal base + adapter's (MERGED.json).",
        params=("export.check_prompts", "export.max_new_tokens", "export.merge_tolerance", "model.trust_remote_code"),
        inputs=("promoted", "base_model", "splits"), outputs=("merged",),
        code=("pipelines.evaluate", "pipelines.chat", "pipelines.promote", "pipelines.runcard"),
        kinds=("huggingface", "safetensors"), rebuild_on=("promoted_adapter",),
    ),
    Stage(
        name="export-gguf", module="pipelines.gguf_model", asset="gguf_model", group="export",
        help="convert the merged model to GGUF with llama.cpp + an Ollama Modelfile; check it in llama-server",
        description="The merged model converted by llama.cpp's own convert_hf_to_gguf.py (f16 or bf16) and "
        "quantised by llama-quantize, with an Ollama Modelfile; each file's greedy answers in llama-server are "
        "compared with the merged model's (match rates and sizes in GGUF.json).",
        params=("export.check_prompts", "export.max_new_tokens", "export.float_type", "export.quant_type",
                "export.min_float_match", "export.min_quant_match", "export.push_to_hub", "export.hub_repo_id",
                "export.hub_private", "model.trust_remote_code"),
        inputs=("merged", "splits"), outputs=("gguf",),
        code=("pipelines.llama_cpp", "pipelines.merged_model", "pipelines.evaluate", "pipelines.chat",
              "pipelines.hub"),
        kinds=("llama.cpp", "gguf", "ollama"), rebuild_on=("merged_model",),
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
BY_ASSET: dict[str, Stage] = {stage.asset: stage for stage in STAGES}
RAW = "raw_dir"  # the one input no stage writes: the files users drop in (the observed raw_files asset)


def producer(path_key: str) -> Stage | None:
    """The stage that writes `paths.<path_key>` (None for raw_dir)."""
    for stage in STAGES:
        if path_key in stage.outputs or path_key in stage.metrics:
            return stage
    return None


def upstream_assets(stage: Stage) -> list[str]:
    """The assets this stage's asset depends on: the writers of its inputs ('raw_files' for raw_dir)."""
    deps = []
    for key in stage.inputs:
        writer = producer(key)
        name = "raw_files" if key == RAW else writer.asset if writer else None
        if name is None:
            raise ValueError(f"stage {stage.name!r} reads paths.{key}, which no stage writes")
        if name not in deps:
            deps.append(name)
    return deps


class _Flow(list):
    """A YAML sequence written inline: `y: [a, b]` keeps dvc.yaml short where a list is short."""


def _dump(data: dict[str, Any]) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)


DVC_HEADER = """\
# GENERATED from pipelines/stages.py by `python -m pipelines dvc-yaml`; edit the manifest, not this file
# (tests/test_stages.py fails when the two differ). Each stage runs `python -m pipelines <stage>`, the same
# run(params) the Dagster assets call. Paths are written once, in params.yaml, and templated here; `params:`
# lists exactly the keys each stage reads, so changing one knob re-runs only the stages downstream of it.
#   dvc repro            run what is stale (a no-op after a full run)
#   dvc exp run -S train.learning_rate=0.0005   an experiment with one knob changed
# paths.checkpoints (train's resume point after a crash) is deliberately not an output: DVC neither caches nor
# deletes it, so a fresh clone, or `dvc checkout` of another revision, does not see train as changed.
# train.init_from (continue from an adapter) names a folder that is NOT a dep of train: `promoted` is written by a
# later stage (a cycle) and a folder outside the pipeline is not tracked. DVC reruns train when the key's value
# changes, not when that folder's content does (`dvc repro -f train` then); the parent's content hash is in the
# run hash, in data/adapter/train_metrics.json (parent_weights_sha256) and in the run card.
# paths.promoted is also the champion that evaluate (align.method none) or evaluate-alignment measures beside the
# final candidate: it is READ when that stage runs, not a dep (promote writes it later: a cycle), so a new champion
# does not by itself rerun an evaluation; the next candidate is compared with whatever champion is promoted when it
# is evaluated, and promote refuses a comparison made with another champion (rerun the evaluation then).
"""


def dvc_yaml() -> str:
    """The text of dvc.yaml for STAGES."""
    stages: dict[str, Any] = {}
    plots: list[Any] = []
    for stage in STAGES:
        entry: dict[str, Any] = {"cmd": f"python -m pipelines {stage.name}"}
        deps = [f"${{paths.{key}}}" for key in stage.inputs] + stage.code_files()
        if deps:
            entry["deps"] = deps
        entry["params"] = [*stage.params, *(f"paths.{k}" for k in (*stage.outputs, *stage.metrics, *stage.scratch))]
        if stage.outputs:
            entry["outs"] = [{f"${{paths.{key}}}": {"persist": True}} if key in stage.persist else f"${{paths.{key}}}"
                             for key in stage.outputs]
        if stage.metrics:
            entry["metrics"] = [{f"${{paths.{key}}}": {"cache": False}} for key in stage.metrics]
        stages[stage.dvc_name] = entry
        plots += [{name: plot} for name, plot in stage.plots.items()]
    body = _dump({"stages": stages, "plots": plots} if plots else {"stages": stages})
    return DVC_HEADER + body


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines dvc-yaml", description="write dvc.yaml from the "
                                     "stage manifest (pipelines/stages.py)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if dvc.yaml differs")
    parser.add_argument("--file", default=str(PACKAGE_ROOT / "dvc.yaml"), help="the dvc.yaml to write or check")
    args = parser.parse_args(argv)
    path, text = Path(args.file), dvc_yaml()
    if args.check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'matches' if same else 'differs from'} pipelines/stages.py", file=sys.stderr)
        return 0 if same else 1
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0
