"""Patient-level cross-validation folds from dataset.json dsm.patients."""

import json
from pathlib import Path

import pytest

from nnunetv2_dsm.dataset import DSMDatasetError
from nnunetv2_dsm.planners.patient_splits import patient_splits, patients_of, write_patient_splits


def _json(patients: dict) -> dict:
    return {"labels": {"background": 0, "liver": 1}, "dsm": {"patients": patients}}


def test_leave_one_patient_out_in_listed_order() -> None:
    groups = patients_of(_json({"B": ["b1"], "A": ["a1", "a2", "a3"]}), ["a1", "a2", "a3", "b1", "x"])
    assert groups == {"B": ["b1"], "A": ["a1", "a2", "a3"], "x": ["x"]}, "unlisted cases are their own patient"
    splits = patient_splits(groups)
    assert splits[0] == {"train": ["a1", "a2", "a3", "x"], "val": ["b1"]}
    assert splits[1] == {"train": ["b1", "x"], "val": ["a1", "a2", "a3"]}
    assert len(splits) == 3


def test_many_patients_give_five_folds_that_never_split_a_patient() -> None:
    patients = {f"p{i}": [f"p{i}_t0", f"p{i}_t1"] for i in range(12)}
    cases = [c for v in patients.values() for c in v]
    splits = patient_splits(patients_of(_json(patients), cases))
    assert len(splits) == 5
    assert sorted(c for s in splits for c in s["val"]) == sorted(cases), "every case validated exactly once"
    for s in splits:
        assert not {c.split("_")[0] for c in s["train"]} & {c.split("_")[0] for c in s["val"]}


def test_no_patients_means_nnunet_default(tmp_path: Path) -> None:
    assert write_patient_splits(tmp_path, _json({}), ["a", "b"]) is None
    assert not (tmp_path / "splits_final.json").exists()


def test_written_once_and_existing_splits_are_checked(tmp_path: Path) -> None:
    dj = _json({"B": ["b1"], "A": ["a1", "a2"]})
    written = write_patient_splits(tmp_path, dj, ["a1", "a2", "b1"])
    assert json.loads((tmp_path / "splits_final.json").read_text()) == written
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["a1"], "val": ["a2", "b1"]}]))
    with pytest.raises(DSMDatasetError, match=r"fold 0 trains and validates on the same patient\(s\) \['A'\]"):
        write_patient_splits(tmp_path, dj, ["a1", "a2", "b1"])


def test_bad_patient_lists_are_clear_errors() -> None:
    with pytest.raises(DSMDatasetError, match="listed for patients 'A' and 'B'"):
        patients_of(_json({"A": ["c"], "B": ["c"]}), ["c"])
    with pytest.raises(DSMDatasetError, match="at least two"):
        patient_splits(patients_of(_json({"A": ["c"]}), ["c"]))
