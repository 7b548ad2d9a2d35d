"""One description of a DSM dataset, built once from ``dataset.json``.

Classes are the foreground labels in ``dataset.json`` order (regions as tuples of label ids); each
has a prompt name (``dsm.prompts``, else the label name itself), and its role follows from that prompt
name by one rule: a tumour if the vocabulary calls it one (``vocabulary.is_tumour``), an organ
otherwise. Training (organ channels of stage 2), the anomaly baselines and the evaluation all use
this rule, so a label ``my_liver`` prompted as ``liver`` is an organ everywhere.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.vocabulary import TUMOUR_PARENTS, is_tumour


class DatasetError(DSMError, ValueError):
    """A dataset.json DSM cannot read; the message names the file and the key."""


@dataclass(frozen=True)
class DSMDataset:
    classes: dict[str, tuple[int, ...]]  # foreground label name -> label ids whose union is its mask
    prompts: dict[str, str]  # label name -> class name used for text prompts
    file_ending: str = ".nii.gz"
    ignore_label: int | None = None
    availability: dict[str, frozenset[str]] = field(default_factory=dict)

    def available(self, case: str) -> frozenset[str]:
        """Classes annotated in ``case``; a case missing from the table annotates every class."""
        return self.availability.get(case, frozenset(self.classes))

    def is_tumour(self, name: str) -> bool:
        return is_tumour(self.prompts[name])

    @property
    def organs(self) -> list[str]:
        return [n for n in self.classes if not self.is_tumour(n)]

    @property
    def organ_indices(self) -> list[int]:
        """Positions of the organ classes in class order (a sigmoid model's channels)."""
        return [i for i, n in enumerate(self.classes) if not self.is_tumour(n)]

    def parent_organs(self, name: str) -> list[str]:
        """Classes of this dataset whose prompt is a parent organ of ``name``'s prompt (tumours)."""
        parents = TUMOUR_PARENTS.get(self.prompts[name], ())
        return [n for n in self.classes if self.prompts[n] in parents]

    @classmethod
    def from_json(cls, dataset_json: Mapping[str, Any], source: str = "dataset.json") -> "DSMDataset":
        labels = dataset_json.get("labels")
        if not isinstance(labels, Mapping) or not labels:
            raise DatasetError(f"{source}: 'labels' must map label names to ids, got {labels!r}")
        classes: dict[str, tuple[int, ...]] = {}
        ignore_label = None
        for name, value in labels.items():
            try:
                if name == "ignore":
                    ignore_label = int(value)
                    continue
                ids = tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)
            except (TypeError, ValueError):
                raise DatasetError(f"{source}: label {name!r} has id {value!r}, not an integer or a list of them") from None
            if name == "background" or ids == (0,):
                continue
            classes[name] = ids
        if not classes:
            raise DatasetError(f"{source}: 'labels' has no foreground class")
        dsm = dataset_json.get("dsm", {})
        prompts_table = dsm.get("prompts", {}) if isinstance(dsm, Mapping) else {}
        prompts = {name: str(prompts_table.get(name, name)) for name in classes}
        table = dsm.get("class_availability", {}) if isinstance(dsm, Mapping) else {}
        if not isinstance(table, Mapping):
            raise DatasetError(f"{source}: ['dsm']['class_availability'] must map case ids to lists of label names")
        availability = {}
        for case, names in table.items():
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise DatasetError(
                    f"{source}: ['dsm']['class_availability'][{case!r}] must be a list of label names, got {names!r}"
                )
            unknown = sorted(set(names) - set(classes) - {"background"})
            if unknown:
                raise DatasetError(
                    f"{source}: ['dsm']['class_availability'][{case!r}] names unknown classes {unknown}; "
                    f"use only these label names: {list(classes)}"
                )
            availability[case] = frozenset(n for n in names if n in classes)
        return cls(classes, prompts, dataset_json.get("file_ending", ".nii.gz"), ignore_label, availability)
