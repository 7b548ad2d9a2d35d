import json
import math

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.evaluation.partial_summary import mask_unannotated


def _write(path, array):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    sitk.WriteImage(image, str(path))


def test_unannotated_pairs_are_nan_and_excluded_from_means(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    base = np.zeros((4, 8, 8), dtype=np.uint8)
    base[:, :4] = 1
    with_kidney = base.copy()
    with_kidney[:, 6:] = 2
    # Case "a" does not annotate class 2, though the prediction shows it: nnU-Net scores Dice 0 there.
    _write(ref / "a.nii.gz", base)
    _write(pred / "a.nii.gz", with_kidney)
    _write(ref / "b.nii.gz", with_kidney)
    _write(pred / "b.nii.gz", with_kidney)
    summary_file = tmp_path / "summary.json"
    compute_metrics_on_folder(str(ref), str(pred), str(summary_file), SimpleITKIO(), ".nii.gz", [1, 2], None, 1)
    before = json.loads(summary_file.read_text())
    assert before["mean"]["2"]["Dice"] == 0.5

    dataset_json = {"labels": {"background": 0, "liver": 1, "kidney_right": 2}, "file_ending": ".nii.gz",
                    "dsm": {"class_availability": {"a": ["liver"]}}}
    summary = mask_unannotated(summary_file, DSMDataset.from_json(dataset_json), ["liver", "kidney_right"], [(1,), (2,)])
    per_case = {e["reference_file"].split("/")[-1]: e["metrics"] for e in summary["metric_per_case"]}
    assert math.isnan(per_case["a.nii.gz"][2]["Dice"]) and per_case["a.nii.gz"][2]["annotated"] is False
    assert per_case["a.nii.gz"][1]["Dice"] == 1.0
    assert summary["mean"][2]["Dice"] == 1.0, "only case b annotates class 2"
    assert summary["foreground_mean"]["Dice"] == 1.0
    reloaded = json.loads(summary_file.read_text())
    assert reloaded["mean"]["2"]["Dice"] == 1.0
    assert not list(tmp_path.glob("*.tmp-*")), "written atomically"
