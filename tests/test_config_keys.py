"""Every key whose allowed values are known is refused when params.yaml is loaded, in one sentence naming it.

Handed case 11 (a typo in evaluate.primary_metric, found only after training) is the first parameter. The keys
tightened here, and why each bound means something, are listed in pipelines/config.py next to each field.
Output paths (overlap, .git, the project folder) are tested in tests/test_output_ownership.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines import preflight as pf
from pipelines.config import ConfigError, load_params
from pipelines.metrics import METRICS
from tests.conftest import REPO, write_project

BAD = [
    pytest.param({"evaluate": {"primary_metric": "exact_mach"}}, "evaluate.primary_metric",
                 "use one of: exact_match, rouge_l, json_valid, field_accuracy, loss, perplexity", id="metric-typo"),
    pytest.param({"evaluate": {"min_improvement": 1.5}}, "evaluate.min_improvement",
                 "cannot be met or missed by exact_match", id="improvement-above-1"),
    pytest.param({"evaluate": {"primary_metric": "rouge_l", "min_improvement": -2}}, "evaluate.min_improvement",
                 "use a value in [-1, 1]", id="improvement-below-minus-1"),
    pytest.param({"model": {"source": "gguf_package", "name": "SmolLM2.gguf"}}, "model.name",
                 "'<python package>/<file.gguf>'", id="gguf-name"),
    pytest.param({"model": {"source": "hub", "name": "HuggingFaceTB/SmolLM2 135M"}}, "model.name",
                 "needs a Hugging Face repo id", id="hub-id-space"),
    pytest.param({"model": {"source": "hub", "name": "a/b/c"}}, "model.name", "one '/'", id="hub-id-two-slashes"),
    pytest.param({"model": {"source": "local", "name": " "}}, "model.name", "path of a folder", id="local-blank"),
    pytest.param({"model": {"revision": ""}}, "model.revision", "names no commit", id="revision-blank"),
    pytest.param({"data": {"system_prompt": "  \n"}}, "data.system_prompt", "quarantines every row",
                 id="system-prompt-blank"),
    pytest.param({"data": {"follow_links": "sometimes"}}, "data.follow_links", "valid boolean", id="follow-links"),
    pytest.param({"clean": {"min_chars": 200, "max_chars": 300}}, "clean.min_chars",
                 "keep max_chars >= 2 * min_chars", id="min-max-chars"),
    pytest.param({"split": {"stratify_by": "meta category"}}, "split.stratify_by", "dotted keys without spaces",
                 id="stratify-space"),
    pytest.param({"split": {"stratify_by": "meta..category"}}, "split.stratify_by", "e.g. meta.category",
                 id="stratify-empty-part"),
    pytest.param({"split": {"group_threshold": 0.9}}, "split.group_threshold",
                 "keep split.group_threshold <= clean.near_dup_threshold", id="group-above-dedup"),
    pytest.param({"train": {"lora": {"target_modules": []}}}, "train.lora.target_modules", "at least one module",
                 id="modules-empty"),
    pytest.param({"train": {"lora": {"target_modules": ["q_proj", " "]}}}, "train.lora.target_modules",
                 "no blank ones", id="modules-blank"),
    pytest.param({"train": {"lora": {"target_modules": "model.(q|v_proj"}}}, "train.lora.target_modules",
                 "does not compile", id="modules-regex"),
    pytest.param({"train": {"seed": 2**32}}, "train.seed", "less than or equal to 4294967295", id="seed-numpy"),
    pytest.param({"train": {"max_steps": 0}}, "train.max_steps", "or -1 to train for train.epochs", id="steps-0"),
    # issue 18: replay, multi-task mixing, chain-of-thought answers
    pytest.param({"data": {"replay": {"fraction": 0.95}}}, "data.replay.fraction", "less than or equal to 0.9",
                 id="replay-fraction-high"),
    pytest.param({"data": {"replay": {"fraction": -0.1}}}, "data.replay.fraction", "greater than or equal to 0",
                 id="replay-fraction-negative"),
    pytest.param({"data": {"replay": {"file": "../general.jsonl"}}}, "data.replay.file", "must stay inside it",
                 id="replay-file-outside"),
    pytest.param({"data": {"replay": {"file": "/abs/general.jsonl"}}}, "data.replay.file", "must stay inside it",
                 id="replay-file-absolute"),
    pytest.param({"data": {"replay": {"file": "general.txt"}}}, "data.replay.file", "ending in .jsonl",
                 id="replay-file-suffix"),
    pytest.param({"data": {"replay": {"file": "gen/*.jsonl"}}}, "data.replay.file", "not a glob", id="replay-glob"),
    pytest.param({"data": {"sources": [{"match": "a.jsonl", "weight": -1}]}}, "data.sources.0.weight",
                 "greater than or equal to 0", id="source-weight-negative"),
    pytest.param({"data": {"sources": [{"match": "a.jsonl", "max_rows": 0}]}}, "data.sources.0.max_rows",
                 "greater than or equal to 1", id="source-cap-0"),
    pytest.param({"data": {"sources": [{"weight": 2}]}}, "data.sources.0.match", "Field required",
                 id="source-without-match"),
    pytest.param({"data": {"sources": [{"match": "a.jsonl", "wieght": 2}]}}, "data.sources.0.wieght",
                 "allowed keys here: match, weight, max_rows", id="source-key-typo"),
    pytest.param({"data": {"sources": [{"match": "a.jsonl"}, {"match": "a.jsonl", "weight": 2}]}}, "data.sources",
                 "merge the two entries", id="source-listed-twice"),
    pytest.param({"data": {"sources": [{"match": "../x/*.jsonl"}]}}, "data.sources.0.match", "must stay inside it",
                 id="source-outside"),
    pytest.param({"data": {"balance_by": "meta category"}}, "data.balance_by", "dotted keys", id="balance-space"),
    pytest.param({"data": {"balance_rows": "median"}}, "data.balance_rows", "'min' or 'max'", id="balance-rows-word"),
    pytest.param({"data": {"balance_rows": 0}}, "data.balance_rows", "greater than or equal to 1", id="balance-rows-0"),
    pytest.param({"evaluate": {"breakdown_by": ["source", "source"]}}, "evaluate.breakdown_by", "listed twice",
                 id="breakdown-twice"),
    pytest.param({"evaluate": {"breakdown_by": ["meta..task"]}}, "evaluate.breakdown_by", "dotted keys",
                 id="breakdown-dotted"),
    pytest.param({"evaluate": {"answer_patterns": ["Answer: .+"]}}, "evaluate.answer_patterns",
                 "needs a capturing group", id="answer-no-group"),
    pytest.param({"evaluate": {"answer_patterns": ["Answer: (.+"]}}, "evaluate.answer_patterns", "does not compile",
                 id="answer-regex"),
    pytest.param({"evaluate": {"answer_patterns": ["(.*)"]}}, "evaluate.answer_patterns", "matches the empty text",
                 id="answer-empty-match"),
    pytest.param({"evaluate": {"reasoning_pattern": "<think>(.*?"}}, "evaluate.reasoning_pattern",
                 "does not compile", id="reasoning-regex"),
]


@pytest.mark.parametrize(("fragment", "key", "words"), BAD)
def test_a_bad_value_is_refused_at_load_naming_the_key(tmp_path, fragment, key, words):
    with pytest.raises(ConfigError) as err:
        load_params(write_project(tmp_path, fragment))
    message = str(err.value)
    assert "\n" not in message and key in message and words in message, message


GOOD = [
    pytest.param({"evaluate": {"primary_metric": name, "min_improvement": 1.0}}, id=f"metric-{name}")
    for name in METRICS if name not in ("loss", "perplexity")
] + [
    pytest.param({"evaluate": {"primary_metric": "loss", "min_improvement": 2.5}}, id="loss-any-improvement"),
    pytest.param({"evaluate": {"primary_metric": "perplexity", "min_improvement": 40}}, id="perplexity"),
    pytest.param({"evaluate": {"min_improvement": -1.0}}, id="improvement-minus-1"),
    pytest.param({"model": {"source": "hub", "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}},
                 id="hub-id"),
    pytest.param({"model": {"source": "hub", "name": "gpt2"}}, id="hub-id-no-org"),
    pytest.param({"model": {"source": "gguf_package", "name": "pkg/sub/model.gguf"}}, id="gguf-subfolder"),
    pytest.param({"data": {"system_prompt": "You answer briefly.", "follow_links": True}}, id="prompt-links"),
    pytest.param({"data": {"system_prompt": ""}}, id="prompt-empty-means-none"),
    pytest.param({"clean": {"min_chars": 10, "max_chars": 20}}, id="chars-exactly-twice"),
    pytest.param({"split": {"stratify_by": "meta.category", "group_threshold": 0.85}}, id="stratify-group-equal"),
    pytest.param({"train": {"lora": {"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"}}}, id="regex"),
    pytest.param({"train": {"seed": 2**32 - 1, "max_steps": -1}}, id="train-bounds"),
    pytest.param({"data": {"replay": {"fraction": 0.9, "file": "general/alpaca.csv"}}}, id="replay-bounds"),
    pytest.param({"data": {"replay": {"fraction": 0.0, "file": "general"}}}, id="replay-off"),
    pytest.param({"data": {"sources": [{"match": "tickets_*.jsonl", "weight": 0}, {"match": "**/x.csv", "weight": 2.5,
                                                                                    "max_rows": 1}]}}, id="sources"),
    pytest.param({"data": {"balance_by": "meta.category", "balance_rows": "max"}}, id="balance-max"),
    pytest.param({"data": {"balance_by": "source", "balance_rows": 1}}, id="balance-number"),
    pytest.param({"evaluate": {"breakdown_by": [], "reasoning_pattern": None, "answer_patterns": []}},
                 id="answers-off"),
    pytest.param({"evaluate": {"breakdown_by": ["source", "meta.task"], "reasoning_pattern": "(?s)<r>(.*?)</r>",
                               "answer_patterns": [r"#### (\S+)"]}}, id="answers-custom"),
]


def _holds(loaded, given) -> bool:
    """Does the loaded (dumped) value hold what the fragment gave: the same scalars, every key given of a mapping
    (the rest are defaults), the same list item by item."""
    if isinstance(given, dict):
        return isinstance(loaded, dict) and all(k in loaded and _holds(loaded[k], v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(loaded, list) and len(loaded) == len(given) and all(map(_holds, loaded, given))
    return loaded == given


@pytest.mark.parametrize("fragment", GOOD)
def test_good_values_at_the_bounds_load(tmp_path, fragment):
    params = load_params(write_project(tmp_path, fragment))
    assert _holds(params.model_dump(mode="json"), fragment)


def test_check_params_refuses_a_metric_typo_before_training(tmp_path):
    """Handed case 11: check-params, and any stage (the first of `dvc repro`), say it in one sentence."""
    path = write_project(tmp_path, {"evaluate": {"primary_metric": "exact_mach"}})
    for stage in ("check-params", "ingest"):
        run = subprocess.run([sys.executable, "-m", "pipelines", stage, "--params", str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.count("\n") == 1 and "'evaluate.primary_metric' = 'exact_mach'" in run.stderr
    assert not (tmp_path / "data" / "raw_examples").exists()


def test_report_to_needs_its_package_installed(tmp_path, monkeypatch):
    params = load_params(write_project(tmp_path, {"train": {"report_to": "mlflow"}}))
    from pipelines import methods

    monkeypatch.setitem(methods.TRACKER_MODULES, "mlflow", ("no_such_tracker_package",))
    with pytest.raises(ConfigError, match=r"train.report_to = 'mlflow' needs the Python package "
                                          r"no_such_tracker_package, which is not installed"):
        pf.preflight(params, "train")
    pf.preflight(params, "clean")  # only the train stage (and check-params) need it
    monkeypatch.setitem(methods.TRACKER_MODULES, "mlflow", ("json",))  # an installed module
    assert pf.preflight(params, "train") is None
