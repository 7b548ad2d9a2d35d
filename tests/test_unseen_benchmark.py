"""The unseen-tumour benchmark recipe (nnunetv2_dsm.data.unseen_benchmark) on the real example CT."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_dsm.data.unseen_benchmark import SEEN, UNSEEN, build_unseen_benchmark
from nnunetv2_dsm.visualization import score_overlay_png
from nnunetv2_dsm.vocabulary import TUMOUR_PARENTS


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory, example_ct_dir):
    root = tmp_path_factory.mktemp("unseen")
    return build_unseen_benchmark(root / "Dataset991_UnseenTumours", root / "test", train_variants=1,
                                  src=example_ct_dir)


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_training_set_holds_no_unseen_name(benchmark):
    dataset, _ = benchmark
    data = json.loads((dataset / "dataset.json").read_text())
    unseen = {t for types in UNSEEN.values() for t in types}
    assert not unseen & set(data["labels"])
    assert set(SEEN) <= set(data["labels"])
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["unseen_A_00_0000.nii.gz"]
    label = _array(dataset / "labelsTr" / "unseen_A_00.nii.gz")
    assert {data["labels"]["liver_tumor"], data["labels"]["kidney_tumor"]} <= set(np.unique(label).tolist())


def test_test_patients_carry_unseen_lesions_inside_their_host_organ(benchmark, example_ct_dir):
    dataset, test = benchmark
    train_labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    data = json.loads((test / "dataset.json").read_text())
    ids = {k: (v if isinstance(v, list) else [v]) for k, v in data["labels"].items()}
    # the training ids are kept: a model's label ids mean the same in the test labels
    assert all(ids[k][0] == (v if isinstance(v, int) else v[0]) for k, v in train_labels.items())
    placed = data["dsm"]["benchmark"]["lesions_placed"]
    assert {info["patient"] for info in placed.values()} == set(UNSEEN)
    for case, info in placed.items():
        label = _array(test / "labels" / f"{case}.nii.gz")
        assert _array(test / "images" / f"{case}_0000.nii.gz").shape == label.shape
        assert set(info["lesions"]) == set(UNSEEN[info["patient"]])
        for tumour, lesions in info["lesions"].items():
            assert lesions, f"no {tumour} placed in {case}"
            lesion = label == ids[tumour][0]
            assert lesion.any()
            assert tumour in data["dsm"]["class_availability"][case]
            # the voxels around a lesion are its host organ's (an organ contains its tumours)
            ring = np.zeros_like(lesion)
            ring[tuple(slice(max(0, lo - 1), hi + 2) for lo, hi in zip(*(np.argwhere(lesion).min(0),
                                                                         np.argwhere(lesion).max(0))))] = True
            hosts = {ids[p][0] for p in TUMOUR_PARENTS[tumour] if p in ids}
            assert hosts & set(np.unique(label[ring & ~lesion]).tolist())
    c_case = next(c for c, i in placed.items() if i["patient"] == "tsexample_C")
    assert sorted(data["dsm"]["class_availability"][c_case]) == ["aorta", "aortic_tumor"]


def test_clean_images_differ_from_the_test_cases_inside_the_lesions_only(benchmark):
    _, test = benchmark
    data = json.loads((test / "dataset.json").read_text())
    for case, info in data["dsm"]["benchmark"]["lesions_placed"].items():
        clean = _array(test / "clean" / f"{info['patient']}_0000.nii.gz")
        image = _array(test / "images" / f"{case}_0000.nii.gz")
        lesion = _array(test / "labels" / f"{case}.nii.gz") >= min(data["labels"][t] for t in info["lesions"])
        changed = clean != image
        # lesion edges are blurred into the voxels around them (synthesis' edge_blur_mm)
        near = ndimage.binary_dilation(lesion, iterations=3)
        assert (changed & lesion).sum() > 0.5 * lesion.sum(), f"{case}: the clean CT lacks the lesions"
        assert (changed & ~near).sum() < 0.01 * changed.sum(), f"{case}: the clean CT is the same patient elsewhere"


def test_score_overlay_png(tmp_path):
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(40, 20, (4, 32, 32)).astype(np.int16))
    label = np.zeros((4, 32, 32), np.uint8)
    label[2, 10:14, 10:14] = 3
    ref = sitk.GetImageFromArray(label)
    score = sitk.GetImageFromArray(label.astype(np.float32) / 3)
    for image, name in ((ct, "ct"), (ref, "ref"), (score, "score")):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    png = score_overlay_png(tmp_path / "ct.nii.gz", {"a score": tmp_path / "score.nii.gz"}, tmp_path / "o.png",
                            tmp_path / "ref.nii.gz", 3, title="case")
    assert png.stat().st_size > 1000
