"""Cross-validation folds that never split a patient, from ``dataset.json["dsm"]["patients"]``.

nnU-Net's default split is a 5-fold KFold over case ids, which puts slabs, crops or time points of one
patient on both sides of a fold. A dataset can list its patients in order,

    "dsm": {"patients": {"B": ["tsexample_B"], "A": ["tsexample_A"]}}

and the DSM planners then write ``splits_final.json`` (nnU-Net's own file, which every trainer reads,
stock ``nnUNetTrainer`` included) with patient-level folds: with at most five patients, leave one
patient out, fold k validating on the k-th listed patient; with more, five folds with the patients
dealt round-robin in the listed order. Cases not listed are patients of their own. An existing
``splits_final.json`` is kept when no fold puts one patient on both sides, and is an error otherwise.
"""

import json
import os
from pathlib import Path

from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.io import atomic

MAX_FOLDS = 5


def patients_of(dataset_json: dict, case_ids: list[str]) -> dict[str, list[str]] | None:
    """Ordered patient -> cases for ``case_ids`` (unlisted cases are their own patient), or None."""
    listed = DSMDataset.from_json(dataset_json).patients
    if not listed:
        return None
    known = set(case_ids)
    groups = {patient: [c for c in cases if c in known] for patient, cases in listed.items()}
    groups = {patient: cases for patient, cases in groups.items() if cases}
    for case in sorted(known - {c for cases in listed.values() for c in cases}):
        groups[case] = [case]
    return groups


def patient_splits(groups: dict[str, list[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net splits (list of {'train', 'val'}) from ordered patient groups."""
    patients = list(groups)
    if len(patients) < 2:
        raise DSMDatasetError(f"dataset.json: dsm.patients gives {len(patients)} patient(s); cross-validation "
                              "by patient needs at least two")
    n_folds = min(MAX_FOLDS, len(patients))
    folds = [patients[k::n_folds] for k in range(n_folds)]
    return [{"train": sorted(c for p in patients if p not in held for c in groups[p]),
             "val": sorted(c for p in held for c in groups[p])} for held in folds]


def check_splits_respect_patients(splits: list[dict], groups: dict[str, list[str]], path: Path) -> None:
    owner = {c: p for p, cases in groups.items() for c in cases}
    for k, fold in enumerate(splits):
        shared = sorted({owner.get(c) for c in fold["train"]} & {owner.get(c) for c in fold["val"]} - {None})
        if shared:
            raise DSMDatasetError(
                f"{path}: fold {k} trains and validates on the same patient(s) {shared} (dataset.json "
                "dsm.patients). Delete the file and re-run the DSM planner to get patient-level folds."
            )


def write_patient_splits(preprocessed_folder: str | os.PathLike, dataset_json: dict,
                         case_ids: list[str]) -> list[dict] | None:
    """Write patient-level ``splits_final.json`` when dataset.json lists patients; returns the splits in use."""
    groups = patients_of(dataset_json, case_ids)
    if groups is None:
        return None
    path = Path(preprocessed_folder) / "splits_final.json"
    if path.is_file():
        splits = json.loads(path.read_text())
        check_splits_respect_patients(splits, groups, path)
        return splits
    splits = patient_splits(groups)
    atomic.write_json(path, splits)
    return splits
