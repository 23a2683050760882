"""Intervals and paired tests of benchmark scores, against scipy's implementations and against coverage; the
per-document scores reproduce lmms-eval's own aggregates."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from masquant.evaluation.intervals import (
    bootstrap,
    interval,
    mcnemar_exact,
    paired_p_value,
    permutation_p_value,
    wilson,
)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (42, 100), (1, 1000), (517, 1000)])
def test_wilson_equals_scipys(k, n):
    lo, hi = wilson(k, n)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (12, 12), (40, 22), (1, 30)])
def test_mcnemar_exact_is_the_two_sided_binomial_test_on_discordant_pairs(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_paired_test_picks_mcnemar_for_right_wrong_scores_and_permutation_otherwise():
    a = [1.0] * 30 + [0.0] * 70
    b = [0.0] * 30 + [0.0] * 70
    p, test = paired_p_value(a, b)
    assert test == "mcnemar" and p == pytest.approx(stats.binomtest(0, 30, 0.5).pvalue)
    p, test = paired_p_value([v * 0.7 for v in a], b)
    assert test == "permutation" and p < 0.01
    p, test = paired_p_value(a, a)
    assert p == 1.0
    with pytest.raises(ValueError, match="same documents"):
        paired_p_value(a, b[:-1])


def test_permutation_test_holds_its_level_under_the_null():
    """Two runs drawn from the same distribution per document: p < 0.05 in about 5 % of 200 experiments."""
    rng = np.random.default_rng(0)
    rejections = 0
    for i in range(200):
        base = rng.random(60)
        a, b = base + rng.normal(0, 0.2, 60), base + rng.normal(0, 0.2, 60)
        rejections += permutation_p_value(a, b, resamples=400, seed=i) < 0.05
    assert 2 <= rejections <= 20, rejections


def test_permutation_test_finds_a_real_difference_of_ratios():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 30, 80).astype(float)
    edits_a = rng.binomial(words.astype(int), 0.10).astype(float)
    edits_b = rng.binomial(words.astype(int), 0.20).astype(float)
    assert permutation_p_value(edits_a, edits_b, words, words) < 0.01


def test_bootstrap_of_a_ratio_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = 0
    for i in range(200):
        words = rng.integers(3, 20, 50).astype(float)
        edits = rng.binomial(words.astype(int), 0.3).astype(float)
        lo, hi = bootstrap(edits, words, resamples=500, seed=i)
        hits += lo <= 0.3 <= hi
    assert 175 <= hits <= 199, hits


def test_interval_is_wilson_for_right_wrong_and_bootstrap_for_fractions():
    assert interval([1.0, 0.0, 1.0])[2] == "wilson"
    lo, hi, method = interval([1.0, 0.5, 0.0, 0.3] * 10)
    assert method == "bootstrap" and lo < 0.45 < hi
    assert interval([1.0, 0.0], [2.0, 3.0])[2] == "bootstrap"  # a ratio: weights given


def test_librispeech_scores_reproduce_lmms_evals_corpus_wer():
    """The per-document edits and words sum to lmms-eval's own librispeech_wer on the same records."""
    from lmms_eval.tasks.librispeech.utils import librispeech_wer

    from masquant.evaluation.tasks import doc_scores

    rnd = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "Mr.", "Smith's", "twenty-one", "ok", "I'm"]
    records = []
    for i in range(25):
        gt = " ".join(rnd.choice(vocab) for _ in range(rnd.randint(3, 12)))
        pred = " ".join(w for w in gt.split() if rnd.random() > 0.2) + (" extra" if rnd.random() < 0.3 else "")
        records.append({"doc_id": i, "wer": {"gt": gt, "pred": pred, "source": "x", "task": "asr_en"}})
    _, edits, words = doc_scores("librispeech_test_other", records)
    assert 100 * sum(edits) / sum(words) == pytest.approx(librispeech_wer([r["wer"] for r in records], None),
                                                          rel=1e-12)


def test_mmmu_scores_are_lmms_evals_judgements():
    from lmms_eval.tasks.mmmu.utils import evaluate_mmmu

    from masquant.evaluation.tasks import doc_scores

    records = [{"id": f"validation_Art_{i}", "subdomain": "Art", "question_type": "multiple-choice", "answer": a,
                "parsed_pred": p} for i, (a, p) in enumerate([("A", "A"), ("B", "C"), ("D", "D"), ("A", "B")])]
    _, values, weights = doc_scores("mmmu_val", [{"doc_id": i, "mmmu_acc": r} for i, r in enumerate(records)])
    assert values == [1.0, 0.0, 1.0, 0.0] and weights is None
    assert sum(values) / len(values) == pytest.approx(evaluate_mmmu(records)[1]["acc"])
