"""Metrics of an anomaly or tumour score map for one lesion type in one case.

Voxel AUROC and FPR95 inside two regions (the host organ, the body), and at one operating point: the
threshold at which a fixed fraction (``fp_budget``) of the body's non-lesion voxels score above it, the
lesion-level detection rate (a reference lesion, one connected component, counts as found when any of
its voxels scores above the threshold) and the Dice of the thresholded map inside the body. The
threshold depends only on each method's own scores outside the lesions, so methods whose scores live
on different scales (probabilities, logits, energies) are compared at the same false-positive budget.
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from nnunetv2_dsm.evaluation.metrics import roc_metrics

FP_BUDGET = 0.01


@dataclass(frozen=True)
class LesionScores:
    """Metrics of one score map for one lesion type in one case (nan: undefined)."""

    auroc_host: float
    fpr95_host: float
    auroc_body: float
    fpr95_body: float
    threshold: float
    lesions: int
    detected: int
    dice: float

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}


def threshold_at_budget(score: np.ndarray, negatives: np.ndarray, fp_budget: float = FP_BUDGET) -> float:
    """Smallest threshold t with at most ``fp_budget`` of the ``negatives`` voxels scoring strictly above t."""
    if not 0.0 <= fp_budget < 1.0:
        raise ValueError(f"fp_budget must lie in [0, 1), got {fp_budget}")
    values = np.sort(np.asarray(score)[np.asarray(negatives, dtype=bool)])
    if values.size == 0:
        raise ValueError("no negative voxels to set the threshold on")
    allowed = int(np.floor(fp_budget * values.size))
    return float(values[values.size - 1 - allowed])


def lesion_detection(lesion: np.ndarray, score: np.ndarray, threshold: float) -> tuple[int, int]:
    """(detected, total) reference lesions (26-connected components of ``lesion``) with a voxel above ``threshold``."""
    components, n = ndimage.label(np.asarray(lesion, dtype=bool), structure=np.ones((3,) * lesion.ndim))
    if n == 0:
        return 0, 0
    peaks = ndimage.maximum(np.asarray(score, dtype=np.float64), components, index=np.arange(1, n + 1))
    return int(np.count_nonzero(np.asarray(peaks) > threshold)), n


def lesion_scores(lesion: np.ndarray, score: np.ndarray, host: np.ndarray, body: np.ndarray,
                  fp_budget: float = FP_BUDGET) -> LesionScores:
    """All metrics of ``score`` for the boolean ``lesion`` mask; ``host`` and ``body`` are boolean ROIs.

    ``host`` should contain the lesion (an organ contains its tumours); lesion voxels outside ``body``
    are added to it so that every lesion voxel is scored in the body ROI.
    """
    lesion, host, body = (np.asarray(a, dtype=bool) for a in (lesion, host, body))
    if not (lesion.shape == score.shape == host.shape == body.shape):
        raise ValueError(f"lesion, score, host and body must share one shape, got {lesion.shape}, {score.shape}, "
                         f"{host.shape}, {body.shape}")
    body = body | lesion
    auroc_host, fpr95_host = roc_metrics(lesion, score, host | lesion)
    auroc_body, fpr95_body = roc_metrics(lesion, score, body)
    threshold = threshold_at_budget(score, body & ~lesion, fp_budget)
    detected, total = lesion_detection(lesion, score, threshold)
    predicted = (score > threshold) & body
    denominator = int(np.count_nonzero(predicted)) + int(np.count_nonzero(lesion))
    dice = 2.0 * np.count_nonzero(predicted & lesion) / denominator if denominator else float("nan")
    return LesionScores(auroc_host.value, fpr95_host.value, auroc_body.value, fpr95_body.value, threshold, total,
                        detected, float(dice))
