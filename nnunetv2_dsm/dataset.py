"""One description of a DSM dataset, built once from ``dataset.json``.

Classes are the foreground labels in ``dataset.json`` order (regions as tuples of label ids); each
has a prompt name (``dsm.prompts``, else the label name itself), and its role follows from that prompt
name by one rule: a tumour if the vocabulary calls it one (``vocabulary.is_tumour``), an organ
otherwise. Training (organ channels of stage 2), the anomaly baselines and the evaluation all use
this rule, so a label ``my_liver`` prompted as ``liver`` is an organ everywhere.

Nothing else in the package parses ``labels``, ``dsm.prompts``, ``dsm.class_availability`` or
``dsm.patients`` or ``dsm.orientation``; every problem is one ``DSMDatasetError`` naming the file, the key and the fix.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY
from nnunetv2_dsm.vocabulary import CANONICAL, TUMOUR_PARENTS, is_tumour

# Label names that name no output channel: accepted in the availability table and ignored there.
_CHANNEL_FREE_LABELS = frozenset({"background"})


class DSMDatasetError(DSMError, ValueError):
    """A dataset.json DSM cannot read; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DSMDataset:
    classes: dict[str, tuple[int, ...]]  # foreground label name -> label ids whose union is its mask
    prompts: dict[str, str]  # label name -> class name used for text prompts
    file_ending: str = ".nii.gz"
    ignore_label: int | None = None
    availability: dict[str, frozenset[str]] = field(default_factory=dict)
    patients: dict[str, tuple[str, ...]] = field(default_factory=dict)  # patient -> its case ids (dsm.patients)
    source: str = "dataset.json"
    prompted: frozenset[str] = frozenset()  # labels with an explicit entry in dsm.prompts
    orientation: str | None = None  # dsm.orientation: the orientation code the training images are stored in

    # ---- classes and roles -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Foreground label names in output-channel order."""
        return list(self.classes)

    @property
    def prompt_names(self) -> list[str]:
        """Prompt (text) name of every class, in output-channel order."""
        return [self.prompts[n] for n in self.classes]

    def is_tumour(self, name: str) -> bool:
        return is_tumour(self.prompts[name])

    @property
    def organs(self) -> list[str]:
        return [n for n in self.classes if not self.is_tumour(n)]

    @property
    def organ_indices(self) -> list[int]:
        """Positions of the organ classes in class order (a sigmoid model's channels)."""
        return [i for i, n in enumerate(self.classes) if not self.is_tumour(n)]

    @property
    def organ_channels(self) -> list[int]:
        """Channels whose class is an organ; every channel when the dataset has no organ."""
        return self.organ_indices or list(range(len(self.classes)))

    def parent_organs(self, name: str) -> list[str]:
        """Classes of this dataset whose prompt is a parent organ of ``name``'s prompt (tumours)."""
        parents = TUMOUR_PARENTS.get(self.prompts[name], ())
        return [n for n in self.classes if self.prompts[n] in parents]

    # ---- partial labels ----------------------------------------------------------------------
    def available(self, case: str) -> frozenset[str]:
        """Classes annotated in ``case``; a case missing from the table annotates every class."""
        return self.availability.get(case, frozenset(self.classes))

    @property
    def partially_labelled(self) -> bool:
        return any(names != frozenset(self.classes) for names in self.availability.values())

    def availability_mask(self, cases: Sequence[str], channels: Sequence[str] | None = None) -> np.ndarray:
        """(B, C) bool: entry (b, c) is True when ``cases[b]`` annotates ``channels[c]`` (default: classes)."""
        channels = list(self.classes) if channels is None else list(channels)
        if len(set(channels)) != len(channels):
            raise ValueError(f"channel names contain duplicates: {channels}")
        unknown = sorted({n for names in self.availability.values() for n in names} - set(channels))
        if unknown:
            raise DSMDatasetError(
                f"{self.source}: ['dsm']['class_availability'] names {unknown}, which are not output channels "
                f"of this model ({channels}); use only these names"
            )
        return np.array([[c in self.available(case) for c in channels] for case in cases], dtype=bool).reshape(
            len(cases), len(channels))

    # ---- checks that only training needs -----------------------------------------------------
    def require_prompts(self) -> "DSMDataset":
        """Every class needs a name the text encoder can read: canonical, or given in ``dsm.prompts``."""
        unnamed = [n for n in self.classes if n not in self.prompted and n not in CANONICAL]
        if unnamed:
            raise DSMDatasetError(
                f"{self.source}: DSM needs a class name it can turn into a text prompt for every label, but "
                f"{unnamed} are not in the DSM vocabulary (nnunetv2_dsm.vocabulary.CANONICAL). Either rename the "
                "labels to canonical names (e.g. 'liver', 'kidney_right', 'liver_tumor'), convert the dataset "
                "with `nnunetv2_dsm recipe`, or add \"dsm\": {\"prompts\": {\"<label>\": \"<class name>\"}} to "
                "dataset.json."
            )
        return self

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, dataset_json: Mapping[str, Any], source: str = "dataset.json") -> "DSMDataset":
        source = str(source)
        labels = dataset_json.get("labels")
        if not isinstance(labels, Mapping) or not labels:
            raise DSMDatasetError(f"{source}: 'labels' must map label names to ids ('background': 0 and one entry "
                                  f"per class), got {labels!r}")
        classes: dict[str, tuple[int, ...]] = {}
        ignore_label = None
        for name, value in labels.items():
            try:
                if name == "ignore":
                    ignore_label = int(value)
                    continue
                ids = tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)
            except (TypeError, ValueError):
                raise DSMDatasetError(
                    f"{source}: label {name!r} has id {value!r}, not an integer or a list of them") from None
            if name == "background" or ids == (0,):
                continue
            classes[name] = ids
        if not classes:
            raise DSMDatasetError(f"{source}: 'labels' has no foreground class; DSM needs at least one class to segment")
        dsm = dataset_json.get("dsm", {})
        if not isinstance(dsm, Mapping):
            raise DSMDatasetError(f"{source}: 'dsm' must be an object (prompts, class_availability, patients)")
        prompts_table = dsm.get("prompts", {})
        if not isinstance(prompts_table, Mapping):
            raise DSMDatasetError(f"{source}: ['dsm']['prompts'] must map label names to class names")
        prompts = {name: str(prompts_table.get(name) or name).strip() or name for name in classes}
        return cls(classes, prompts, dataset_json.get("file_ending", ".nii.gz"), ignore_label,
                   _read_availability(dsm.get("class_availability", {}), classes, source),
                   _read_patients(dsm.get("patients", {}), source), source,
                   frozenset(n for n in classes if str(prompts_table.get(n) or "").strip()),
                   dsm.get(ORIENTATION_KEY))


def _read_availability(table: Any, classes: Mapping[str, Any], source: str) -> dict[str, frozenset[str]]:
    if not isinstance(table, Mapping):
        raise DSMDatasetError(f"{source}: ['dsm']['class_availability'] must map case ids to lists of label names")
    availability = {}
    for case, names in table.items():
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise DSMDatasetError(
                f"{source}: ['dsm']['class_availability'][{case!r}] must be a list of label names, got {names!r}")
        unknown = sorted(set(names) - set(classes) - _CHANNEL_FREE_LABELS)
        if unknown:
            raise DSMDatasetError(
                f"{source}: ['dsm']['class_availability'][{case!r}] lists {unknown}, which are not labels of this "
                f"dataset; use only these label names: {list(classes)}"
            )
        availability[case] = frozenset(n for n in names if n in classes)
    return availability


def _read_patients(listed: Any, source: str) -> dict[str, tuple[str, ...]]:
    if not listed:
        return {}
    if not isinstance(listed, Mapping) or not all(isinstance(v, list) for v in listed.values()):
        raise DSMDatasetError(f"{source}: ['dsm']['patients'] must map patient ids to lists of case ids")
    owner: dict[str, str] = {}
    for patient, cases in listed.items():
        for case in cases:
            if case in owner:
                raise DSMDatasetError(f"{source}: case {case!r} is listed for patients {owner[case]!r} and "
                                      f"{patient!r} in ['dsm']['patients']; list every case once")
            owner[case] = patient
    return {str(p): tuple(cases) for p, cases in listed.items()}
