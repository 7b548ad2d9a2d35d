"""Post-hoc anomaly scores from the logits of any trained segmentation model (nnU-Net or DSM).

Each score is computed per voxel from the network's raw outputs z (C, *S) over the organ channels
(tumour classes excluded, ``maxlogit.organ_channels``) and is larger where the voxel is more
anomalous, the convention of ``nnunetv2_dsm evaluate``:

- ``msp``: maximum softmax (or sigmoid) probability, ``-max_c p_c`` (Hendrycks and Gimpel 2017);
- ``maxlogit``: ``-max_c z_c`` (Hendrycks et al. 2022; MaxQuery for segmentation);
- ``energy``: the free energy ``-T log sum_c exp(z_c / T)`` over the classes of a softmax output
  (Liu et al. 2020); for sigmoid (multi-label) outputs the joint energy
  ``-sum_c log(1 + exp(z_c))`` (Wang et al. 2021), since each channel is its own two-class softmax;
- ``sml``: standardized max logit, ``-(max_c z_c - mu_k) / sigma_k`` with k the voxel's predicted
  class and (mu_k, sigma_k) the mean and standard deviation of the max logit over the voxels
  predicted as k in the training cases (Jung et al. 2021), so classes with larger typical logits do
  not look less anomalous.

``softmax`` says how the model's channels were trained: nnU-Net on plain labels uses a softmax with
channel 0 background; DSM and any region-based model use one sigmoid per class.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nnunetv2_dsm.errors import DSMError

METHODS = ("msp", "maxlogit", "energy", "sml")


class PosthocError(DSMError, ValueError):
    pass


def _organs(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    # logits: (C, *S) -> (len(channels), *S), float64 for stable exponentials
    if logits.ndim < 2 or not channels or max(channels) >= logits.shape[0]:
        raise PosthocError(f"logits of shape {logits.shape} have no channels {list(channels)}")
    return logits[list(channels)].astype(np.float64)


def _logsumexp(z: np.ndarray, axis: int = 0) -> np.ndarray:
    top = z.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def max_probability_score(logits: np.ndarray, channels: Sequence[int], softmax: bool) -> np.ndarray:
    """``-max_c p_c`` over ``channels``; p the softmax over all channels, or each channel's sigmoid."""
    # logits: (C, *S) -> (*S)
    if softmax:
        z = logits.astype(np.float64)
        probabilities = np.exp(z - _logsumexp(z)[None])[list(channels)]
    else:
        probabilities = 1.0 / (1.0 + np.exp(-_organs(logits, channels)))
    return (-probabilities.max(axis=0)).astype(np.float32)


def max_logit_score(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """``-max_c z_c`` over ``channels``."""
    # logits: (C, *S) -> (*S)
    return (-_organs(logits, channels).max(axis=0)).astype(np.float32)


def energy_score(logits: np.ndarray, channels: Sequence[int], softmax: bool, temperature: float = 1.0) -> np.ndarray:
    """Free energy of the organ classes (softmax) or their joint energy (sigmoid); higher = anomalous."""
    # logits: (C, *S) -> (*S)
    if temperature <= 0:
        raise PosthocError(f"energy temperature must be > 0, got {temperature}")
    z = _organs(logits, channels)
    if softmax:
        return (-temperature * _logsumexp(z / temperature)).astype(np.float32)
    return (-np.logaddexp(0.0, z).sum(axis=0)).astype(np.float32)


def predicted_organ(logits: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """Index into ``channels`` of each voxel's largest organ logit."""
    # logits: (C, *S) -> (*S) int
    return _organs(logits, channels).argmax(axis=0)


def sml_statistics(cases: Iterable[np.ndarray], channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per organ class k: mean and standard deviation of the max logit over the voxels predicted as k.

    ``cases`` yields logits (C, *S) of training cases. Accumulated as sums, so cases are never held
    together. A class predicted nowhere gets the statistics of all voxels.
    """
    k = len(channels)
    count, total, squares = np.zeros(k), np.zeros(k), np.zeros(k)
    all_count = all_total = all_squares = 0.0
    for logits in cases:
        z = _organs(logits, channels)
        top, winner = z.max(axis=0).ravel(), z.argmax(axis=0).ravel()
        count += np.bincount(winner, minlength=k)
        total += np.bincount(winner, weights=top, minlength=k)
        squares += np.bincount(winner, weights=top * top, minlength=k)
        all_count, all_total, all_squares = all_count + top.size, all_total + top.sum(), all_squares + (top * top).sum()
    if all_count == 0:
        raise PosthocError("no training logits to compute the SML statistics from")
    empty = count == 0
    count[empty], total[empty], squares[empty] = all_count, all_total, all_squares
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return mean, np.maximum(std, 1e-6)


def sml_score(logits: np.ndarray, channels: Sequence[int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``-(max_c z_c - mean_k) / std_k``, k the voxel's predicted organ class."""
    # logits: (C, *S) -> (*S)
    z = _organs(logits, channels)
    winner = z.argmax(axis=0)
    return (-(z.max(axis=0) - mean[winner]) / std[winner]).astype(np.float32)


def score(method: str, logits: np.ndarray, channels: Sequence[int], softmax: bool,
          statistics: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The anomaly map of ``method`` (one of ``METHODS``)."""
    if method == "msp":
        return max_probability_score(logits, channels, softmax)
    if method == "maxlogit":
        return max_logit_score(logits, channels)
    if method == "energy":
        return energy_score(logits, channels, softmax)
    if method == "sml":
        if statistics is None:
            raise PosthocError("sml needs statistics from training cases (sml_statistics)")
        return sml_score(logits, channels, *statistics)
    raise PosthocError(f"unknown post-hoc method {method!r}; choose from {', '.join(METHODS)}")


def write_posthoc_maps(model: Path, folds: Sequence, checkpoint: str, images: Path, output: Path,
                       methods: Sequence[str], stats_images: Path | None = None, device: str = "cpu",
                       mirroring: bool = True) -> list[Path]:
    """Every method's anomaly map of every case of ``images``, under ``output/<method>/`` (staged)."""
    import itertools

    import SimpleITK as sitk
    import torch
    from tqdm import tqdm

    from nnunetv2_dsm.evaluation.maxlogit import ANOMALY_SUFFIX, organ_channels
    from nnunetv2_dsm.inference.logits import LogitsPredictor
    from nnunetv2_dsm.io import atomic

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PosthocError(f"unknown post-hoc method(s) {unknown}; choose from {', '.join(METHODS)}")
    model, images, output = Path(model), Path(images), Path(output)
    if not (model / "plans.json").is_file():
        raise PosthocError(f"{model} is not a trained nnU-Net model folder (no plans.json)")
    for folder, what in ((images, "input"), (stats_images, "--stats-images")):
        if folder is not None and not Path(folder).is_dir():
            raise PosthocError(f"{what} folder {folder} not found")
    if output.resolve() in {images.resolve(), *([Path(stats_images).resolve()] if stats_images else [])}:
        raise PosthocError(f"output folder {output} must differ from the image folders")
    predictor = LogitsPredictor(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device(device),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), tuple(folds), checkpoint)
    dataset_json = predictor.dataset_json
    ending = dataset_json.get("file_ending", ".nii.gz")
    names = [k for k in dataset_json["labels"] if k not in ("background", "ignore")]

    def layout(logits: np.ndarray, source: str) -> tuple[list[int], bool]:
        return organ_channels(dataset_json, logits.shape[0], source), logits.shape[0] == len(names) + 1

    statistics, stats_channels = None, []
    if "sml" in methods:
        training = predictor.cases(stats_images)
        first = next(training, None)
        if first is None:
            raise PosthocError(f"--stats-images {stats_images} holds no <case>_0000{ending} images")
        stats_channels = layout(first[1], f"{stats_images}/{first[0]}")[0]
        logits_of = (logits for _, logits, _ in tqdm(training, desc="SML statistics", unit="case"))
        statistics = sml_statistics(itertools.chain([first[1]], logits_of), stats_channels)
    written = []
    with atomic.staged_folder(output, existing="merge") as stage:
        for method in methods:
            (stage / method).mkdir()
        for case, logits, reference in tqdm(predictor.cases(images), desc="post-hoc anomaly maps", unit="case"):
            channels, softmax = layout(logits, f"{images}/{case}")
            for method in methods:
                image = sitk.GetImageFromArray(score(method, logits, channels, softmax, statistics))
                image.CopyInformation(reference)
                target = stage / method / f"{case}{ANOMALY_SUFFIX}{ending}"
                with atomic.atomic_path(target) as tmp:
                    sitk.WriteImage(image, str(tmp), useCompression=True)
                written.append(output / method / target.name)
        if statistics is not None:
            atomic.write_json(stage / "sml_statistics.json", {
                "organ_channels": stats_channels, "mean": statistics[0].tolist(), "std": statistics[1].tolist(),
                "training_images": str(stats_images)})
    return written
