"""DSM overfits one real case, optionally under mixed precision: no non-finite loss, training Dice per organ.

The loop of ``tests/test_learning.py`` (patient A of the example data at 3 mm, TotalSegmentator labels,
DSMTrainer's optimiser, clipping at 12, deep supervision) run for ``--iterations`` steps; with ``--amp``
forward and loss run under autocast (float16 and nnU-Net's gradient scaler on CUDA, bfloat16 on CPU).
Training Dice is measured on the training slices themselves: this checks that the network and the
scan backend learn, not how well they generalise. Writes ``benchmarks/results/overfit_<device>.json``.

    python benchmarks/overfit.py --device cuda --amp --iterations 200
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _learning_case import ORGANS, build_network, dice, load_case, train  # noqa: E402
from _results import write_json  # noqa: E402

from nnunetv2_dsm.data.fetch import example_ct_dir  # noqa: E402
from nnunetv2_dsm.networks.ssm import scan_backend  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or ROOT / "benchmarks" / "results" / f"overfit_{device.type}{'_amp' if args.amp else ''}.json"

    case = load_case(example_ct_dir())
    net = build_network().to(device)

    def progress(step, outputs):
        if step % 25 == 24 or step == args.iterations - 1:
            print(f"  step {step + 1}/{args.iterations}", flush=True)
        return False

    started = time.perf_counter()
    losses = train(net, case, args.iterations, on_step=progress, amp=args.amp)
    seconds = time.perf_counter() - started
    non_finite = [i for i, v in enumerate(losses) if not np.isfinite(v)]
    scores = dict(zip(ORGANS, (round(float(d), 4) for d in dice(net, case))))
    result = {
        "benchmark": "DSM overfits one case (training Dice on the training slices)",
        "data": "real CT, patient A of the example data (TotalSegmentator 2.18.0 sdist), labels are "
                "TotalSegmentator model output; training and evaluation on the same slices",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "amp": ({"cuda": "float16 + GradScaler", "cpu": "bfloat16"}[device.type] if args.amp else "off"),
        "scan_backend": scan_backend(device.type),
        "iterations": args.iterations,
        "non_finite_losses": len(non_finite),
        "first_non_finite_iteration": non_finite[0] if non_finite else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "training_dice": scores,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    write_json(out, result)
    print(json.dumps(result, indent=1))
    return 1 if non_finite else 0


if __name__ == "__main__":
    raise SystemExit(main())
