"""Partial-label losses: exact masking of unannotated (case, class) pairs and parity with nnU-Net."""

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.losses import (
    ClassPresenceBCE,
    PartialLabelDeepSupervision,
    PartialLabelDiceBCELoss,
    availability_from_keys,
    class_presence,
)

SHAPES = {"2d": (3, 4, 12, 10), "3d": (2, 3, 6, 7, 5)}


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(shape, generator=g)).requires_grad_(True)
    target = torch.rand(shape, generator=g) < 0.3
    return logits, target


def _nnunet_loss(batch_dice: bool, smooth: float, weight_ce: float = 1.0, weight_dice: float = 1.0):
    return DC_and_BCE_loss(
        {},
        {"batch_dice": batch_dice, "smooth": smooth, "do_bg": True, "ddp": False},
        weight_ce=weight_ce,
        weight_dice=weight_dice,
        use_ignore_label=False,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


def _reference_on_subset(logits, target, available, batch_dice, smooth):
    """Dice + BCE written out pair by pair in float64 over the available pairs only."""
    x = torch.sigmoid(logits.double())
    y = target.double()
    axes = tuple(range(2, logits.ndim))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), y, reduction="none").mean(axes)
    pairs = available.nonzero().tolist()
    bce_term = sum(bce[b, c] for b, c in pairs) / len(pairs)
    inter, pred, gt = (x * y).sum(axes), x.sum(axes), y.sum(axes)
    if batch_dice:
        dcs = []
        for c in range(logits.shape[1]):
            cases = available[:, c].nonzero().flatten()
            if len(cases):
                dcs.append((2 * inter[cases, c].sum() + smooth) / (gt[cases, c].sum() + pred[cases, c].sum() + smooth))
    else:
        dcs = [(2 * inter[b, c] + smooth) / (gt[b, c] + pred[b, c] + smooth) for b, c in pairs]
    return bce_term - sum(dcs) / len(dcs)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("smooth", [1e-5, 1.0])
def test_full_availability_equals_nnunet_dc_and_bce(dim, batch_dice, smooth):
    logits, target = _inputs(SHAPES[dim])
    ours = PartialLabelDiceBCELoss(smooth=smooth, batch_dice=batch_dice)
    available = torch.ones(logits.shape[:2], dtype=torch.bool)
    value = ours(logits, target, available)
    (grad,) = torch.autograd.grad(value, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _nnunet_loss(batch_dice, smooth)(ref_logits, target)
    ref.backward()
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-9)


def test_loss_weights_match_nnunet():
    logits, target = _inputs(SHAPES["3d"])
    available = torch.ones(logits.shape[:2], dtype=torch.bool)
    ours = PartialLabelDiceBCELoss(weight_dice=0.7, weight_bce=1.9)(logits, target, available)
    ref = _nnunet_loss(False, 1e-5, weight_ce=1.9, weight_dice=0.7)(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_partial_availability_matches_subset_reference_with_zero_gradient(dim, batch_dice):
    logits, target = _inputs(SHAPES[dim], seed=1)
    available = torch.rand(logits.shape[:2], generator=torch.Generator().manual_seed(3)) < 0.5
    available[0, 0], available[0, 1] = True, False
    available[:, -1] = False  # a class nobody annotates: batch Dice must not score it as 1
    value = PartialLabelDiceBCELoss(batch_dice=batch_dice)(logits, target, available)
    value.backward()

    expected = _reference_on_subset(logits.detach(), target, available, batch_dice, 1e-5)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    unavailable = ~available
    assert torch.equal(logits.grad[unavailable], torch.zeros_like(logits.grad[unavailable]))
    assert (logits.grad[available].abs().flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("batch_dice", [False, True])
def test_unavailable_pair_contributes_exactly_zero(batch_dice):
    """Adding an unavailable channel to a batch leaves loss and gradients bit-identical."""
    logits, target = _inputs(SHAPES["3d"], seed=2)
    available = torch.ones(logits.shape[:2], dtype=torch.bool)
    loss = PartialLabelDiceBCELoss(batch_dice=batch_dice)
    kept = loss(logits[:, :2], target[:, :2], available[:, :2])
    (grad_kept,) = torch.autograd.grad(kept, logits)

    available[:, 2] = False
    with_extra = loss(logits, target, available)
    (grad_extra,) = torch.autograd.grad(with_extra, logits)
    torch.testing.assert_close(with_extra, kept, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_extra[:, :2], grad_kept[:, :2], rtol=1e-6, atol=0)
    assert torch.count_nonzero(grad_extra[:, 2]) == 0


@pytest.mark.parametrize("batch_dice", [False, True])
def test_targets_of_unavailable_pairs_are_ignored(batch_dice):
    logits, target = _inputs(SHAPES["2d"], seed=4)
    available = torch.ones(logits.shape[:2], dtype=torch.bool)
    available[1, 2] = available[0, 0] = False
    loss = PartialLabelDiceBCELoss(batch_dice=batch_dice)
    base = loss(logits, target, available)
    (grad_base,) = torch.autograd.grad(base, logits)
    for replacement in (torch.ones_like(target[0, 0]), torch.zeros_like(target[0, 0]), ~target[0, 0]):
        changed = target.clone()
        changed[1, 2] = replacement
        changed[0, 0] = replacement
        value = loss(logits, changed, available)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.equal(value, base)
        assert torch.equal(grad, grad_base)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_no_available_pair_gives_zero_with_grad_fn(batch_dice):
    logits, target = _inputs(SHAPES["3d"])
    available = torch.zeros(logits.shape[:2], dtype=torch.bool)
    value = PartialLabelDiceBCELoss(batch_dice=batch_dice)(logits, target, available)
    assert value.grad_fn is not None
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_shapes_raise_clear_errors():
    logits, target = _inputs(SHAPES["2d"])
    loss = PartialLabelDiceBCELoss()
    with pytest.raises(ValueError, match="availability_from_keys"):
        loss(logits, target, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="region"):
        loss(logits, target[:, 0], torch.ones(3, 4, dtype=torch.bool))


def test_deep_supervision_is_weighted_sum_and_skips_zero_weights():
    base = PartialLabelDiceBCELoss(batch_dice=True)
    weights = [0.5714, 0.2857, 0.1429, 0.0]
    wrapper = PartialLabelDeepSupervision(base, weights)
    scales = [(2, 3, 16, 16, 8), (2, 3, 8, 8, 4), (2, 3, 4, 4, 2)]
    pairs = [_inputs(s, seed=i) for i, s in enumerate(scales)]
    logits = [p[0] for p in pairs]
    targets = [p[1] for p in pairs]
    # The zero-weight scale has mismatched shapes: evaluating it would raise.
    logits.append(torch.zeros(2, 3, 2, 2, 1))
    targets.append(torch.zeros(2, 3, 3, 3, 3, dtype=torch.bool))
    available = torch.tensor([[True, False, True], [False, True, True]])

    value = wrapper(logits, targets, available)
    expected = sum(w * base(o, t, available) for w, o, t in zip(weights[:3], logits[:3], targets[:3]))
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)

    full = torch.ones(2, 3, dtype=torch.bool)
    ref = DeepSupervisionWrapper(_nnunet_loss(True, 1e-5), weights)(logits[:3], targets[:3])
    torch.testing.assert_close(PartialLabelDeepSupervision(base, weights[:3])(logits[:3], targets[:3], full), ref)

    value.backward()
    for o in logits[:3]:
        assert torch.count_nonzero(o.grad[~available]) == 0
        assert torch.count_nonzero(o.grad[available]) > 0


def test_deep_supervision_rejects_bad_configuration():
    with pytest.raises(ValueError, match="non-zero"):
        PartialLabelDeepSupervision(PartialLabelDiceBCELoss(), [0.0, 0.0])
    wrapper = PartialLabelDeepSupervision(PartialLabelDiceBCELoss(), [1.0])
    logits, target = _inputs(SHAPES["2d"])
    with pytest.raises(TypeError, match="lists"):
        wrapper(logits, target, torch.ones(3, 4, dtype=torch.bool))


def test_class_presence_from_masks():
    target = torch.zeros(2, 3, 4, 4, 4, dtype=torch.bool)
    target[0, 1, 2, 2, 2] = True
    target[1, 0] = True
    expected = torch.tensor([[False, True, False], [True, False, False]])
    assert torch.equal(class_presence(target), expected)


def test_class_presence_bce_is_masked():
    g = torch.Generator().manual_seed(5)
    class_logits = torch.randn(4, 6, generator=g).requires_grad_(True)
    masks = torch.rand(4, 6, 5, 5, 5, generator=g) < 0.002
    available = torch.rand(4, 6, generator=g) < 0.6
    available[0, 0] = True
    value = ClassPresenceBCE()(class_logits, masks, available)
    value.backward()

    presence = class_presence(masks).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(class_logits.detach(), presence, reduction="none")
    torch.testing.assert_close(value, bce[available].mean())
    assert torch.count_nonzero(class_logits.grad[~available]) == 0
    assert torch.count_nonzero(class_logits.grad[available]) == available.sum()

    flipped = presence.clone()
    flipped[~available] = 1 - flipped[~available]
    assert torch.equal(ClassPresenceBCE()(class_logits, flipped, available), value)


def test_class_presence_bce_empty_and_full():
    class_logits = torch.randn(2, 3, requires_grad=True)
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    empty = ClassPresenceBCE()(class_logits, presence, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.grad_fn is not None
    full = ClassPresenceBCE()(class_logits, presence, torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(full, torch.nn.BCEWithLogitsLoss()(class_logits, presence))


DATASET_JSON = {
    "labels": {"background": 0, "liver": [1, 2], "liver_tumor": 2, "kidney_right": 3},
    "regions_class_order": [1, 2, 3],
    "dsm": {
        "class_availability": {
            "flare_0001": ["background", "liver", "kidney_right"],
            "lits_0007": ["liver", "liver_tumor"],
            "empty_0003": [],
        }
    },
}
CLASSES = ["liver", "liver_tumor", "kidney_right"]


def test_availability_from_keys():
    keys = ["lits_0007", "other_0002", "flare_0001", "empty_0003"]
    available = availability_from_keys(keys, DSMDataset.from_json(DATASET_JSON), CLASSES)
    expected = torch.tensor(
        [[True, True, False], [True, True, True], [True, False, True], [False, False, False]]
    )
    assert available.dtype == torch.bool
    assert torch.equal(available, expected)
    without_table = DSMDataset.from_json({"labels": DATASET_JSON["labels"]})
    assert torch.equal(availability_from_keys(["a", "b"], without_table, CLASSES), torch.ones(2, 3, dtype=torch.bool))


def test_availability_unknown_names_raise():
    labels = DATASET_JSON["labels"]
    bad = {"labels": labels, "dsm": {"class_availability": {"case_7": ["liver", "livr", "pancreas"]}}}
    with pytest.raises(DSMDatasetError, match=r"case_7.*\['livr', 'pancreas'\]"):
        DSMDataset.from_json(bad)
    with pytest.raises(DSMDatasetError, match="list of label names"):
        DSMDataset.from_json({"labels": labels, "dsm": {"class_availability": {"case_7": "liver"}}})
    # A label that is not an output channel of the model (e.g. a region trained without it).
    with pytest.raises(DSMDatasetError, match="not output channels"):
        availability_from_keys(["lits_0007"], DSMDataset.from_json(DATASET_JSON), ["liver", "kidney_right"])


def test_availability_drives_the_loss_end_to_end():
    keys = ["lits_0007", "flare_0001"]
    available = availability_from_keys(keys, DSMDataset.from_json(DATASET_JSON), CLASSES)
    logits, target = _inputs((2, 3, 8, 8, 8), seed=9)
    value = PartialLabelDiceBCELoss()(logits, target, available)
    value.backward()
    assert torch.count_nonzero(logits.grad[0, 2]) == 0
    assert torch.count_nonzero(logits.grad[1, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0


def test_deep_supervision_takes_one_availability_mask_per_output():
    """DSM stage 2: the semantic output counts every annotated class, its stage-1 outputs only the
    queried (organ) classes, so a tumour channel's target changes the first term only."""
    base = PartialLabelDiceBCELoss()
    wrapper = PartialLabelDeepSupervision(base, [0.5, 0.5])
    pairs = [_inputs((2, 3, 8, 8, 4), seed=i) for i in range(2)]
    logits, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    available = torch.ones(2, 3, dtype=torch.bool)
    organs = available.clone()
    organs[:, 2] = False
    value = wrapper(logits, targets, [available, organs])
    expected = 0.5 * base(logits[0], targets[0], available) + 0.5 * base(logits[1], targets[1], organs)
    torch.testing.assert_close(value, expected)
    flipped = [t.clone() for t in targets]
    flipped[1][:, 2] = ~flipped[1][:, 2].bool()
    torch.testing.assert_close(wrapper(logits, flipped, [available, organs]), value)
    with pytest.raises(ValueError, match="availability masks"):
        wrapper(logits, targets, [available])
