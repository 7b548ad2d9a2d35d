import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from nnunetv2_dsm.evaluation.metrics import (
    BOTH_EMPTY,
    EMPTY_ROI,
    NO_NEGATIVES,
    NO_POSITIVES,
    NOT_ANNOTATED,
    auroc,
    body_mask,
    confusion,
    dice,
    fpr_at_tpr,
    roc_metrics,
)


def _random_case(seed: int, n: int = 1500, ties: bool = False):
    rng = np.random.default_rng(seed)
    reference = rng.random(n) < rng.uniform(0.05, 0.6)
    reference[:2] = [True, False]
    score = rng.normal(size=n) + reference * rng.uniform(0.0, 2.0)
    if ties:
        score = np.round(score * 2) / 2
    roi = rng.random(n) < 0.8
    roi[:2] = True
    return reference, score, roi


def _brute_force_fpr_at_tpr(reference, score, target):
    """Walk every distinct threshold, interpolate linearly where the TPR first reaches the target."""
    pos, neg = score[reference], score[~reference]
    points = [(0.0, 0.0)]
    for t in sorted(set(score.tolist()), reverse=True):
        points.append((float(np.mean(neg >= t)), float(np.mean(pos >= t))))
    for i, (f, t) in enumerate(points):
        if t >= target:
            f0, t0 = points[i - 1]
            return f if t == target else f0 + (target - t0) * (f - f0) / (t - t0)
    raise AssertionError("unreachable: the last threshold has TPR 1")


# --- DSC ---------------------------------------------------------------------------------------


def test_dice_known_value_and_symmetry():
    ref = np.zeros((4, 4, 4), bool)
    pred = np.zeros((4, 4, 4), bool)
    ref[:2] = True  # 32 voxels
    pred[1:3] = True  # 32 voxels, 16 shared
    assert dice(ref, pred).value == pytest.approx(2 * 16 / 64)
    assert dice(pred, ref).value == dice(ref, pred).value
    assert dice(ref, ref).value == 1.0


def test_dice_empty_cases():
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    both = dice(empty, empty)
    assert math.isnan(both.value) and both.note == BOTH_EMPTY and not both.defined
    assert dice(empty, full).value == 0.0 and dice(empty, full).defined  # false positives only
    assert dice(full, empty).value == 0.0  # missed everything


def test_dice_not_annotated_is_nan_never_0_or_1():
    mask = np.ones((2, 2, 2), bool)
    for pred in (mask, ~mask):
        m = dice(mask, pred, available=False)
        assert math.isnan(m.value) and m.note == NOT_ANNOTATED


def test_dice_ignore_mask_leaves_voxels_out():
    ref = np.array([1, 1, 0, 0], bool)
    pred = np.array([1, 0, 1, 0], bool)
    ignore = np.array([0, 1, 1, 0], bool)
    assert dice(ref, pred).value == pytest.approx(0.5)
    assert dice(ref, pred, ignore=ignore).value == 1.0


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="share one shape"):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_confusion_rows_say_where_each_reference_class_went():
    reference = np.array([[1, 1, 1, 1], [2, 2, 0, 0]])
    prediction = np.array([[1, 2, 2, 0], [2, 2, 1, 0]])
    rows = confusion(reference, prediction, {"spleen": 1, "liver": 2, "aorta": 3})
    assert set(rows) == {"spleen", "liver"}  # aorta is absent from the reference: no row
    assert rows["spleen"] == {"background": 0.25, "spleen": 0.25, "liver": 0.5, "aorta": 0.0}
    assert rows["liver"] == {"background": 0.0, "spleen": 0.0, "liver": 1.0, "aorta": 0.0}
    for row in rows.values():
        assert sum(row.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share one shape"):
        confusion(reference, prediction[:, :3], {"spleen": 1})


# --- AUROC / FPR95 -----------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn_over_many_seeds(ties):
    for seed in range(40):
        reference, score, roi = _random_case(seed, ties=ties)
        expected = roc_auc_score(reference[roi], score[roi])
        assert auroc(reference, score, roi).value == pytest.approx(expected, abs=1e-12)
        combined, _ = roc_metrics(reference, score, roi)
        assert combined.value == pytest.approx(expected, abs=1e-12)
    # no ROI means every voxel
    assert auroc(reference, score).value == pytest.approx(roc_auc_score(reference, score), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", [0.95, 0.5, 0.8])
def test_fpr_at_tpr_matches_brute_force(ties, target):
    for seed in range(25):
        reference, score, roi = _random_case(seed, n=400, ties=ties)
        expected = _brute_force_fpr_at_tpr(reference[roi], score[roi], target)
        assert fpr_at_tpr(reference, score, roi, target_tpr=target).value == pytest.approx(
            expected, abs=1e-12
        )
        if target == 0.95:
            assert roc_metrics(reference, score, roi)[1].value == pytest.approx(expected, abs=1e-12)


def test_fpr95_textbook_definition_without_ties():
    # With distinct scores and 0.95 * n_pos an integer k, FPR95 is the share of negatives scoring at
    # least the k-th highest positive.
    for seed in range(20):
        rng = np.random.default_rng(seed)
        pos = rng.normal(1.0, 1.0, 40)
        neg = rng.normal(0.0, 1.0, 300)
        score = np.concatenate([pos, neg])
        reference = np.arange(score.size) < pos.size
        kth = np.sort(pos)[::-1][int(0.95 * pos.size) - 1]
        assert fpr_at_tpr(reference, score).value == pytest.approx(np.mean(neg >= kth), abs=1e-12)


def test_roc_extremes_and_constant_score():
    reference = np.array([1, 1, 0, 0, 0], bool)
    perfect = reference.astype(float)
    assert auroc(reference, perfect).value == 1.0 and fpr_at_tpr(reference, perfect).value == 0.0
    assert auroc(reference, -perfect).value == 0.0 and fpr_at_tpr(reference, -perfect).value == 1.0
    constant = np.full(reference.shape, 0.3)
    assert auroc(reference, constant).value == 0.5
    # the ROC of a constant score is the diagonal: at TPR 0.95 the FPR is 0.95
    assert fpr_at_tpr(reference, constant).value == pytest.approx(0.95)


def test_roc_undefined_cases_give_nan_with_reason():
    score = np.linspace(0, 1, 8)
    empty = np.zeros(8, bool)
    full = np.ones(8, bool)
    some = np.arange(8) % 2 == 0
    cases = [
        ((empty, score, None), NO_POSITIVES),  # empty reference
        ((full, score, None), NO_NEGATIVES),  # all-positive
        ((some, score, some), NO_NEGATIVES),  # ROI covers positives only
        ((some, score, empty), EMPTY_ROI),
    ]
    for args, note in cases:
        for metric in (auroc(*args), fpr_at_tpr(*args), *roc_metrics(*args)):
            assert math.isnan(metric.value) and metric.note == note
    for metric in (auroc(some, score, available=False), *roc_metrics(some, score, available=False)):
        assert math.isnan(metric.value) and metric.note == NOT_ANNOTATED


def test_roc_rejects_non_finite_scores():
    score = np.array([0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="nan or inf"):
        auroc(np.array([1, 0, 0], bool), score)


# --- body mask ---------------------------------------------------------------------------------


def test_body_mask_phantom_keeps_lungs_drops_table():
    z, y, x = np.mgrid[0:20, 0:40, 0:40]
    body = ((y - 16) ** 2 + (x - 20) ** 2) < 12**2  # a cylinder along the axial axis
    ct = np.full(body.shape, -1000.0)
    ct[body] = 40.0
    lungs = body & (((y - 16) ** 2 + (x - 14) ** 2 < 4**2) | ((y - 16) ** 2 + (x - 26) ** 2 < 4**2)) & (z > 3)
    trachea = body & ((y - 16) ** 2 + (x - 20) ** 2 < 2**2) & (z > 10)  # reaches the top border
    ct[lungs | trachea] = -850.0
    ct[:, 33:36, 5:35] = 300.0  # table, separate from the body
    ct[0, 0, 0] = 500.0  # isolated bright voxel
    mask = body_mask(ct)
    assert mask.dtype == bool and mask.shape == ct.shape
    np.testing.assert_array_equal(mask, body)


def test_body_mask_axial_axis_and_empty():
    ct = np.full((6, 7, 8), -1000.0)
    assert not body_mask(ct).any()
    ct[1:5, 1:6, 2:7] = 0.0
    ct[2:4, 2:5, 3:6] = -1000.0  # enclosed air
    assert body_mask(ct, axial_axis=2).sum() == 4 * 5 * 5
    with pytest.raises(ValueError, match="3D"):
        body_mask(np.zeros((4, 4)))


def test_body_mask_real_ct_contains_the_organs(example_ct_dir):
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir / "example_ct.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir / "example_seg_fast_force_split.nii.gz")))
    mask = body_mask(ct)
    organs = seg > 0
    assert np.count_nonzero(mask & organs) / np.count_nonzero(organs) > 0.995
    assert 0.1 < mask.mean() < 0.9
    assert not mask[:, 0, 0].any() and not mask[:, -1, -1].any()  # air in the corners stays out
    assert ndimage.label(mask)[1] == 1  # one piece: table and noise are gone
