"""Max-logit anomaly maps (MaxQuery-style) from the organ outputs of any nnU-Net model.

A voxel that no organ channel claims is anomalous: the score is ``-max_c p_c(x)`` over the organ
channels c of the predicted probabilities. It needs only what ``nnUNetv2_predict
--save_probabilities`` writes (``<case>.npz`` with ``probabilities`` of shape (C, z, y, x), already
resampled to the original image grid), so it serves as the unseen-tumour baseline for stock nnU-Net
and for stage-1 DSM models alike.

Channel layout follows nnU-Net's label managers: with C equal to the number of foreground classes
the channels are sigmoid regions in dataset.json label order (DSM's label manager, or any dataset
with region syntax); with one more channel they are softmax over label ids, channel 0 background
(stock nnU-Net on a plain label dataset). Tumour classes (``nnunetv2_dsm.vocabulary``) are
excluded, so a model trained on seen tumours is not credited with them as organ evidence.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.io.atomic import atomic_path, staged_folder

ANOMALY_SUFFIX = "_anomaly"


class MaxLogitError(DSMError, ValueError):
    pass


def organ_channels(dataset_json: Mapping[str, Any], num_channels: int, source: str = "probabilities") -> list[int]:
    """Channels of a saved probability array (``num_channels`` long) that hold organ classes.

    Raises ``MaxLogitError`` when ``num_channels`` fits neither nnU-Net layout of this dataset.
    """
    dataset = DSMDataset.from_json(dataset_json, source)
    names = dataset.names
    if not dataset.organs:
        raise MaxLogitError(f"dataset.json declares no organ class; {source} has nothing to take the maximum over")
    has_regions = any(len(ids) > 1 for ids in dataset.classes.values())
    if num_channels == len(names):
        return dataset.organ_indices
    if num_channels == len(names) + 1 and not has_regions:
        return [dataset.classes[n][0] for n in dataset.organs]
    expected = f"{len(names)} (sigmoid regions)" + ("" if has_regions else f" or {len(names) + 1} (softmax)")
    raise MaxLogitError(
        f"{source} has {num_channels} channels but this dataset.json's {len(names)} classes give {expected}; "
        "was it predicted by a model of this dataset?"
    )


def max_logit_score(probabilities: np.ndarray, channels: list[int]) -> np.ndarray:
    """Anomaly score ``-max_c probabilities[c]`` over ``channels``; probabilities (C, ...) -> score (...)."""
    return -np.max(probabilities[channels], axis=0).astype(np.float32, copy=False)


def write_anomaly_map(npz: Path, image: Path, output: Path, dataset_json: Mapping[str, Any]) -> Path:
    """Score of ``npz`` written to ``output`` in the geometry of ``image`` (atomic write)."""
    with np.load(npz) as data:
        if "probabilities" not in data:
            raise MaxLogitError(f"{npz} has no 'probabilities' array; write it with nnUNetv2_predict --save_probabilities")
        probabilities = data["probabilities"]
    reference = sitk.ReadImage(str(image))
    grid = sitk.GetArrayViewFromImage(reference).shape
    if probabilities.ndim != len(grid) + 1 or probabilities.shape[1:] != grid:
        raise MaxLogitError(
            f"{npz}: probabilities of shape {probabilities.shape} do not match the grid {grid} of {image}; "
            "pass the images the predictions were made from"
        )
    score = sitk.GetImageFromArray(max_logit_score(probabilities, organ_channels(dataset_json, len(probabilities), str(npz))))
    score.CopyInformation(reference)
    ending = dataset_json.get("file_ending", ".nii.gz")
    with atomic_path(output, suffix=ending) as tmp:
        sitk.WriteImage(score, str(tmp), useCompression=True)
    return output


def write_anomaly_maps(predictions: str | os.PathLike, images: str | os.PathLike, output: str | os.PathLike,
                       dataset_json: Mapping[str, Any]) -> list[Path]:
    """``<case>_anomaly<file_ending>`` in ``output`` for every ``<case>.npz`` of ``predictions``.

    ``images`` holds the inputs (``<case>_0000<file_ending>``) whose geometry the maps take.
    """
    predictions, images, output = Path(predictions), Path(images), Path(output)
    ending = dataset_json.get("file_ending", ".nii.gz")
    if not predictions.is_dir():
        raise MaxLogitError(f"predictions folder {predictions} not found")
    if not images.is_dir():
        raise MaxLogitError(f"images folder {images} not found")
    npzs = sorted(predictions.glob("*.npz"))
    if not npzs:
        raise MaxLogitError(
            f"{predictions} holds no <case>.npz; predict with `nnUNetv2_predict ... --save_probabilities`"
        )
    if output.resolve() in (predictions.resolve(), images.resolve()):
        raise MaxLogitError(
            f"output folder {output} must differ from the predictions and images folders (nnU-Net's evaluation "
            "reads every image file of the predictions folder as a label map)"
        )
    pairs = []
    for npz in npzs:
        image = images / f"{npz.stem}_0000{ending}"
        if not image.is_file():
            raise MaxLogitError(f"{npz} has no input image {image}; pass the folder the predictions were made from")
        pairs.append((npz, image))
    # Staged: on an error in any case, nothing is written (and no output folder is created).
    with staged_folder(output, existing="merge") as stage:
        for npz, image in tqdm(pairs, desc="max-logit anomaly maps", unit="case"):
            write_anomaly_map(npz, image, stage / f"{npz.stem}{ANOMALY_SUFFIX}{ending}", dataset_json)
    return [output / f"{npz.stem}{ANOMALY_SUFFIX}{ending}" for npz, _ in pairs]
