"""Results of the learning benchmark (``learning.py``): held-out Dice and confusion from the predicted
files, the curves' PNG, and merging runs made by separate invocations into one results file."""

import json
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnunetv2_dsm.evaluation.metrics import confusion, dice  # noqa: E402
from nnunetv2_dsm.io import atomic  # noqa: E402
from nnunetv2_dsm.trainers.sdseg_trainer import SDSegTrainer  # noqa: E402

# per-model keys of the results file, each "<model><suffix>"
MODEL_SUFFIXES = ("_heldout_dice", "_heldout_confusion", "_seed_to_seed_dice", "_patient_c_dice",
                  "_training_patient_dice")


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_per_class(prediction: Path, reference: Path, labels: dict[str, int]) -> dict[str, float]:
    pred, ref = _read(prediction), _read(reference)
    out = {name: round(dice(ref == label, pred == label).value, 4) for name, label in labels.items()}
    out["mean"] = round(float(np.nanmean([out[n] for n in labels])), 4)
    return out


def confusion_of_classes(prediction: Path, reference: Path, labels: dict[str, int]) -> dict[str, dict[str, float]]:
    """Where each organ of ``reference`` went in ``prediction`` (fractions of its voxels, rounded)."""
    rows = confusion(_read(reference), _read(prediction), labels)
    return {organ: {k: round(v, 3) for k, v in row.items()} for organ, row in rows.items()}


def pair_ratios(payload: dict) -> dict[str, float]:
    """Mean held-out Dice of each DSM model over its nnU-Net twin (same augmentation), e.g.
    ``ratio_dsm_contrast_aug_over_nnunet_contrast_aug_mean_dice``; plain DSM keeps ``ratio_dsm_over_nnunet_mean_dice``."""
    out = {}
    for key, scores in payload.items():
        model = key[: -len("_heldout_dice")] if key.endswith("_heldout_dice") else None
        twin = f"nnunet{model[3:]}" if model and model.startswith("dsm") else None
        if twin and f"{twin}_heldout_dice" in payload:
            out[f"ratio_{model}_over_{twin}_mean_dice"] = round(
                scores["mean"] / max(payload[f"{twin}_heldout_dice"]["mean"], 1e-6), 4)
    return out


def plot(curves: dict, final: dict, out_png: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dsm": "tab:red", "nnunet": "tab:blue", "dsm_sgd": "tab:orange", "dsm_kmeans_void": "tab:purple",
               "dsm_static_queries": "tab:green", "dsm_no_ssm": "tab:brown", "dsm_bg_query": "tab:pink",
               "dsm_bg_query_update_drop": "tab:gray", "sdseg": "tab:olive", "sdseg_final_step": "tab:cyan",
               "dsm_contrast_aug": "darkred", "nnunet_contrast_aug": "navy",
               "dsm_contrast_aug_no_mirroring": "salmon", "nnunet_contrast_aug_no_mirroring": "cornflowerblue"}
    labels = {"dsm": "DSM stage 1", "nnunet": "nnU-Net (nnUNetTrainer)", "dsm_sgd": "DSM, SGD everywhere",
              "dsm_kmeans_void": "DSM, k-means void", "dsm_static_queries": "DSM, queries not updated per image",
              "dsm_no_ssm": "DSM without SSM", "dsm_bg_query": "DSM, background query",
              "dsm_bg_query_update_drop": "DSM, background query + update dropout",
              "sdseg": "SDSeg (from scratch)", "sdseg_final_step": "SDSeg, 1/4 of samples at t=T-1",
              "dsm_contrast_aug": "DSM, contrast-phase aug.", "nnunet_contrast_aug": "nnU-Net, contrast-phase aug.",
              "dsm_contrast_aug_no_mirroring": "DSM, contrast-phase aug., no mirroring",
              "nnunet_contrast_aug_no_mirroring": "nnU-Net, contrast-phase aug., no mirroring"}
    for name, epochs in curves.items():
        epochs = [e for e in epochs if e.get("phase") != "autoencoder"]  # SDSeg's reconstruction Dice
        iterations = [e["iterations"] for e in epochs]
        cpu = [e["cpu_seconds"] for e in epochs]
        mean_dice = [float(np.mean(e["pseudo_dice"])) for e in epochs]
        label = labels.get(name, name)
        for ax, x in zip(axes, (iterations, cpu)):
            ax.plot(x, mean_dice, "o-", color=colours.get(name), label=f"{label}: pseudo-Dice on B patches")
            if name not in final:
                continue
            ax.plot([x[-1]], [final[name]["mean"]], "*", markersize=14, color=colours.get(name),
                    label=f"{label}: full-volume Dice on B ({final[name]['mean']:.3f})")
    axes[0].set_xlabel("training iterations")
    axes[1].set_xlabel("training CPU seconds")
    for ax in axes:
        ax.set_ylabel("mean Dice over 5 organs, held-out patient B")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def mark_autoencoder_epochs(name: str, epochs: list[dict]) -> list[dict]:
    """SDSeg's first epochs train its mask autoencoder: their pseudo-Dice is reconstruction Dice, not a
    prediction, so they are marked ``phase: autoencoder`` and left out of the plotted curves."""
    if not name.startswith("sdseg"):
        return epochs
    if not epochs:
        return epochs
    first = SDSegTrainer.autoencoder_epochs_of(max(e["epoch"] for e in epochs) + 1)
    return [{**e, "phase": "autoencoder" if e["epoch"] < first else "diffusion"} for e in epochs]


def replot(out: Path) -> None:
    """Redraw the PNG of an existing results file (after marking SDSeg's autoencoder epochs)."""
    payload = json.loads(out.read_text())
    payload["curves"] = {k: mark_autoencoder_epochs(k, v) for k, v in payload["curves"].items()}
    atomic.write_json(out, payload, strict=False)
    final = {k[: -len("_heldout_dice")]: v for k, v in payload.items() if k.endswith("_heldout_dice")}
    config = payload["config"]
    plot(payload["curves"], final, out.with_suffix(".png"),
         f"Trained on patient A, Dice on held-out patient B (TotalSegmentator labels); {config['configuration']}, "
         f"{config['spacing_mm'][0]:g} mm, {config['epochs']}x{config['iterations_per_epoch']} iterations "
         f"(SDSeg: iterations per model in the JSON), CPU {config['threads']} threads")


def merge_earlier(payload: dict, earlier: dict, models_now: list[str]) -> None:
    """Keep the results of models not run now (from ``earlier``, the previous --out file), marked as such."""
    per_model = ("cpu_seconds", "status", "curves", "iterations_per_model", "predict_cpu_seconds")
    kept = [m for m in earlier.get("curves", {}) if m not in models_now]
    for key in per_model:
        for model in kept:
            if model in earlier.get(key, {}):
                payload.setdefault(key, {})[model] = earlier[key][model]
    for model in kept:
        payload.setdefault("iterations_per_model", {}).setdefault(model, earlier.get("iterations"))
        for suffix in MODEL_SUFFIXES:
            if model + suffix in earlier:
                payload[model + suffix] = earlier[model + suffix]
    if kept:
        payload["earlier_runs"] = {**earlier.get("earlier_runs", {}),
                                   **{m: {"command": earlier.get("command"), "trainers": earlier.get("config", {}).get(
                                       "trainers", {}).get(m)} for m in kept if m not in earlier.get("earlier_runs", {})}}
    repredicted = {m: v for m, v in earlier.get("repredicted", {}).items() if m in kept}
    if repredicted:
        payload["repredicted"] = repredicted
    if "runs_note" in earlier:
        payload["runs_note"] = earlier["runs_note"]
