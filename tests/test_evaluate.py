import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from sklearn.metrics import roc_auc_score, roc_curve

from nnunetv2_dsm.cli import evaluate as cli_evaluate
from nnunetv2_dsm.evaluation.evaluate import EvaluationError, evaluate_folder
from nnunetv2_dsm.evaluation.metrics import BOTH_EMPTY, NOT_ANNOTATED, ROI_NOT_ANNOTATED, body_mask

# DSM convention: organs contain their tumours, expressed as nnU-Net regions.
LABELS = {"background": 0, "liver": [1, 3], "spleen": 2, "liver_tumor": 3}
SHAPE = (8, 10, 12)


def _write(array: np.ndarray, path: Path, spacing=(1.5, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _dataset_json(path: Path, labels=LABELS, availability=None, regions_class_order=(1, 2, 3)) -> Path:
    data = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 3}
    if regions_class_order is not None:
        data["regions_class_order"] = list(regions_class_order)
    if availability is not None:
        data["dsm"] = {"class_availability": availability}
    path.write_text(json.dumps(data))
    return path


def _toy_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps with liver (tumour inside) and spleen."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:7, 1:6, 1:7] = 1
    ref[3:5, 2:4, 2:4] = 3
    ref[2:6, 6:9, 8:11] = 2
    pred = ref.copy()
    flip = rng.random(SHAPE) < 0.1
    pred[flip] = rng.integers(0, 4, SHAPE, dtype=np.uint8)[flip]
    return ref, pred


@pytest.fixture
def toy(tmp_path):
    """Three cases; case_b annotates organs only (partial labels), case_c has no spleen at all."""
    refs, preds = tmp_path / "labelsTr", tmp_path / "pred"
    arrays = {}
    for i, case in enumerate(["case_a", "case_b", "case_c"]):
        ref, pred = _toy_case(i)
        if case == "case_c":
            ref[ref == 2] = 0
            pred[pred == 2] = 0
        arrays[case] = (ref, pred)
        _write(ref, refs / f"{case}.nii.gz")
        _write(pred, preds / f"{case}.nii.gz")
    dj = _dataset_json(tmp_path / "dataset.json", availability={"case_b": ["liver", "spleen"]})
    return tmp_path, refs, preds, dj, arrays


def test_dsc_matches_nnunet_and_partial_labels_are_nan(toy):
    _, refs, preds, dj, arrays = toy
    result = evaluate_folder(preds, refs, dj, roi="image", progress=False)
    regions = [(1, 3), 2, 3]
    names = ["liver", "spleen", "liver_tumor"]
    for case in arrays:
        nnunet = compute_metrics(
            str(refs / f"{case}.nii.gz"), str(preds / f"{case}.nii.gz"), SimpleITKIO(), regions
        )["metrics"]
        for region, name in zip(regions, names):
            ours = result["per_case"][case][name]
            if case == "case_b" and name == "liver_tumor":
                assert ours["dsc"] is None and ours["dsc_note"] == NOT_ANNOTATED and not ours["available"]
                assert nnunet[region]["Dice"] == nnunet[region]["Dice"]  # nnU-Net scores it anyway
            elif math.isnan(nnunet[region]["Dice"]):
                assert ours["dsc"] is None and ours["dsc_note"] == BOTH_EMPTY
            else:
                assert ours["dsc"] == pytest.approx(nnunet[region]["Dice"], abs=1e-12)
                assert ours["n_ref"] == nnunet[region]["n_ref"] and ours["n_pred"] == nnunet[region]["n_pred"]
    assert result["per_case"]["case_c"]["spleen"]["dsc_note"] == BOTH_EMPTY

    tumour = result["summary"]["per_class"]["liver_tumor"]["dsc"]
    values = [result["per_case"][c]["liver_tumor"]["dsc"] for c in ("case_a", "case_c")]
    assert tumour["n"] == 2 and tumour["undefined"] == {NOT_ANNOTATED: 1}
    assert tumour["mean"] == pytest.approx(np.mean(values)) and tumour["std"] == pytest.approx(np.std(values))
    assert result["summary"]["per_class"]["spleen"]["dsc"]["undefined"] == {BOTH_EMPTY: 1}
    fg = result["summary"]["foreground_mean"]["dsc"]
    means = [result["summary"]["per_class"][n]["dsc"]["mean"] for n in names]
    assert fg["mean"] == pytest.approx(np.mean(means)) and fg["n_classes"] == 3


def test_reports_are_strict_json_and_csv_with_roi(toy):
    _, refs, preds, dj, arrays = toy
    out = toy[0] / "reports"
    evaluate_folder(preds, refs, dj, roi="image", output_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "metrics_per_case.csv",
        "metrics_summary.csv",
    ]
    data = json.loads(
        (out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    assert data["roi"]["mode"] == "image" and "every voxel" in data["roi"]["description"]
    per_case = (out / "metrics_per_case.csv").read_text().splitlines()
    assert per_case[0].startswith("case,class,available,n_ref,n_pred,roi,dsc,dsc_note")
    assert len(per_case) == 1 + 3 * 3
    assert any(line.startswith("case_b,liver_tumor,False") and NOT_ANNOTATED in line for line in per_case)
    summary = (out / "metrics_summary.csv").read_text().splitlines()
    assert summary[0] == "class,metric,mean,std,n,undefined,roi"
    assert any(line.startswith("foreground_mean,dsc,") for line in summary)


def test_score_maps_auroc_fpr95_in_image_and_parent_roi(toy):
    root, refs, preds, dj, arrays = toy
    rng = np.random.default_rng(7)
    scores = {}
    for case, (ref, _) in arrays.items():
        prob = np.clip((ref == 3) * 0.6 + rng.random(SHAPE) * 0.5, 0, 1).astype(np.float32)
        anomaly = ((ref == 3) * 1.0 + (ref == 2) * 0.8 + rng.normal(0, 0.4, SHAPE)).astype(np.float32)
        _write(prob, preds / f"{case}_liver_tumor.nii.gz")
        _write(anomaly, preds / f"{case}_anomaly.nii.gz")
        scores[case] = (prob, anomaly)

    def fpr95(y, s):
        fpr, tpr, _ = roc_curve(y, s)
        return float(np.interp(0.95, tpr, fpr))  # tpr is strictly increasing for continuous scores here

    image = evaluate_folder(preds, refs, dj, roi="image", output_dir=root / "img", progress=False)
    parent = evaluate_folder(preds, refs, dj, roi="parent", output_dir=root / "par", progress=False)
    for case in ("case_a", "case_c"):
        ref = arrays[case][0]
        prob, anomaly = scores[case]
        entry = image["per_case"][case]["liver_tumor"]
        assert entry["roi"] == "image" and entry["score_file"] == f"{case}_liver_tumor.nii.gz"
        assert entry["auroc"] == pytest.approx(roc_auc_score((ref == 3).ravel(), prob.ravel()))
        assert entry["fpr95"] == pytest.approx(fpr95((ref == 3).ravel(), prob.ravel()))
        assert entry["anomaly_auroc"] == pytest.approx(roc_auc_score((ref == 3).ravel(), anomaly.ravel()))
        liver = np.isin(ref, (1, 3))
        entry = parent["per_case"][case]["liver_tumor"]
        assert entry["roi"] == "parent(liver)"
        assert entry["auroc"] == pytest.approx(roc_auc_score(ref[liver] == 3, prob[liver]))
        assert entry["anomaly_fpr95"] == pytest.approx(fpr95(ref[liver] == 3, anomaly[liver]))
    # organs are not anomalies, and an unannotated tumour is nan, not 0 or 1
    assert "anomaly_auroc" not in image["per_case"]["case_a"]["spleen"]
    for result in (image, parent):
        entry = result["per_case"]["case_b"]["liver_tumor"]
        assert entry["auroc"] is None and entry["auroc_note"] == NOT_ANNOTATED
    summary = parent["summary"]["per_class"]["liver_tumor"]["auroc"]
    assert summary["n"] == 2 and summary["roi"] == ["parent(liver)"]


def test_parent_roi_not_annotated(tmp_path):
    labels = {"background": 0, "liver": [1, 2], "liver_tumor": 2}
    ref, _ = _toy_case(0)
    ref[ref == 2] = 0
    ref[ref == 3] = 2
    _write(ref, tmp_path / "ref" / "x.nii.gz")
    _write(ref, tmp_path / "pred" / "x.nii.gz")
    _write(np.random.default_rng(0).random(SHAPE).astype(np.float32), tmp_path / "pred" / "x_anomaly.nii.gz")
    dj = _dataset_json(tmp_path / "dataset.json", labels, {"x": ["liver_tumor"]}, (1, 2))
    result = evaluate_folder(tmp_path / "pred", tmp_path / "ref", dj, roi="parent", progress=False)
    entry = result["per_case"]["x"]["liver_tumor"]
    assert entry["anomaly_auroc"] is None and entry["anomaly_auroc_note"] == ROI_NOT_ANNOTATED


def test_stock_nnunet_npz_probabilities(tmp_path):
    """Softmax output of a stock nnU-Net trainer: label maps plus <case>.npz from --save_probabilities."""
    labels = {"background": 0, "a": 1, "b": 2}
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 3, SHAPE).astype(np.uint8)
    logits = rng.normal(size=(3, *SHAPE)) + 2.0 * np.eye(3)[ref].transpose(3, 0, 1, 2)
    prob = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    _write(ref, tmp_path / "ref" / "c1.nii.gz")
    _write(prob.argmax(0).astype(np.uint8), tmp_path / "pred" / "c1.nii.gz")
    np.savez_compressed(tmp_path / "pred" / "c1.npz", probabilities=prob.astype(np.float32))
    dj = _dataset_json(tmp_path / "dataset.json", labels, regions_class_order=None)
    result = evaluate_folder(tmp_path / "pred", tmp_path / "ref", dj, roi="image", progress=False)
    for name, channel in (("a", 1), ("b", 2)):
        entry = result["per_case"]["c1"][name]
        assert entry["score_file"] == f"c1.npz[{channel}]"
        assert entry["auroc"] == pytest.approx(
            roc_auc_score((ref == channel).ravel(), prob[channel].ravel()), abs=1e-6
        )


def test_body_roi_on_real_ct(tmp_path, example_ct_dir):
    ct_image = sitk.ReadImage(str(example_ct_dir / "example_ct.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir / "example_seg_fast_force_split.nii.gz")))
    ref = np.zeros(seg.shape, np.uint8)
    ref[seg == 5] = 1  # TotalSegmentator liver
    ref[seg == 1] = 2  # spleen
    zz, yy, xx = np.nonzero(ref == 1)
    centre = np.array([int(np.median(zz)), int(np.median(yy)), int(np.median(xx))])
    grid = np.indices(seg.shape)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    ref[(dist < 4) & (ref == 1)] = 3  # a synthetic lesion inside the liver
    anomaly = (np.exp(-dist / 6) + np.random.default_rng(0).normal(0, 0.05, seg.shape)).astype(np.float32)

    def write_like(array, path):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(ct_image)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))

    sitk.WriteImage(ct_image, str(tmp_path / "ct_0000.nii.gz"))
    write_like(ref, tmp_path / "ref" / "ct.nii.gz")
    write_like(ref, tmp_path / "pred" / "ct.nii.gz")
    write_like(anomaly, tmp_path / "pred" / "ct_anomaly.nii.gz")
    dj = _dataset_json(tmp_path / "dataset.json")

    with pytest.raises(EvaluationError, match="--roi image"):
        evaluate_folder(tmp_path / "pred", tmp_path / "ref", dj, roi="body", progress=False)
    result = evaluate_folder(
        tmp_path / "pred", tmp_path / "ref", dj, images=tmp_path, roi="body", progress=False
    )
    body = body_mask(sitk.GetArrayFromImage(ct_image))
    entry = result["per_case"]["ct"]["liver_tumor"]
    assert entry["roi"] == "body" and result["roi"]["mode"] == "body"
    assert entry["anomaly_auroc"] == pytest.approx(roc_auc_score(ref[body] == 3, anomaly[body]))
    assert entry["anomaly_auroc"] > 0.95
    assert result["per_case"]["ct"]["liver"]["dsc"] == 1.0


def test_input_errors_name_the_files(toy):
    root, refs, preds, dj, arrays = toy
    (preds / "case_c.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="case_c.nii.gz.*--chill"):
        evaluate_folder(preds, refs, dj, roi="image", progress=False)
    assert set(evaluate_folder(preds, refs, dj, roi="image", chill=True, progress=False)["per_case"]) == {
        "case_a",
        "case_b",
    }

    _write(np.zeros((8, 10, 11), np.uint8), preds / "case_a.nii.gz")
    with pytest.raises(
        EvaluationError, match=r"pred/case_a.nii.gz does not match .*labelsTr/case_a.nii.gz.*size"
    ):
        evaluate_folder(preds, refs, dj, roi="image", chill=True, progress=False)
    _write(arrays["case_a"][1], preds / "case_a.nii.gz", origin=(5.0, 0.0, 0.0))
    with pytest.raises(EvaluationError, match="origin"):
        evaluate_folder(preds, refs, dj, roi="image", chill=True, progress=False)
    _write(arrays["case_a"][1], preds / "case_a.nii.gz")

    _write(arrays["case_a"][1], preds / "stray.nii.gz")
    with pytest.raises(EvaluationError, match="stray.nii.gz has no reference"):
        evaluate_folder(preds, refs, dj, roi="image", chill=True, progress=False)
    (preds / "stray.nii.gz").unlink()

    bad = _dataset_json(root / "bad.json", availability={"case_a": ["livr"]})
    with pytest.raises(EvaluationError, match=r"bad.json.*'livr'"):
        evaluate_folder(preds, refs, bad, roi="image", chill=True, progress=False)
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_folder(preds, refs, root / "missing.json", roi="image", progress=False)
    assert not list(preds.glob(".*"))  # no temporary files left behind


def test_cli_subcommand(toy, capsys):
    root, refs, preds, dj, _ = toy
    parser = argparse.ArgumentParser()
    cli_evaluate.register(parser.add_subparsers())
    args = parser.parse_args(
        ["evaluate", str(preds), str(refs), "-d", str(dj), "--roi", "image", "-o", str(root / "o")]
    )
    assert args.func(args) == 0
    assert (root / "o" / "metrics.json").is_file()
    assert "foreground mean dsc" in capsys.readouterr().out
    args = parser.parse_args(["evaluate", str(preds), str(root / "nowhere"), "-d", str(dj)])
    assert args.func(args) == 2
    assert "reference folder" in capsys.readouterr().err


def test_score_maps_in_separate_folder(toy):
    root, refs, preds, dj, arrays = toy
    scores = root / "scores"
    rng = np.random.default_rng(1)
    for case in arrays:
        _write(rng.random(SHAPE).astype(np.float32), scores / f"{case}_anomaly.nii.gz")
    result = evaluate_folder(preds, refs, dj, roi="image", scores=scores, progress=False)
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(str(scores / "case_a_anomaly.nii.gz")))
    ref = arrays["case_a"][0]
    entry = result["per_case"]["case_a"]["liver_tumor"]
    assert entry["anomaly_score_file"] == "case_a_anomaly.nii.gz" and result["scores"] == str(scores)
    assert entry["anomaly_auroc"] == pytest.approx(roc_auc_score((ref == 3).ravel(), anomaly.ravel()))
    # a label map in the score folder is not taken for a prediction
    _write(arrays["case_a"][1], scores / "case_a.nii.gz")
    with pytest.raises(EvaluationError, match="scores/case_a.nii.gz is named like a label map"):
        evaluate_folder(preds, refs, dj, roi="image", scores=scores, progress=False)


def test_bad_label_maps_and_scores_are_errors_not_scores(toy):
    """Undeclared label values, fractional label values, truncated files and NaN scores stop evaluation."""
    root, refs, preds, dj, arrays = toy
    ref_a, pred_a = arrays["case_a"]

    bad_pred = pred_a.copy()
    bad_pred[0, 0, 0] = 99
    _write(bad_pred, preds / "case_a.nii.gz")
    with pytest.raises(EvaluationError, match=r"predicted label map .*pred/case_a.nii.gz.*\[99\]"):
        evaluate_folder(preds, refs, dj, roi="image", progress=False)
    _write(pred_a, preds / "case_a.nii.gz")

    bad_ref = ref_a.copy()
    bad_ref[0, 0, 0] = 42
    _write(bad_ref, refs / "case_a.nii.gz")
    with pytest.raises(EvaluationError, match=r"reference label map .*labelsTr/case_a.nii.gz.*\[42\]"):
        evaluate_folder(preds, refs, dj, roi="image", progress=False)
    _write(ref_a, refs / "case_a.nii.gz")

    fractional = pred_a.astype(np.float32)
    fractional[0, 0, 0] = 0.5
    _write(fractional, preds / "case_a.nii.gz")
    with pytest.raises(EvaluationError, match=r"\[0.5\]"):
        evaluate_folder(preds, refs, dj, roi="image", progress=False)
    _write(pred_a.astype(np.float32), preds / "case_a.nii.gz")  # integral floats are fine
    evaluate_folder(preds, refs, dj, roi="image", progress=False)
    _write(pred_a, preds / "case_a.nii.gz")

    whole = (preds / "case_a.nii.gz").read_bytes()
    (preds / "case_a.nii.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EvaluationError, match="truncated"):
        evaluate_folder(preds, refs, dj, roi="image", progress=False)
    _write(pred_a, preds / "case_a.nii.gz")

    scores = root / "scores"
    score = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    score[1, 1, 1] = np.nan
    _write(score, scores / "case_a_liver_tumor.nii.gz")
    with pytest.raises(EvaluationError, match=r"score map .*case_a_liver_tumor.nii.gz.*1 NaN"):
        evaluate_folder(preds, refs, dj, roi="image", scores=scores, chill=True, progress=False)
