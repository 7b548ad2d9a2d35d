"""Overlay pictures of predictions on CT slices."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from nnunetv2_dsm.io.atomic import atomic_path  # noqa: E402

CT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (HU)


def _axial(image: sitk.Image) -> np.ndarray:
    """(z, y, x) array in a canonical orientation so slices look the same whatever the file's axes."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _save(fig: plt.Figure, out_png: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out_png`` atomically and close it."""
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out_png


def overlay_png(ct_path: str | os.PathLike, prediction_path: str | os.PathLike, out_png: str | os.PathLike,
                class_names: dict[int, str], reference_path: str | os.PathLike | None = None,
                title: str | None = None) -> Path:
    """Axial slice with the most foreground: CT, reference (left) and prediction (right) overlays.

    Panels are titled ``<title>: reference/prediction``; ``title`` defaults to the prediction's case id.
    """
    ct = _axial(sitk.ReadImage(str(ct_path)))
    pred = _axial(sitk.ReadImage(str(prediction_path)))
    ref = _axial(sitk.ReadImage(str(reference_path))) if reference_path is not None else None
    score = (ref if ref is not None else pred) > 0
    z = int(np.argmax(score.reshape(score.shape[0], -1).sum(1)))
    labels = sorted(set(class_names) & set(np.unique(pred[z]).tolist()
                                             + (np.unique(ref[z]).tolist() if ref is not None else [])))
    colours = plt.get_cmap("tab20", max(len(class_names), 1))
    cmap = ListedColormap([(0, 0, 0, 0)] + [colours(i) for i in range(len(class_names))])
    index = {label: i + 1 for i, label in enumerate(sorted(class_names))}

    panels = [("reference", ref), ("prediction", pred)] if ref is not None else [("prediction", pred)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.6), squeeze=False)
    name = title or Path(str(prediction_path)).name.split(".")[0]
    for ax, (panel, seg) in zip(axes[0], panels):
        ax.imshow(np.clip(ct[z], *CT_WINDOW), cmap="gray", origin="upper")
        coloured = np.vectorize(lambda v: index.get(v, 0))(seg[z])
        ax.imshow(coloured, cmap=cmap, vmin=0, vmax=len(class_names), alpha=0.45, interpolation="nearest")
        ax.set_title(f"{name}: {panel} (slice {z})", fontsize=9)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(index[label])) for label in labels]
    fig.legend(handles, [class_names[label] for label in labels], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, out_png)


def score_overlay_png(ct_path: str | os.PathLike, score_paths: dict[str, str | os.PathLike],
                      out_png: str | os.PathLike, reference_path: str | os.PathLike, label: int | list[int],
                      title: str | None = None) -> Path:
    """Axial slice with the most voxels of ``label`` in the reference: CT with the reference outline, then
    one panel per score map (a heat map over the CT, scaled to the map's 1st-99.9th percentile in the case)
    with the reference outline on top, titled by its key in ``score_paths``."""
    ct = _axial(sitk.ReadImage(str(ct_path)))
    lesion = np.isin(_axial(sitk.ReadImage(str(reference_path))), np.atleast_1d(label))
    z = int(np.argmax(lesion.reshape(lesion.shape[0], -1).sum(1)))
    panels = [("CT + reference", None)] + [(k, _axial(sitk.ReadImage(str(p)))) for k, p in score_paths.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (name, score) in zip(axes[0], panels):
        ax.imshow(np.clip(ct[z], *CT_WINDOW), cmap="gray", origin="upper")
        if score is not None:
            lo, hi = np.percentile(score, [1.0, 99.9])
            ax.imshow(np.clip((score[z] - lo) / max(hi - lo, 1e-8), 0, 1), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        ax.contour(lesion[z], levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title or Path(str(ct_path)).name} (slice {z}; cyan: reference lesion)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)
