"""SDSeg's reverse process: single step against DDIM, and how much the answer depends on the noise seed.

Uses the SDSeg model the learning benchmark trained (``benchmarks/learning.py --models sdseg`` in the
same ``--work`` folder: SDSeg architecture trained from scratch on patient A, TotalSegmentator
labels) and predicts held-out patient B with the stock ``nnUNetv2_predict`` for each number of
reverse steps (``DSM_SDSEG_INFERENCE_STEPS``: 1 is the paper's single step at t = T-1, more are DDIM
steps) and each noise seed (``DSM_SDSEG_NOISE_SEED``). Writes, per number of steps, the held-out Dice
per class of each seed, the Dice between the two seeds' predictions (seed-to-seed agreement) and the
prediction CPU seconds to ``benchmarks/results/sdseg_sampling_<device>.json``.

    python benchmarks/sdseg_sampling.py --work /tmp/dsm_learning --steps 1 10
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from learning import BIN, DATASET, DATASET_ID, HELD_OUT, MODELS, RESULTS, dice_per_class, run

from nnunetv2_dsm.io import atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the learning benchmark's --work folder")
    parser.add_argument("--model", default="sdseg", choices=[m for m in MODELS if m.startswith("sdseg")])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "sdseg_sampling_cpu.json")
    args = parser.parse_args()

    work = args.work.resolve()
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    trainer, plans = MODELS[args.model]
    if not (res / DATASET / f"{trainer}__{plans}__{args.configuration}" / "fold_0" / "checkpoint_final.pth").is_file():
        raise SystemExit(f"{work}: no trained {trainer} (run benchmarks/learning.py --work {work} --models "
                         f"{args.model} first)")
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_compile": "f", "OMP_NUM_THREADS": str(args.threads), "nnUNet_def_n_proc": "1"}
    dataset = raw / DATASET
    labels = {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()
              if k != "background"}
    reference = dataset / "labelsTr" / f"{HELD_OUT}.nii.gz"
    log = open(work / "sdseg_sampling.log", "a")

    results = {}
    for steps in args.steps:
        dice, seconds, outputs = {}, {}, []
        for seed in args.seeds:
            out = work / f"prediction_{args.model}_steps{steps}_seed{seed}"
            seconds[seed] = round(run(
                [str(BIN / "nnUNetv2_predict"), "-i", str(work / "heldout_images"), "-o", str(out), "-d", DATASET_ID,
                 "-c", args.configuration, "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "1",
                 "-nps", "1"],
                {**env, "DSM_SDSEG_INFERENCE_STEPS": str(steps), "DSM_SDSEG_NOISE_SEED": str(seed)}, log), 1)
            dice[seed] = dice_per_class(out / f"{HELD_OUT}.nii.gz", reference, labels)
            outputs.append(out / f"{HELD_OUT}.nii.gz")
            print(f"  {steps} step(s), seed {seed}: held-out Dice {dice[seed]}", flush=True)
        agreement = dice_per_class(outputs[1], outputs[0], labels)
        print(f"  {steps} step(s): seed-to-seed Dice {agreement}", flush=True)
        results[str(steps)] = {"heldout_dice": {f"seed_{s}": d for s, d in dice.items()},
                               "seed_to_seed_dice": agreement,
                               "predict_cpu_seconds": {f"seed_{s}": v for s, v in seconds.items()}}
        payload = {
            "data": "SDSeg architecture trained from scratch on patient A of the learning benchmark (real CT, "
                    "TotalSegmentator labels); Dice on held-out patient B",
            "model": {"name": args.model, "trainer": trainer, "plans": plans, "configuration": args.configuration},
            "what": "per number of reverse steps (1: single step at t = T-1; more: DDIM, trailing spacing): "
                    "held-out Dice per noise seed, Dice between the two seeds' predictions (NaN where both are "
                    "empty), prediction CPU seconds",
            "steps": results,
            "command": " ".join(["python", *sys.argv]),
            "threads": args.threads, "device": platform.processor() or platform.machine(),
            "versions": {"torch": torch.__version__},
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
        atomic.write_json(args.out, payload, strict=False)  # after each step count: results as they come
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
