"""Metric functions on literals: exact match, ROUGE-L, JSON task metrics, bootstrap intervals, summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.metrics import (
    ModelScores,
    bootstrap_ci,
    exact_match,
    json_fields,
    paired_bootstrap_ci,
    parse_json_object,
    rouge_l,
    score_example,
    summarise,
    weighted_mean,
)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris", "Paris", 1.0),
    ("  Paris\n", "Paris", 1.0),
    ("paris", "Paris", 0.0),
    ("Paris.", "Paris", 0.0),
    ("", "", 1.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat", "the cat sat on the mat", 2 * (1.0 * 0.5) / 1.5),  # P=3/3, R=3/6
    ("dog", "the cat sat", 0.0),
    ("我爱你", "我爱你", 1.0),  # no [a-z0-9] tokens, but identical
    ("", "the cat", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_is_order_sensitive_unlike_bag_of_words():
    assert rouge_l("mat the on sat cat the", "the cat sat on the mat") == pytest.approx(0.5)  # LCS 3 of 6


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('  {"a": [1, 2]}\n', {"a": [1, 2]}),
    ("[1, 2]", None),  # a list is not an object
    ('{"a": 1} trailing', None),
    ("```json\n{\"a\": 1}\n```", None),  # fenced JSON is not JSON
    ("", None),
    ("null", None),
])
def test_parse_json_object(text, expected):
    assert parse_json_object(text) == expected


def test_json_fields_compare_values_per_reference_key():
    reference = {"category": "billing", "priority": "high", "tags": ["a"]}
    assert json_fields('{"category": "billing", "priority": "low", "extra": 1, "tags": ["a"]}', reference) == {
        "category": 1.0, "priority": 0.0, "tags": 1.0}
    assert json_fields("not json", reference) == {"category": 0.0, "priority": 0.0, "tags": 0.0}


def test_score_example_adds_json_metrics_only_for_json_references():
    json_ref = score_example('{"category": "billing", "priority": "low"}',
                             '{"category": "billing", "priority": "high"}')
    assert json_ref["json_valid"] == 1.0
    assert json_ref["field_accuracy"] == 0.5
    assert json_ref["exact_match"] == 0.0
    assert json_ref["fields"] == {"category": 1.0, "priority": 0.0}
    invalid = score_example("category: billing", '{"category": "billing"}')
    assert invalid["json_valid"] == 0.0 and invalid["field_accuracy"] == 0.0
    text = score_example("hello there", "hello world")
    assert "json_valid" not in text and "field_accuracy" not in text


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.3, size=20).astype(float)
    large = rng.binomial(1, 0.3, size=2000).astype(float)
    ci_small = bootstrap_ci(small, samples=500)
    ci_large = bootstrap_ci(large, samples=500)
    assert ci_small.low <= small.mean() <= ci_small.high
    assert ci_large.low <= large.mean() <= ci_large.high
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 4  # ~1/sqrt(100)
    assert bootstrap_ci(small, samples=500) == ci_small  # seeded: reproducible


def test_bootstrap_ci_wider_at_higher_confidence():
    values = np.linspace(0, 1, 50)
    narrow, wide = bootstrap_ci(values, confidence=0.8), bootstrap_ci(values, confidence=0.99)
    assert wide.low < narrow.low and wide.high > narrow.high


def test_weighted_bootstrap_is_a_ratio_of_sums():
    # two examples: 1 token at loss 10, 9 tokens at loss 0 -> token-weighted loss 1, not 5
    assert weighted_mean([10.0, 0.0], [1, 9]) == pytest.approx(1.0)
    ci = bootstrap_ci([10.0, 0.0], [1, 9], samples=400)
    assert 0.0 <= ci.low <= 1.0 <= ci.high <= 10.0


def test_paired_ci_is_tighter_than_the_unpaired_difference():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1, size=200)  # shared per-example variance
    base = difficulty
    tuned = difficulty + 0.1 + rng.normal(0, 0.05, size=200)
    paired = paired_bootstrap_ci(base, tuned, samples=500)
    assert 0.05 < paired.low < 0.1 < paired.high < 0.15
    ci_t, ci_b = bootstrap_ci(tuned), bootstrap_ci(base)
    unpaired_width = (ci_t.high - ci_t.low) + (ci_b.high - ci_b.low)
    assert paired.high - paired.low < unpaired_width / 5


def test_paired_ci_rejects_unpaired_input():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_empty_input_gives_nan_interval():
    assert math.isnan(bootstrap_ci([]).low)


def test_summarise_aggregates_both_models_with_cis_and_paired_delta():
    references = ['{"category": "billing", "priority": "high"}', '{"category": "login", "priority": "low"}',
                  "Eat well, sleep, exercise.", "Paris"]
    base = ModelScores(predictions=["billing high", '{"category": "login"}', "Sleep.", "London"],
                       nll_sum=[8.0, 6.0, 4.0, 2.0], n_tokens=[4, 4, 2, 2])
    tuned = ModelScores(predictions=[references[0], '{"category": "login", "priority": "high"}', "Eat well.", "Paris"],
                        nll_sum=[2.0, 2.0, 2.0, 1.0], n_tokens=[4, 4, 2, 2])
    summary, base_scores, tuned_scores = summarise(references, base, tuned, samples=200)
    assert summary["base"]["exact_match"] == 0.0
    assert summary["fine_tuned"]["exact_match"] == 0.5
    assert summary["delta"]["exact_match"] == 0.5
    assert summary["base"]["loss"] == pytest.approx(20 / 12)  # token-weighted
    assert summary["fine_tuned"]["perplexity"] == pytest.approx(math.exp(7 / 12))
    assert summary["n_json"] == 2
    assert summary["base"]["json_valid"] == 0.5 and summary["fine_tuned"]["json_valid"] == 1.0
    assert summary["fine_tuned"]["field_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert summary["per_field"]["priority"] == {"base": 0.0, "fine_tuned": 0.5, "delta": 0.5, "n": 2}
    for model in ("base", "fine_tuned"):
        for name, value in summary[model].items():
            ci = summary["ci"][model][name]
            assert ci["low"] <= value + 1e-12 and value <= ci["high"] + 1e-12, name
    assert summary["ci"]["delta"]["loss"]["high"] < 0  # fine-tuned loss lower in every resample
    assert summary["ci"]["delta"]["perplexity"]["high"] < 0
    for name, delta in summary["delta"].items():
        ci = summary["ci"]["delta"][name]
        assert ci["low"] - 1e-12 <= delta <= ci["high"] + 1e-12, name
    assert len(base_scores) == len(tuned_scores) == 4


def test_summarise_without_json_references_has_no_json_metrics():
    scores = ModelScores(predictions=["a"], nll_sum=[1.0], n_tokens=[1])
    summary, _, _ = summarise(["b"], scores, scores, samples=100)
    assert "json_valid" not in summary["base"] and summary["n_json"] == 0 and summary["per_field"] == {}
