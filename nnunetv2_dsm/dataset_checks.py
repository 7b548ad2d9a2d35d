"""Checks that a dataset.json carries what DSM needs, with errors that say how to fix it."""

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.vocabulary import CANONICAL


class DSMDatasetError(DSMError, ValueError):
    pass


def foreground_label_names(dataset_json: dict) -> list[str]:
    return [k for k in dataset_json["labels"] if k not in ("background", "ignore")]


def class_prompt_names(dataset_json: dict) -> dict[str, str]:
    """Label name -> class name used for text prompts (canonical names map to themselves)."""
    prompts = dataset_json.get("dsm", {}).get("prompts", {})
    return {name: prompts.get(name, name) for name in foreground_label_names(dataset_json)}


def check_dsm_dataset_json(dataset_json: dict, path: str) -> None:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or "background" not in labels:
        raise DSMDatasetError(f"{path}: 'labels' must be a dict with 'background': 0 and one entry per class.")
    names = foreground_label_names(dataset_json)
    if not names:
        raise DSMDatasetError(f"{path}: no foreground labels; DSM needs at least one class to segment.")
    prompts = dataset_json.get("dsm", {}).get("prompts", {})
    unnamed = [n for n in names if n not in CANONICAL and not str(prompts.get(n, "")).strip()]
    if unnamed:
        raise DSMDatasetError(
            f"{path}: DSM needs a class name it can turn into a text prompt for every label, but "
            f"{unnamed} are not in the DSM vocabulary (nnunetv2_dsm.vocabulary.CANONICAL). Either rename the "
            "labels to canonical names (e.g. 'liver', 'kidney_right', 'liver_tumor'), convert the dataset "
            "with `nnunetv2_dsm recipe`, or add \"dsm\": {\"prompts\": {\"<label>\": \"<class name>\"}} to "
            "dataset.json."
        )
    availability = dataset_json.get("dsm", {}).get("class_availability", {})
    for case, available in availability.items():
        bad = [n for n in available if n not in names]
        if bad:
            raise DSMDatasetError(
                f"{path}: dsm.class_availability[{case!r}] lists {bad}, which are not labels of this dataset "
                f"(labels: {names})."
            )
