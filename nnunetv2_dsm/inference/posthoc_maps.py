"""Post-hoc anomaly maps of a trained model: its logits on each case, scored by ``evaluation.posthoc``.

Writes ``OUTPUT/<method>/<case>_anomaly<ending>`` in each input's geometry (``sml`` also writes
``sml_statistics.json``, from the training images given as ``stats_images``), staged so that an
interrupted run leaves the output folder as it was.
"""

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.evaluation.maxlogit import ANOMALY_SUFFIX, organ_channels
from nnunetv2_dsm.evaluation.posthoc import METHODS, PosthocError, score, sml_statistics
from nnunetv2_dsm.inference.logits import LogitsPredictor
from nnunetv2_dsm.io import atomic


def write_posthoc_maps(model: Path, folds: Sequence, checkpoint: str, images: Path, output: Path,
                       methods: Sequence[str], stats_images: Path | None = None, device: str = "cpu",
                       mirroring: bool = True) -> list[Path]:
    """Every method's anomaly map of every case of ``images``, under ``output/<method>/`` (staged)."""
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
    names = DSMDataset.from_json(dataset_json).names

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
