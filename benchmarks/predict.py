"""Whole-volume prediction cost of DSM (stage 2, with anomaly channel) vs nnU-Net's ResidualEncoderUNet.

Both networks are built with nnU-Net's ``get_network_from_plans`` from the same ResEnc arch_kwargs and
predict the real example CT (TotalSegmentator sdist, 122x101x112 at 3 mm, z-scored) with nnU-Net's
sliding window (``nnUNetPredictor.predict_sliding_window_return_logits``, Gaussian weighting, no
mirroring). Every measurement runs in its own subprocess, DSM and ResEnc alternating, so peak memory is
the process's own: on CPU the growth of ``ru_maxrss`` during prediction over the value before it
(weights and input already loaded), on CUDA ``torch.cuda.max_memory_allocated``. The text embeddings
are random unit vectors: the cost does not depend on their values. Writes
``benchmarks/results/predict_<device>.json`` with medians and ``ratio_dsm_over_resenc``.

    python benchmarks/predict.py --device cpu --patch 32 64 64 --repeats 2 --threads 2
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _arch import resenc_arch_kwargs
from _results import write_json
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
DSM_CLASS = "nnunetv2_dsm.networks.dsm_stage2.DSMStage2Network"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def measure(args: argparse.Namespace) -> dict:
    """One prediction in this process; returns seconds and peak memory in MiB."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunetv2_dsm.data.fetch import example_ct_dir

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kwargs = resenc_arch_kwargs(args.features)
    required = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    if args.network == "dsm":
        kwargs.update(num_kmmm_layers=4, query_dim=args.query_dim, ffn_dim=2 * args.query_dim, num_heads=4,
                      ssm_bidirectional=True, num_tumour_queries=20, text_dim=384)
    network = get_network_from_plans(DSM_CLASS if args.network == "dsm" else RESENC_CLASS, kwargs, required, 1,
                                     args.classes, allow_init=True, deep_supervision=False).to(device).eval()
    if args.network == "dsm":
        torch.manual_seed(0)
        network.set_text_embeddings(torch.nn.functional.normalize(torch.randn(args.classes, 384), dim=1))
        network.export_anomaly = True
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir() / "example_ct.nii.gz"))).astype(np.float32)
    data = torch.from_numpy((image - image.mean()) / image.std())[None]

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    predictor.network = network
    predictor.allowed_mirroring_axes = None
    predictor.configuration_manager = type("Config", (), {"patch_size": list(args.patch)})()
    heads = args.classes + (1 if args.network == "dsm" else 0)
    predictor.label_manager = type("Labels", (), {"num_segmentation_heads": heads})()

    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = predictor.predict_sliding_window_return_logits(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mib
    assert logits.shape == (heads, *data.shape[1:]), logits.shape
    return {"seconds": seconds, "peak_mib": peak, "volume": list(data.shape[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 64])
    parser.add_argument("--query-dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/predict_<device>.json)")
    parser.add_argument("--network", choices=["dsm", "resenc"], help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.network:
        Path(args.result_file).write_text(json.dumps(measure(args)))
        return

    runs: dict[str, list[dict]] = {"dsm": [], "resenc": []}
    forwarded = ["--device", args.device, "--patch", *map(str, args.patch), "--features", *map(str, args.features),
                 "--query-dim", str(args.query_dim), "--classes", str(args.classes), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(r, n) for r in range(args.repeats) for n in ("dsm", "resenc")]
        for repeat, name in tqdm(jobs, desc="predict benchmark", unit="run"):
            result = Path(tmp) / f"{name}_{repeat}.json"
            subprocess.run([sys.executable, __file__, *forwarded, "--network", name, "--result-file", str(result)],
                           check=True)
            runs[name].append(json.loads(result.read_text()))
    summary = {}
    for name, values in runs.items():
        summary[name] = {
            "median_seconds": statistics.median(v["seconds"] for v in values),
            "median_peak_mib": statistics.median(v["peak_mib"] for v in values),
            "runs": values,
        }
    out = {
        "device": args.device,
        "host": platform.processor() or platform.machine(),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "volume": runs["dsm"][0]["volume"],
        "patch": args.patch,
        "features": args.features,
        "query_dim": args.query_dim,
        "classes": args.classes,
        "repeats": args.repeats,
        "peak_memory": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
        else "growth of ru_maxrss during prediction (subprocess per run)",
        "dsm": summary["dsm"],
        "resenc": summary["resenc"],
        "ratio_dsm_over_resenc": {
            "seconds": summary["dsm"]["median_seconds"] / summary["resenc"]["median_seconds"],
            "peak_mib": summary["dsm"]["median_peak_mib"] / max(summary["resenc"]["median_peak_mib"], 1e-9),
        },
    }
    target = args.out or RESULTS / f"predict_{args.device.split(':')[0]}.json"
    write_json(target, out)
    print(json.dumps(out["ratio_dsm_over_resenc"], indent=2), "->", target)


if __name__ == "__main__":
    main()
