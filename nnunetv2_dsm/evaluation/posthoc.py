"""Post-hoc anomaly scores from the logits of any trained segmentation model (nnU-Net or DSM).

Each score is computed per voxel from the network's raw outputs z (C, *S) over the organ channels
(tumour classes excluded, ``maxlogit.organ_channels``) and is larger where the voxel is more
anomalous, the convention of ``nnunetv2_dsm evaluate``:

- ``msp``: maximum softmax (or sigmoid) probability, ``-max_c p_c`` (Hendrycks and Gimpel 2017);
- ``maxlogit``: ``-max_c z_c`` (Hendrycks et al. 2022; MaxQuery for segmentation);
- ``energy``: the free energy ``-T log sum_c exp(z_c / T)`` over the classes of a softmax output
  (Liu et al. 2020); for sigmoid (multi-label) outputs the joint energy
  ``-sum_c log(1 + exp(z_c))`` (Wang et al. 2021), since each channel is its own two-class softmax;
- ``sml``: standardized max logit, ``-(max_c z_c - mu_k) / sigma_k`` with k the voxel's predicted
  class and (mu_k, sigma_k) the mean and standard deviation of the max logit over the voxels
  predicted as k in the training cases (Jung et al. 2021), so classes with larger typical logits do
  not look less anomalous.

``softmax`` says how the model's channels were trained: nnU-Net on plain labels uses a softmax with
channel 0 background; DSM and any region-based model use one sigmoid per class.
"""

from collections.abc import Iterable, Sequence

import numpy as np

from nnunetv2_dsm.errors import DSMError

METHODS = ("msp", "maxlogit", "energy", "sml")


class PosthocError(DSMError, ValueError):
    pass


def _organs(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    # logits: (C, *S) -> (len(channels), *S), float64 for stable exponentials
    if logits.ndim < 2 or not channels or max(channels) >= logits.shape[0]:
        raise PosthocError(f"logits of shape {logits.shape} have no channels {list(channels)}")
    return logits[list(channels)].astype(np.float64)


def _logsumexp(z: np.ndarray, axis: int = 0) -> np.ndarray:
    top = z.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def max_probability_score(logits: np.ndarray, channels: Sequence[int], softmax: bool) -> np.ndarray:
    """``-max_c p_c`` over ``channels``; p the softmax over all channels, or each channel's sigmoid."""
    # logits: (C, *S) -> (*S)
    if softmax:
        z = logits.astype(np.float64)
        probabilities = np.exp(z - _logsumexp(z)[None])[list(channels)]
    else:
        probabilities = 1.0 / (1.0 + np.exp(-_organs(logits, channels)))
    return (-probabilities.max(axis=0)).astype(np.float32)


def max_logit_score(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """``-max_c z_c`` over ``channels``."""
    # logits: (C, *S) -> (*S)
    return (-_organs(logits, channels).max(axis=0)).astype(np.float32)


def energy_score(logits: np.ndarray, channels: Sequence[int], softmax: bool, temperature: float = 1.0) -> np.ndarray:
    """Free energy of the organ classes (softmax) or their joint energy (sigmoid); higher = anomalous."""
    # logits: (C, *S) -> (*S)
    if temperature <= 0:
        raise PosthocError(f"energy temperature must be > 0, got {temperature}")
    z = _organs(logits, channels)
    if softmax:
        return (-temperature * _logsumexp(z / temperature)).astype(np.float32)
    return (-np.logaddexp(0.0, z).sum(axis=0)).astype(np.float32)


def predicted_organ(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """Index into ``channels`` of each voxel's largest organ logit."""
    # logits: (C, *S) -> (*S) int
    return _organs(logits, channels).argmax(axis=0)


def sml_statistics(cases: Iterable[np.ndarray], channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per organ class k: mean and standard deviation of the max logit over the voxels predicted as k.

    ``cases`` yields logits (C, *S) of training cases. Accumulated as sums, so cases are never held
    together. A class predicted nowhere gets the statistics of all voxels.
    """
    k = len(channels)
    count, total, squares = np.zeros(k), np.zeros(k), np.zeros(k)
    all_count = all_total = all_squares = 0.0
    for logits in cases:
        z = _organs(logits, channels)
        top, winner = z.max(axis=0).ravel(), z.argmax(axis=0).ravel()
        count += np.bincount(winner, minlength=k)
        total += np.bincount(winner, weights=top, minlength=k)
        squares += np.bincount(winner, weights=top * top, minlength=k)
        all_count, all_total, all_squares = all_count + top.size, all_total + top.sum(), all_squares + (top * top).sum()
    if all_count == 0:
        raise PosthocError("no training logits to compute the SML statistics from")
    empty = count == 0
    count[empty], total[empty], squares[empty] = all_count, all_total, all_squares
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return mean, np.maximum(std, 1e-6)


def sml_score(logits: np.ndarray, channels: Sequence[int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``-(max_c z_c - mean_k) / std_k``, k the voxel's predicted organ class."""
    # logits: (C, *S) -> (*S)
    z = _organs(logits, channels)
    winner = z.argmax(axis=0)
    return (-(z.max(axis=0) - mean[winner]) / std[winner]).astype(np.float32)


def score(method: str, logits: np.ndarray, channels: Sequence[int], softmax: bool,
          statistics: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The anomaly map of ``method`` (one of ``METHODS``)."""
    if method == "msp":
        return max_probability_score(logits, channels, softmax)
    if method == "maxlogit":
        return max_logit_score(logits, channels)
    if method == "energy":
        return energy_score(logits, channels, softmax)
    if method == "sml":
        if statistics is None:
            raise PosthocError("sml needs statistics from training cases (sml_statistics)")
        return sml_score(logits, channels, *statistics)
    raise PosthocError(f"unknown post-hoc method {method!r}; choose from {', '.join(METHODS)}")
