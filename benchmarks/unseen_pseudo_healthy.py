"""Pseudo-healthy part of ``benchmarks/unseen.py`` (DiffuGTS method, diffusion model trained here).

The synthetic lesions were inserted into real CT, so the true healthy image is known (the test folder's
``clean/``). Inside each lesion: mean |pseudo-healthy - clean| against mean |lesioned image - clean|, their
ratio (below 1: the pseudo-healthy image is nearer the truth than the image was), for

- ``own region``: DiffuGTS's candidate region (the relative threshold of its attention map); a lesion the
  region misses keeps the autoencoder's reconstruction of the image there;
- ``lesion region``: ``diffugts-predict --regions`` with the test cases' lesion masks (every lesion of the
  case inpainted from each prompt's healthy text): the inpainting alone, the lesion found perfectly.

Each in Hounsfield units as written, and within the model's intensity window (nnU-Net's CT normalisation
clips to the training foreground's 0.5-99.5 percentiles, so intensities outside it cannot be produced by
any model trained on these plans; the clean image and the lesioned one are clipped to the same window).
``coverage`` is the fraction of lesion voxels the method's own region inpainted (residual above 0).
"""

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from unseen import BIN, FOLD, model_folder, run  # noqa: E402

from nnunetv2_dsm.inference.diffugts_predictor import DIFFUGTS_DIR  # noqa: E402
from nnunetv2_dsm.inference.prompts import prompt_slug  # noqa: E402
from nnunetv2_dsm.io import atomic  # noqa: E402


def prompt_of(tumour: str) -> str:
    """The words a user types for a tumour class: ``spleen_tumor`` -> ``spleen tumor``."""
    return tumour.replace("_", " ")


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def lesion_region_maps(name: str, work: Path, test: Path, env: dict, log, unseen: list[str]) -> Path:
    """``diffugts-predict --regions`` of model ``name`` with every case's lesion mask: the output folder."""
    model = model_folder(work / "results", name)
    out = work / "scores" / f"{name}_lesion_region"
    if out.exists():
        return out
    dataset = json.loads((test / "dataset.json").read_text())
    tumour_ids = [dataset["labels"][t] for t in unseen]
    regions = work / "lesion_regions"  # shared by every DiffuGTS model of the work folder
    regions.mkdir(parents=True, exist_ok=True)
    for label in sorted((test / "labels").glob("*.nii.gz")):
        if (regions / label.name).exists():
            continue
        reference = sitk.ReadImage(str(label))
        mask = sitk.GetImageFromArray(np.isin(sitk.GetArrayFromImage(reference), tumour_ids).astype(np.uint8))
        mask.CopyInformation(reference)
        # atomic: a mask that exists is reused by the next model, so none may be half-written
        with atomic.atomic_path(regions / label.name, check=lambda tmp: sitk.ReadImage(str(tmp))) as tmp:
            sitk.WriteImage(mask, str(tmp), useCompression=True)
    run([str(BIN / "nnunetv2_dsm"), "diffugts-predict", "-i", str(test / "images"), "-o", str(out), "-m", str(model),
         "-f", FOLD, "--device", "cpu", "--regions", str(regions), "--prompts", *[prompt_of(t) for t in unseen]],
        env, log)
    return out


def intensity_window(name: str, work: Path) -> tuple[float, float]:
    """The CT normalisation's clip range of model ``name``'s plans (HU)."""
    plans = json.loads((model_folder(work / "results", name) / "plans.json").read_text())
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    return float(props["percentile_00_5"]), float(props["percentile_99_5"])


def _ratios(entries: dict) -> dict:
    out = {k: round(float(np.mean(v)), 4) for k, v in entries.items() if k != "coverage"}
    if entries.get("coverage"):
        out["coverage"] = round(float(np.mean(entries["coverage"])), 4)
    for suffix in ("", "_window"):
        out[f"ratio{suffix}"] = round(out[f"pseudo_healthy_hu{suffix}"] / max(out[f"lesioned_hu{suffix}"], 1e-6), 4)
    return out


def pseudo_healthy_errors(test: Path, folder: Path, window: tuple[float, float]) -> dict:
    """Per unseen type and pooled: errors inside the lesions (HU and in the window), ratio, coverage."""
    if not (test / "clean").is_dir():  # a test folder built before the clean CT was kept
        from nnunetv2_dsm.data.unseen_benchmark import write_clean_images

        write_clean_images(test)
    dataset = json.loads((test / "dataset.json").read_text())
    per_type: dict = {}
    low, high = window
    for case, info in sorted(dataset["dsm"]["benchmark"]["lesions_placed"].items()):
        clean = _read(test / "clean" / f"{info['patient']}_0000.nii.gz").astype(np.float32)
        image = _read(test / "images" / f"{case}_0000.nii.gz").astype(np.float32)
        reference = _read(test / "labels" / f"{case}.nii.gz")
        for tumour in info["lesions"]:
            lesion = reference == dataset["labels"][tumour]
            stem = folder / DIFFUGTS_DIR / f"{case}_{prompt_slug(prompt_of(tumour))}"
            healthy = _read(Path(f"{stem}_pseudo_healthy.nii.gz"))[lesion]
            residual = _read(Path(f"{stem}_residual.nii.gz"))[lesion]
            truth, lesioned = clean[lesion], image[lesion]
            entry = per_type.setdefault(tumour, {k: [] for k in ("pseudo_healthy_hu", "lesioned_hu", "pseudo_healthy_hu_window",
                                                                 "lesioned_hu_window", "coverage")})
            entry["pseudo_healthy_hu"].append(float(np.abs(healthy - truth).mean()))
            entry["lesioned_hu"].append(float(np.abs(lesioned - truth).mean()))
            clip = lambda a: np.clip(a, low, high)  # noqa: E731
            entry["pseudo_healthy_hu_window"].append(float(np.abs(clip(healthy) - clip(truth)).mean()))
            entry["lesioned_hu_window"].append(float(np.abs(clip(lesioned) - clip(truth)).mean()))
            entry["coverage"].append(float((residual > 1e-3).mean()))
    pooled = {k: [x for e in per_type.values() for x in e[k]] for k in next(iter(per_type.values()))}
    return {"per_type": {t: _ratios(e) for t, e in per_type.items()}, "pooled": _ratios(pooled),
            "window_hu": [round(low, 1), round(high, 1)]}


def pseudo_healthy_png(test: Path, folders: dict[str, Path], target: Path) -> None:
    """Per unseen type, its medium case's lesion slice: image, truth, then pseudo-healthy and residual per run."""
    dataset = json.loads((test / "dataset.json").read_text())
    rows = [(case, tumour, info["patient"]) for case, info in sorted(dataset["dsm"]["benchmark"]["lesions_placed"].items())
            if info["variant"] == "medium_hypodense" for tumour in info["lesions"]]
    columns = 2 + 2 * len(folders)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3 * columns, 3 * len(rows)), squeeze=False)
    for row, (case, tumour, patient) in zip(axes, rows):
        slug = prompt_slug(prompt_of(tumour))
        lesion = _read(test / "labels" / f"{case}.nii.gz") == dataset["labels"][tumour]
        z = int(np.argmax(lesion.sum((1, 2))))
        panels = [(_read(test / "images" / f"{case}_0000.nii.gz"), f"{case} {prompt_of(tumour)}: image"),
                  (_read(test / "clean" / f"{patient}_0000.nii.gz"), "truth (before insertion)")]
        for label, folder in folders.items():
            panels += [(_read(folder / DIFFUGTS_DIR / f"{case}_{slug}_pseudo_healthy.nii.gz"), f"pseudo-healthy ({label})"),
                       (_read(folder / DIFFUGTS_DIR / f"{case}_{slug}_residual.nii.gz"), f"residual ({label})")]
        for ax, (panel, title) in zip(row, panels):
            kwargs = {"cmap": "magma", "vmin": 0, "vmax": 1} if title.startswith("residual") else \
                {"cmap": "gray", "vmin": -160, "vmax": 240}
            ax.imshow(panel[z], **kwargs)
            ax.contour(lesion[z], levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("DiffuGTS method, diffusion model trained here: pseudo-healthy images (synthetic lesions, cyan)",
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic.write_bytes(target, buffer.getvalue())
    plt.close(fig)


def pseudo_healthy_payload(name: str, work: Path, test: Path, env: dict, log, unseen: list[str], own: Path,
                           png: Path) -> dict:
    """The JSON keys of model ``name``'s pseudo-healthy evaluation; ``own``: its prediction folder.

    Keys ``pseudo_healthy_error``, ``pseudo_healthy_error_lesion_region`` and ``pseudo_healthy_error_ratio``
    for ``diffugts``; prefixed by the model name for the others."""
    window = intensity_window(name, work)
    lesion_run = lesion_region_maps(name, work, test, env, log, unseen)
    prefix = "" if name == "diffugts" else f"{name}_"
    payload = {f"{prefix}pseudo_healthy_error": pseudo_healthy_errors(test, own, window),
               f"{prefix}pseudo_healthy_error_lesion_region": pseudo_healthy_errors(test, lesion_run, window)}
    payload[f"{prefix}pseudo_healthy_error_ratio"] = payload[f"{prefix}pseudo_healthy_error"]["pooled"]["ratio"]
    payload["pseudo_healthy_note"] = __doc__.split("\n\n", 1)[1].strip()
    pseudo_healthy_png(test, {"own region": own, "lesion region": lesion_run}, png)
    return payload
