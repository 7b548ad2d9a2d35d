"""Contrast-phase augmentation: the transform, and its place in nnU-Net's own training pipeline."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm.trainers.contrast_augmentation import (
    ContrastAugmentationError,
    ContrastPhaseAugmentation,
    ContrastPhaseTransform,
)

# CT normalisation statistics in HU (mean, std, upper clipping percentile), as nnU-Net's fingerprint stores them
STATS = {"0": {"mean": 50.0, "std": 100.0, "percentile_99_5": 250.0, "percentile_00_5": -900.0}}


def _sample() -> dict:
    seg = torch.zeros(1, 32, 32)
    seg[0, 4:12, 4:12] = 1
    seg[0, 16:28, 16:28] = 2
    seg[0, :, :2] = -1  # outside the volume (nnU-Net's padding)
    image = torch.linspace(-1, 1, 32 * 32).reshape(1, 32, 32).clone()
    return {"image": image, "segmentation": seg}


def test_each_structure_gets_its_own_offset_within_range():
    transform = ContrastPhaseTransform([1, 2], max_offset=1.5, upper=10.0)
    np.random.seed(0)
    changes = []
    for _ in range(20):
        sample = _sample()
        before = sample["image"].clone()
        after = transform(**sample)["image"]
        diff = after - before
        seg = sample["segmentation"][0]
        assert torch.all(diff[0][seg <= 0] == 0), "background and padding keep their intensities"
        offsets = [diff[0][seg == label] for label in (1, 2)]
        for offset in offsets:
            assert torch.allclose(offset, offset[0].expand_as(offset)), "one offset per structure"
            assert 0 <= offset[0] <= 1.5
        changes.append([float(o[0]) for o in offsets])
    changes = np.array(changes)
    assert changes.std(0).min() > 0.2, "offsets are random"
    assert abs(np.corrcoef(changes.T)[0, 1]) < 0.8, "structures are enhanced independently"


def test_enhanced_voxels_are_clipped_like_the_preprocessing():
    transform = ContrastPhaseTransform([1], max_offset=5.0, upper=0.5)
    np.random.seed(1)
    sample = _sample()
    sample["image"][:] = 2.0  # already above the bound outside the organ (e.g. bone): left alone
    out = transform(**sample)["image"][0]
    seg = sample["segmentation"][0]
    assert torch.all(out[seg == 1] == 0.5)
    assert torch.all(out[seg != 1] == 2.0)


class _Probe(ContrastPhaseAugmentation, nnUNetTrainer):
    """The mixin over nnU-Net's own trainer, with only the attributes the pipeline needs."""

    def __init__(self, schemes=("CTNormalization",)):  # noqa: D107 - nnU-Net's __init__ needs a dataset
        self.configuration_name = "2d"
        self.configuration_manager = SimpleNamespace(normalization_schemes=list(schemes))
        self.plans_manager = SimpleNamespace(foreground_intensity_properties_per_channel=STATS)
        self.label_manager = SimpleNamespace(foreground_labels=[1, 2])


def test_inserted_after_the_spatial_transform_of_nnunets_pipeline():
    pipeline = _Probe().get_training_transforms(
        np.array([32, 32]), (-np.pi, np.pi), None, (0, 1), False, foreground_labels=[1, 2])
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names[0] == "SpatialTransform"
    inserted = pipeline.transforms[1]
    assert isinstance(inserted.transform, ContrastPhaseTransform) and inserted.apply_probability == 0.5
    assert inserted.transform.labels == [1, 2]
    # 150 HU at std 100 HU; upper bound (250 - 50) / 100
    assert inserted.transform.max_offset == pytest.approx(1.5) and inserted.transform.upper == pytest.approx(2.0)
    stock = nnUNetTrainer.get_training_transforms(np.array([32, 32]), (-np.pi, np.pi), None, (0, 1), False,
                                                  foreground_labels=[1, 2])
    assert len(pipeline.transforms) == len(stock.transforms) + 1
    torch.manual_seed(0)
    out = pipeline(**{k: v.clone() for k, v in _sample().items()})
    assert out["image"].shape == (1, 32, 32) and torch.isfinite(out["image"]).all()


def test_non_ct_configuration_is_refused_with_the_fix():
    with pytest.raises(ContrastAugmentationError, match="CTNormalization.*ZScoreNormalization|ZScoreNormalization"):
        _Probe(("ZScoreNormalization",)).contrast_transform()


def test_stock_commands_find_the_trainers():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for name in ("DSMTrainer_contrastAug", "DSMBaselineTrainer_contrastAug",
                 "DSMTrainer_Benchmark_contrastAug", "DSMBaselineTrainer_Benchmark_contrastAug"):
        cls = recursive_find_trainer_class_by_name(name)
        assert issubclass(cls, ContrastPhaseAugmentation), name
