"""Lesion-type metrics of a score map (nnunetv2_dsm.evaluation.lesions) on arrays with known answers."""

import numpy as np
import pytest

from nnunetv2_dsm.evaluation.lesions import lesion_detection, lesion_scores, threshold_at_budget


def _case():
    body = np.zeros((6, 20, 20), dtype=bool)
    body[:, 2:18, 2:18] = True
    host = np.zeros_like(body)
    host[1:5, 4:14, 4:14] = True
    lesion = np.zeros_like(body)
    lesion[2:4, 5:7, 5:7] = True  # lesion 1
    lesion[2:4, 10:12, 10:12] = True  # lesion 2
    return lesion, host, body


def test_perfect_score():
    lesion, host, body = _case()
    result = lesion_scores(lesion, lesion.astype(np.float32), host, body)
    assert result.auroc_host == 1.0 and result.auroc_body == 1.0
    assert result.fpr95_host == 0.0 and result.fpr95_body == 0.0
    assert (result.detected, result.lesions) == (2, 2)
    assert result.dice == 1.0


def test_missed_lesion_and_budget():
    lesion, host, body = _case()
    rng = np.random.default_rng(0)
    score = rng.uniform(0.0, 0.5, lesion.shape)
    score[2:4, 5:7, 5:7] = 0.9  # lesion 1 found, lesion 2 scores like the background
    result = lesion_scores(lesion, score, host, body, fp_budget=0.0)
    assert (result.detected, result.lesions) == (1, 2)
    # with no false positive allowed the threshold is the highest background score
    assert result.threshold == pytest.approx(score[body & ~lesion].max())
    assert result.dice == pytest.approx(2 * 8 / (8 + 16))
    assert 0.5 < result.auroc_host < 1.0


def test_inverted_score_has_auroc_zero():
    lesion, host, body = _case()
    result = lesion_scores(lesion, -lesion.astype(np.float32), host, body)
    assert result.auroc_host == 0.0 and result.fpr95_host == 1.0
    assert result.detected == 0


def test_threshold_at_budget_counts_voxels_above():
    score = np.arange(100, dtype=np.float64)
    negatives = np.ones(100, dtype=bool)
    t = threshold_at_budget(score, negatives, 0.05)
    assert np.count_nonzero(score > t) == 5
    with pytest.raises(ValueError, match="fp_budget"):
        threshold_at_budget(score, negatives, 1.0)


def test_lesions_are_connected_components():
    lesion = np.zeros((5, 5, 5), dtype=bool)
    lesion[0, 0, 0] = lesion[1, 1, 1] = True  # diagonal neighbours: one lesion
    lesion[4, 4, 4] = True
    assert lesion_detection(lesion, lesion.astype(float), 0.5) == (2, 2)
    assert lesion_detection(np.zeros_like(lesion), lesion.astype(float), 0.5) == (0, 0)


def test_shape_mismatch_is_an_error():
    lesion, host, body = _case()
    with pytest.raises(ValueError, match="one shape"):
        lesion_scores(lesion, np.zeros((2, 2, 2)), host, body)
