"""Voxel-level segmentation and localisation metrics of DSM: DSC, AUROC and FPR95 (paper section 5.2),
and the confusion of classes that explains a low DSC.

Every metric returns a :class:`Metric`: a value and, when the value is undefined (nan), the reason.
Undefined is never folded into 0 or 1: a (case, class) pair that was not annotated (partial labels)
or whose reference and prediction are both empty is reported as nan with a note, and summaries
skip it. AUROC and FPR95 are computed inside a region of interest (ROI) that the caller states.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score, roc_curve

from nnunetv2_dsm.evaluation.roi import BODY_THRESHOLD_HU

NOT_ANNOTATED = "not_annotated"
BOTH_EMPTY = "reference_and_prediction_empty"
EMPTY_ROI = "empty_roi"
NO_POSITIVES = "no_positive_voxels_in_roi"
NO_NEGATIVES = "no_negative_voxels_in_roi"
ROI_NOT_ANNOTATED = "roi_not_annotated"


@dataclass(frozen=True)
class Metric:
    """A metric value; ``value`` is nan exactly when ``note`` names why it is undefined."""

    value: float
    note: str | None = None

    @property
    def defined(self) -> bool:
        return self.note is None

    @classmethod
    def undefined(cls, note: str) -> "Metric":
        return cls(float("nan"), note)


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays must share one shape, got {shapes}")


def dice(
    reference: np.ndarray,
    prediction: np.ndarray,
    available: bool = True,
    ignore: np.ndarray | None = None,
) -> Metric:
    """Dice similarity coefficient of two boolean masks of one class in one case.

    ``available=False`` (class not annotated in this case) gives nan with note ``not_annotated``;
    empty reference and empty prediction give nan with note ``reference_and_prediction_empty``
    (nnU-Net's convention). Voxels where ``ignore`` is True are left out, as nnU-Net does for its
    ignore label.
    """
    _check_same_shape(reference=reference, prediction=prediction, ignore=ignore)
    if not available:
        return Metric.undefined(NOT_ANNOTATED)
    ref = np.asarray(reference, dtype=bool)
    pred = np.asarray(prediction, dtype=bool)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        ref, pred = ref & keep, pred & keep
    tp = int(np.count_nonzero(ref & pred))
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    if n_ref + n_pred == 0:
        return Metric.undefined(BOTH_EMPTY)
    return Metric(2.0 * tp / (n_ref + n_pred))


def confusion(reference: np.ndarray, prediction: np.ndarray, labels: dict[str, int]) -> dict[str, dict[str, float]]:
    """Where each reference class went: for every class of ``labels`` present in ``reference``, the
    fraction of its voxels that ``prediction`` assigns to each label (``background`` = 0 included).

    Rows sum to 1 up to voxels predicted as labels outside ``labels``. Classes absent from the reference
    are left out (no voxels to distribute). Answers *why* a Dice is low: a missed organ read as
    background, or read as another organ.
    """
    _check_same_shape(reference=reference, prediction=prediction)
    ref, pred = np.asarray(reference), np.asarray(prediction)
    columns = {"background": 0, **{n: v for n, v in labels.items() if v != 0}}
    out = {}
    for name, label in labels.items():
        if label == 0:
            continue
        inside = pred[ref == label]
        if inside.size == 0:
            continue
        out[name] = {other: float(np.count_nonzero(inside == value)) / inside.size
                     for other, value in columns.items()}
    return out


def _roi_samples(
    reference: np.ndarray, score: np.ndarray, roi: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | str:
    """Labels and scores of the ROI voxels, or the note explaining why ROC metrics are undefined."""
    _check_same_shape(reference=reference, score=score, roi=roi)
    ref = np.asarray(reference, dtype=bool)
    sc = np.asarray(score)
    if roi is not None:
        inside = np.asarray(roi, dtype=bool)
        ref, sc = ref[inside], sc[inside]
    else:
        ref, sc = ref.ravel(), sc.ravel()
    if ref.size == 0:
        return EMPTY_ROI
    if not np.all(np.isfinite(sc)):
        raise ValueError("score map contains nan or inf inside the ROI; write finite scores")
    n_pos = int(np.count_nonzero(ref))
    if n_pos == 0:
        return NO_POSITIVES
    if n_pos == ref.size:
        return NO_NEGATIVES
    return ref, sc


def auroc(
    reference: np.ndarray,
    score: np.ndarray,
    roi: np.ndarray | None = None,
    available: bool = True,
) -> Metric:
    """Voxel-level area under the ROC curve of ``score`` for the boolean ``reference`` inside ``roi``.

    ``roi=None`` uses every voxel. Undefined (nan with a note) when the class is not annotated,
    the ROI is empty, or the ROI holds only positives or only negatives.
    """
    if not available:
        return Metric.undefined(NOT_ANNOTATED)
    samples = _roi_samples(reference, score, roi)
    if isinstance(samples, str):
        return Metric.undefined(samples)
    return Metric(float(roc_auc_score(*samples)))


def fpr_at_tpr_from_curve(fpr: np.ndarray, tpr: np.ndarray, target_tpr: float = 0.95) -> float:
    """False-positive rate where the ROC curve first reaches ``target_tpr``, linearly interpolated.

    scikit-learn has no such function. Interpolating between the two ROC points around the target
    is the rate of a classifier that breaks ties inside the crossing threshold group at random,
    the same tie model the trapezoidal AUROC uses. Where the curve runs flat at exactly the target,
    the smallest false-positive rate is taken.
    """
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"target_tpr must be in (0, 1], got {target_tpr}")
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    hi = int(np.searchsorted(tpr, target_tpr, side="left"))
    if hi >= tpr.size:
        raise ValueError(f"the ROC curve never reaches TPR {target_tpr} (max {tpr.max()})")
    if hi == 0 or tpr[hi] == target_tpr:
        return float(fpr[hi])
    lo = hi - 1
    frac = (target_tpr - tpr[lo]) / (tpr[hi] - tpr[lo])
    return float(fpr[lo] + frac * (fpr[hi] - fpr[lo]))


def fpr_at_tpr(
    reference: np.ndarray,
    score: np.ndarray,
    roi: np.ndarray | None = None,
    available: bool = True,
    target_tpr: float = 0.95,
) -> Metric:
    """Voxel-level false-positive rate at ``target_tpr`` true-positive rate (FPR95 by default)."""
    if not available:
        return Metric.undefined(NOT_ANNOTATED)
    samples = _roi_samples(reference, score, roi)
    if isinstance(samples, str):
        return Metric.undefined(samples)
    fpr, tpr, _ = roc_curve(*samples)
    return Metric(fpr_at_tpr_from_curve(fpr, tpr, target_tpr))


def roc_metrics(
    reference: np.ndarray,
    score: np.ndarray,
    roi: np.ndarray | None = None,
    available: bool = True,
    target_tpr: float = 0.95,
) -> tuple[Metric, Metric]:
    """(AUROC, FPR at ``target_tpr``) from a single ROC curve.

    One ``roc_curve`` call sorts the ROI once; on a CT volume that sort dominates the cost, so this
    is what folder evaluation uses. The AUROC is scikit-learn's trapezoidal ``auc`` of that curve,
    which is how ``roc_auc_score`` computes it.
    """
    if not available:
        return Metric.undefined(NOT_ANNOTATED), Metric.undefined(NOT_ANNOTATED)
    samples = _roi_samples(reference, score, roi)
    if isinstance(samples, str):
        return Metric.undefined(samples), Metric.undefined(samples)
    fpr, tpr, _ = roc_curve(*samples)
    return Metric(float(auc(fpr, tpr))), Metric(fpr_at_tpr_from_curve(fpr, tpr, target_tpr))


def body_mask(ct_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU, axial_axis: int = 0) -> np.ndarray:
    """Boolean body mask of a CT volume in Hounsfield units.

    Voxels above ``threshold_hu``, the largest 3D connected component (drops the table, cables and
    noise), holes filled in 3D and then slice by slice along ``axial_axis``: the lungs and the
    airway reach the volume border through the trachea, so a 3D fill alone would leave them out.
    ``axial_axis=0`` fits arrays read with SimpleITK (z, y, x) from axial scans.
    """
    ct = np.asarray(ct_hu)
    if ct.ndim != 3:
        raise ValueError(f"body_mask expects a 3D CT volume, got shape {ct.shape}")
    foreground = ct > threshold_hu
    components, n = ndimage.label(foreground)
    if n == 0:
        return np.zeros(ct.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    body = ndimage.binary_fill_holes(body)
    body = np.moveaxis(body, axial_axis, 0)
    for i in range(body.shape[0]):
        body[i] = ndimage.binary_fill_holes(body[i])
    return np.moveaxis(body, 0, axial_axis)
