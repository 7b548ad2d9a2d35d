"""Scoring half of ``benchmarks/unseen.py``: score maps of every trained model on the test patients,
their lesion metrics per unseen type, the results JSON and its pictures."""

import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from unseen import (  # noqa: E402
    CONFIGURATION,
    DATASET,
    DIFFUGTS_MODELS,
    FOLD,
    MODELS,
    POSTHOC_MODELS,
    PROMPT_MODELS,
    model_folder,
    run,
)
from unseen_pseudo_healthy import prompt_of, pseudo_healthy_payload  # noqa: E402

from nnunetv2_dsm.evaluation.lesions import FP_BUDGET, lesion_scores  # noqa: E402
from nnunetv2_dsm.evaluation.metrics import body_mask  # noqa: E402
from nnunetv2_dsm.evaluation.posthoc import METHODS  # noqa: E402
from nnunetv2_dsm.inference.diffugts_predictor import DIFFUGTS_DIR  # noqa: E402
from nnunetv2_dsm.inference.prompts import ANOMALY, SCORES_DIR, prompt_slug  # noqa: E402
from nnunetv2_dsm.io import atomic  # noqa: E402
from nnunetv2_dsm.visualization import score_overlay_png  # noqa: E402
from nnunetv2_dsm.vocabulary import TUMOUR_PARENTS  # noqa: E402

BIN = Path(sys.executable).parent
METRICS = ("auroc_host", "fpr95_host", "auroc_body", "fpr95_body", "detection", "dice")


def score_maps(args, work: Path, test: Path, raw: Path, env: dict, log, unseen: list[str]) -> dict[str, Path]:
    """Method name -> folder of ``<case>_<...>.nii.gz`` maps; predicts what is missing."""
    results = work / "results"
    folders: dict[str, Path] = {}
    images = test / "images"
    for name in PROMPT_MODELS:
        model = model_folder(results, name)
        if name not in args.models or not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
            continue
        for amvp_range, label in (("tile", name), ("case", f"{name}_caserange")):
            if amvp_range == "case" and name != "dsm":
                continue
            out = work / "scores" / label
            if not out.exists():
                run([str(BIN / "nnunetv2_dsm"), "predict", "-i", str(images), "-o", str(out), "-m", str(model),
                     "-f", FOLD, "--device", "cpu", "--disable-tta", "--amvp-range", amvp_range,
                     "--prompts", *[prompt_of(t) for t in unseen]], env, log)
            folders[f"{label}_prompt"] = out / SCORES_DIR
            if amvp_range == "tile":
                folders[f"{label}_anomaly"] = out / SCORES_DIR
    for name in POSTHOC_MODELS:
        model = model_folder(results, name)
        if name not in args.models or not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
            continue
        out = work / "scores" / f"{name}_posthoc"
        if not out.exists():
            run([str(BIN / "nnunetv2_dsm"), "anomaly-posthoc", "-m", str(model), "-f", FOLD, "-i", str(images),
                 "-o", str(out), "--stats-images", str(raw / "imagesTr"), "--device", "cpu", "--disable-tta"], env, log)
        for method in METHODS:
            folders[f"{name}_{method}"] = out / method
    for name in DIFFUGTS_MODELS:
        model = model_folder(results, name)
        if name not in args.models or not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
            continue
        out = work / "scores" / name
        if not out.exists():
            run([str(BIN / "nnunetv2_dsm"), "diffugts-predict", "-i", str(images), "-o", str(out), "-m", str(model),
                 "-f", FOLD, "--device", "cpu", "--prompts", *[prompt_of(t) for t in unseen]], env, log)
        folders[f"{name}_refined"] = out / SCORES_DIR
        folders[f"{name}_attention"] = out / DIFFUGTS_DIR
    return folders


def map_path(method: str, folder: Path, case: str, tumour: str) -> Path:
    if method.endswith("_attention"):
        return folder / f"{case}_{prompt_slug(prompt_of(tumour))}_attention.nii.gz"
    if method.endswith(("_prompt", "_refined")):
        return folder / f"{case}_{prompt_slug(prompt_of(tumour))}.nii.gz"
    return folder / f"{case}_{ANOMALY}.nii.gz"


def evaluate(test: Path, folders: dict[str, Path]) -> dict:
    """method -> tumour type -> case -> metrics."""
    dataset = json.loads((test / "dataset.json").read_text())
    labels = {k: (v if isinstance(v, list) else [v]) for k, v in dataset["labels"].items()}
    placed = dataset["dsm"]["benchmark"]["lesions_placed"]
    out: dict = {m: {} for m in folders}
    for case, info in sorted(placed.items()):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(test / "labels" / f"{case}.nii.gz")))
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(test / "images" / f"{case}_0000.nii.gz")))
        body = body_mask(ct)
        for tumour, lesions in info["lesions"].items():
            if not lesions:
                continue
            lesion = reference == labels[tumour][0]
            host = np.isin(reference, [i for p in TUMOUR_PARENTS[tumour] if p in labels for i in labels[p]])
            for method, folder in folders.items():
                score = sitk.GetArrayFromImage(sitk.ReadImage(str(map_path(method, folder, case, tumour))))
                result = lesion_scores(lesion, score.astype(np.float32), host, body).as_dict()
                out[method].setdefault(tumour, {})[case] = result
        print(f"  scored {case}", flush=True)
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.mean(values)), 4) if values else None


def summarise(per_case: dict) -> dict:
    """method -> tumour type -> metric (mean over the type's cases; detection pooled over lesions)."""
    table: dict = {}
    for method, types in per_case.items():
        table[method] = {}
        for tumour, cases in types.items():
            rows = list(cases.values())
            entry = {k: _mean(r[k] for r in rows) for k in ("auroc_host", "fpr95_host", "auroc_body", "fpr95_body",
                                                            "dice")}
            entry["detection"] = round(sum(r["detected"] for r in rows) / max(1, sum(r["lesions"] for r in rows)), 4)
            entry["lesions"] = sum(r["lesions"] for r in rows)
            table[method][tumour] = entry
        table[method]["mean"] = {k: _mean(table[method][t][k] for t in types) for k in METRICS}
    return table


def plot(table: dict, unseen: list[str], target: Path, subtitle: str) -> None:
    methods = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    for ax, metric, label in ((axes[0], "auroc_host", "voxel AUROC in the host organ"),
                              (axes[1], "detection", f"lesions detected at {FP_BUDGET:.0%} body FPR")):
        for i, method in enumerate(methods):
            values = [table[method].get(t, {}).get(metric) or 0.0 for t in unseen + ["mean"]]
            ax.bar(np.arange(len(values)) + i * width, values, width, label=method)
        ax.set_xticks(np.arange(len(unseen) + 1) + 0.4 - width / 2)
        ax.set_xticklabels([t.replace("_tumor", "") for t in unseen] + ["mean"])
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=10)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Unseen tumour types on held-out patients (synthetic lesions); {subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def overlays(test: Path, folders: dict[str, Path], target_dir: Path) -> list[str]:
    """For one case per unseen type: CT with the reference lesion and DSM's prompt map next to the best baseline."""
    dataset = json.loads((test / "dataset.json").read_text())
    placed = dataset["dsm"]["benchmark"]["lesions_placed"]
    written = []
    target_dir.mkdir(parents=True, exist_ok=True)
    for case, info in sorted(placed.items()):
        if info["variant"] != "medium_hypodense":
            continue
        for tumour, lesions in info["lesions"].items():
            if not lesions:
                continue
            maps = {m: map_path(m, f, case, tumour) for m, f in folders.items()
                    if m in ("dsm_prompt", "dsm_anomaly", "nnunet_msp", "nnunet_energy", "diffugts_refined")}
            label = dataset["labels"][tumour]
            png = target_dir / f"{case}_{tumour}.png"
            score_overlay_png(test / "images" / f"{case}_0000.nii.gz", maps, png,
                              test / "labels" / f"{case}.nii.gz", label, title=f"{case}: {prompt_of(tumour)}")
            written.append(str(png.relative_to(target_dir.parent)))
    return written


def write_leaderboard(per_case: dict, work: Path, target: Path) -> list[str]:
    """One leaderboard row per score: ``<trainer>+<score>`` with DSC (at the FP budget), AUROC and FPR95 in
    the host organ per unseen type, through the stock leaderboard (``nnunetv2_dsm leaderboard``)."""
    from nnunetv2_dsm.evaluation.leaderboard import make_leaderboard

    root = work / "leaderboard_results" / DATASET
    for method, types in per_case.items():
        model = max((m for m in MODELS if method.startswith(m + "_")), key=len)
        score = method[len(model) + 1:]
        trainer, plans, _, _ = MODELS[model]
        cases: dict = {}
        for tumour, rows in types.items():
            for case, r in rows.items():
                cases.setdefault(case, {})[tumour] = {
                    "dsc": r["dice"], "dsc_note": None, "auroc": r["auroc_host"], "auroc_note": None,
                    "fpr95": r["fpr95_host"], "fpr95_note": None}
        atomic.write_json(root / f"{trainer}+{score}__{plans}__{CONFIGURATION}" / f"fold_{FOLD}" / "metrics.json",
                          {"per_case": cases, "roi": {"mode": "host organ (parent) for AUROC/FPR95; DSC at the "
                                                              f"{FP_BUDGET:.0%} body FP budget"}}, strict=False)
    _, files = make_leaderboard([root.parent], target)
    return sorted(str(Path(p).relative_to(target.parent)) for p in files.values())  # beside the JSON


def score_all(args, work: Path, raw: Path, test: Path, env: dict, log, timings: dict, machine: dict) -> None:
    started = time.time()
    dataset = json.loads((test / "dataset.json").read_text())
    unseen = sorted({t for types in dataset["dsm"]["benchmark"]["unseen_tumours"].values() for t in types})
    folders = score_maps(args, work, test, raw, env, log, unseen)
    per_case = evaluate(test, folders)
    table = summarise(per_case)
    baselines = {m: v["mean"]["auroc_host"] for m, v in table.items() if m.startswith(POSTHOC_MODELS)}
    nnunet = {m: v for m, v in baselines.items() if m.startswith("nnunet_")}
    best = max(nnunet, key=lambda m: nnunet[m] or 0.0) if nnunet else None
    payload = {
        "data": "Training: patient A of the TotalSegmentator 2.18.0 example CT, 4 versions with synthetic liver and "
                "kidney tumours; organ labels are TotalSegmentator model output. Test: held-out patients B (spleen and "
                "stomach tumours) and C (aortic lesions), synthetic lesions of types absent from training, three "
                "sizes/contrasts each (nnunetv2_dsm.data.unseen_benchmark).",
        "metric_note": f"per type: mean over the type's test cases; detection: lesions with a voxel above the "
                       f"threshold at which {FP_BUDGET:.0%} of non-lesion body voxels score above it; dice at that "
                       "threshold inside the body; host organ = the type's parent organ label plus the lesion",
        "dsm_prompt_auroc": table.get("dsm_prompt", {}).get("mean", {}).get("auroc_host"),
        "dsm_anomaly_auroc": table.get("dsm_anomaly", {}).get("mean", {}).get("auroc_host"),
        "dsm_prompt_case_range_auroc": table.get("dsm_caserange_prompt", {}).get("mean", {}).get("auroc_host"),
        "dsm_no_amvp_prompt_auroc": table.get("dsm_no_amvp_prompt", {}).get("mean", {}).get("auroc_host"),
        "dsm_no_dqr_prompt_auroc": table.get("dsm_no_dqr_prompt", {}).get("mean", {}).get("auroc_host"),
        "diffugts_auroc": table.get("diffugts_refined", {}).get("mean", {}).get("auroc_host"),
        "diffugts_attention_auroc": table.get("diffugts_attention", {}).get("mean", {}).get("auroc_host"),
        "diffugts_no_grounding_auroc": table.get("diffugts_no_grounding_refined", {}).get("mean", {}).get("auroc_host"),
        "best_baseline_auroc": nnunet.get(best) if best else None,
        "best_baseline_name": best,
        "unseen_types": unseen,
        "table": table,
        "per_case": per_case,
        "budget": {"iterations_per_epoch": args.iterations, "dsm_stage1_epochs": args.stage1_epochs,
                   "dsm_stage2_epochs": args.stage2_epochs, "nnunet_epochs": args.total_epochs,
                   "diffugts_epochs": args.total_epochs,
                   "augmentation": "nnU-Net's default + contrast-phase augmentation, every model",
                   "configuration": "2d, 3 mm", "fold": FOLD, "seed": args.seed, "threads": args.threads,
                   "nnUNet_n_proc_DA": 0, "test_time_mirroring": False},
        "train_wall_seconds": timings,
        "command": " ".join(["python", *sys.argv]),
        **machine,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in DIFFUGTS_MODELS:
        if f"{name}_refined" not in folders:
            continue
        png = out.parent / f"{out.stem}_pseudo_healthy{name.removeprefix('diffugts')}.png"
        payload.update(pseudo_healthy_payload(name, work, test, env, log, unseen, folders[f"{name}_refined"].parent, png))
        payload["diffugts_label"] = "DiffuGTS method, diffusion model trained here (not the authors' weights)"
    payload["overlays"] = overlays(test, folders, out.parent / f"{out.stem}_overlays")
    payload["leaderboard"] = write_leaderboard(per_case, work, out.parent / f"{out.stem}_leaderboard")
    payload["score_wall_seconds"] = round(time.time() - started, 1)
    atomic.write_json(out, payload, strict=False)
    plot(table, unseen, out.with_suffix(".png"),
         f"DSM {args.stage1_epochs}+{args.stage2_epochs} epochs, nnU-Net {args.total_epochs} epochs of "
         f"{args.iterations} iterations, CPU")
    print(json.dumps({k: payload[k] for k in ("dsm_prompt_auroc", "dsm_anomaly_auroc", "best_baseline_auroc",
                                              "best_baseline_name")}, indent=1))
    print(f"written {out}")
