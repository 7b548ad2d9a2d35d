"""Post-hoc anomaly scores (MSP, max-logit, energy, SML) on logits with known answers."""

import math

import numpy as np
import pytest

from nnunetv2_dsm.evaluation.posthoc import (
    PosthocError,
    energy_score,
    max_logit_score,
    max_probability_score,
    score,
    sml_score,
    sml_statistics,
)

# Softmax model: channel 0 background, 1-2 organs, 3 a tumour (not organ evidence). Two voxels.
SOFTMAX = np.array([[0.0, 5.0], [math.log(3.0), 0.0], [0.0, 0.0], [9.0, 9.0]], dtype=np.float32)
ORGANS = [1, 2]


def test_max_softmax_probability_uses_the_softmax_over_all_channels():
    z = SOFTMAX[:, :1].astype(np.float64)
    p = np.exp(z) / np.exp(z).sum()
    got = max_probability_score(SOFTMAX[:, :1], ORGANS, softmax=True)
    np.testing.assert_allclose(got, [-p[1, 0]], rtol=1e-6)


def test_max_sigmoid_probability_and_max_logit():
    z = np.array([[2.0, -1.0], [0.0, -3.0]], dtype=np.float32)  # two sigmoid organ channels
    np.testing.assert_allclose(max_probability_score(z, [0, 1], softmax=False),
                               [-1 / (1 + math.exp(-2.0)), -1 / (1 + math.exp(1.0))], rtol=1e-6)
    np.testing.assert_allclose(max_logit_score(z, [0, 1]), [-2.0, 1.0])


def test_energy_is_free_energy_for_softmax_and_joint_energy_for_sigmoid():
    np.testing.assert_allclose(energy_score(SOFTMAX, ORGANS, softmax=True),
                               [-math.log(3.0 + 1.0), -math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(energy_score(SOFTMAX, ORGANS, softmax=True, temperature=2.0),
                               [-2 * math.log(3.0 ** 0.5 + 1.0), -2 * math.log(2.0)], rtol=1e-6)
    z = np.array([[0.0], [math.log(3.0)]], dtype=np.float32)
    np.testing.assert_allclose(energy_score(z, [0, 1], softmax=False), [-(math.log(2.0) + math.log(4.0))], rtol=1e-6)
    with pytest.raises(PosthocError, match="temperature"):
        energy_score(z, [0, 1], softmax=False, temperature=0.0)


def test_tumour_channel_is_never_organ_evidence():
    # channel 3 (a tumour) has the largest logit everywhere; the scores ignore it
    np.testing.assert_allclose(max_logit_score(SOFTMAX, ORGANS), [-math.log(3.0), 0.0], rtol=1e-6)


def test_sml_statistics_per_predicted_class_and_standardisation():
    # case 1: organ 0 wins with max logits 1 and 3; case 2: organ 1 wins with 10 and 14, organ 0 with 2
    a = np.array([[1.0, 3.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0, 2.0], [10.0, 14.0, 0.0]])
    mean, std = sml_statistics([a, b], [0, 1])
    np.testing.assert_allclose(mean, [2.0, 12.0])
    np.testing.assert_allclose(std, [math.sqrt(2 / 3), 2.0])
    test = np.array([[2.0, 0.0], [0.0, 8.0]])
    np.testing.assert_allclose(sml_score(test, [0, 1], mean, std), [0.0, (12.0 - 8.0) / 2.0], rtol=1e-6)
    # a class predicted nowhere falls back to the statistics of all voxels
    mean, std = sml_statistics([a], [0, 1])
    assert mean[1] == pytest.approx(2.0) and std[1] == pytest.approx(1.0)


def test_score_dispatch_and_errors():
    z = np.zeros((2, 3), dtype=np.float32)
    for method in ("msp", "maxlogit", "energy"):
        assert score(method, z, [0, 1], softmax=False).shape == (3,)
    with pytest.raises(PosthocError, match="sml needs statistics"):
        score("sml", z, [0, 1], softmax=False)
    with pytest.raises(PosthocError, match="unknown post-hoc method"):
        score("odin", z, [0, 1], softmax=False)
    with pytest.raises(PosthocError, match="no channels"):
        max_logit_score(z, [5])
