"""Do the DiffuGTS model's attention maps localise organs and the *seen* tumours on its training patient?

The anomaly-aware attention maps (DiffuGTS method, diffusion model trained here) can only find unseen
tumours if the frozen denoiser's cross-attention already separates organs and lesions where it was
trained. On the preprocessed training slices that hold a seen tumour, per class:

- organs: voxel AUROC of the organ logit ``logit(A_healthy + A_abnormal)`` of the class's prompt pair,
  inside the body (voxels above the slice minimum);
- seen tumours: voxel AUROC of the anomaly logit ``a (log A_abnormal - log A_healthy) + b`` inside the
  host organ, with the trained text adapter and with the adapter left out (identity, a = 1, b = 0).

    python benchmarks/diffugts_attention.py --work WORK   # the work folder of benchmarks/unseen.py
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unseen import DATASET, DIFFUGTS_MODELS, FOLD, model_folder  # noqa: E402

from nnunetv2_dsm.dataset import DSMDataset  # noqa: E402
from nnunetv2_dsm.evaluation.metrics import auroc  # noqa: E402
from nnunetv2_dsm.inference.diffugts_predictor import DiffuGTSPredictor  # noqa: E402
from nnunetv2_dsm.io import atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def class_maps(net, x: torch.Tensor, adapter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly and organ logits of every trained class's pair: 2 x (B, K, H, W)."""
    pairs = net.class_pairs
    if adapter:
        return net.pair_logits(net.attention_maps(x, net.pair_tokens(pairs)), pairs.shape[0])
    tokens = torch.cat([pairs.reshape(-1, pairs.shape[-1]), net.null_token], 0)
    maps = net.attention_maps(x, tokens)
    healthy, abnormal = maps[:, 0::2][:, :pairs.shape[0]], maps[:, 1::2][:, :pairs.shape[0]]
    organ = torch.logit((healthy + abnormal).clamp(1e-6, 1 - 1e-6))
    return (abnormal + 1e-6).log() - (healthy + 1e-6).log(), organ


def measure(model: Path, cases, threads: int) -> dict:
    """Per class: organ AUROC in the body, or a seen tumour's anomaly AUROC in its host organ (with and
    without the adapter), over the training slices that hold a seen tumour."""
    predictor = DiffuGTSPredictor(["liver tumor"], device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), FOLD)
    torch.set_num_threads(threads)
    net = predictor.diffugts
    dataset = DSMDataset.from_json(json.loads((model / "dataset.json").read_text()))
    classes = dataset.names
    tumours = [c for c in classes if dataset.is_tumour(c)]
    scores: dict = {}
    for identifier in cases.identifiers:
        data, seg, _, _ = cases.load_case(identifier)
        data, seg = np.asarray(data[0], dtype=np.float32), np.asarray(seg[0])
        own = {c: np.isin(seg, dataset.classes[c]) for c in classes}  # a tumour's ids are its own label
        host = {c: np.isin(seg, [i for p in dataset.parent_organs(c) for i in dataset.classes[p]]) for c in tumours}
        slices = np.flatnonzero(np.any([own[t].any((1, 2)) for t in tumours], 0))
        for start in range(0, len(slices), 8):
            z = slices[start:start + 8]
            x = torch.from_numpy(data[z])[:, None]
            pad = [(-s) % net.divisor for s in x.shape[2:]]
            x = torch.nn.functional.pad(x, (0, pad[1], 0, pad[0]), value=float(x.min()))
            for adapter in (True, False):
                anomaly, organ = (m[..., :data.shape[1], :data.shape[2]].numpy() for m in class_maps(net, x, adapter))
                body = data[z] > data.min()
                for k, c in enumerate(classes):
                    entry = scores.setdefault(c, {}).setdefault(adapter, [])
                    if dataset.is_tumour(c):
                        entry.append((own[c][z][host[c][z]], anomaly[:, k][host[c][z]]))
                    elif adapter:
                        entry.append((own[c][z][body], organ[:, k][body]))
        print(f"  {model.name} {identifier}: {len(slices)} slices with a seen tumour", flush=True)
    result = {}
    for c, runs in scores.items():
        for adapter, parts in runs.items():
            if not parts:
                continue
            truth = np.concatenate([p[0] for p in parts])
            score = np.concatenate([p[1] for p in parts])
            key = ("anomaly_auroc_host" + ("" if adapter else "_no_adapter")) if dataset.is_tumour(c) else "organ_auroc_body"
            result.setdefault(c, {})[key] = round(auroc(truth, score).value, 4)
    organs = [v["organ_auroc_body"] for v in result.values() if "organ_auroc_body" in v]
    return {"model": f"{model.name}, fold {FOLD}", "per_class": result,
            "organ_auroc_body_mean": round(float(np.mean(organs)), 4),
            "map_scale": round(float(net.map_scale), 4), "map_bias": round(float(net.map_bias), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(DIFFUGTS_MODELS), choices=list(DIFFUGTS_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "diffugts_attention_cpu.json")
    args = parser.parse_args()
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[key] = str(args.work / sub)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    cases = nnUNetDatasetBlosc2(str(args.work / "preprocessed" / DATASET / "nnUNetPlans_2d"))
    models = {name: measure(model_folder(args.work / "results", name), cases, args.threads) for name in args.models
              if (model_folder(args.work / "results", name) / f"fold_{FOLD}" / "checkpoint_final.pth").is_file()}
    payload = {
        "data": "training patient A of the unseen-tumour benchmark (4 versions with synthetic liver and kidney tumours), "
                "preprocessed slices that hold a seen tumour; organ labels are TotalSegmentator model output",
        "method": "DiffuGTS method, diffusion model trained here (not the authors' weights)",
        "models": models,
        "command": " ".join(["python", *sys.argv]), "device": platform.machine(),
    }
    atomic.write_json(args.out, payload)
    print(json.dumps({n: m["per_class"] for n, m in models.items()}, indent=1))


if __name__ == "__main__":
    main()
