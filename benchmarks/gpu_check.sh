#!/usr/bin/env bash
# DSM on one CUDA GPU with `pip install` alone (no mamba-ssm build): about 6-8 minutes.
#
#   1. a fresh virtual environment with the README's install command (skip with DSM_GPU_USE_CURRENT_ENV=1,
#      e.g. on a machine without access to a package index);
#   2. selective-scan backends side by side (Triton vs the PyTorch scan, mamba-ssm's too if it imports):
#      parity of outputs and gradients, forward+backward time at L = 10^4 and 10^5;
#   3. a DSM training step against nnU-Net's ResEnc at ResEnc-M sizes under nnU-Net's float16 autocast
#      (target ratio_dsm_over_resenc <= 1.15);
#   4. 200 iterations of DSM overfitting one real CT case under autocast with the gradient scaler: no
#      non-finite loss (the example CT is downloaded once into DSM_CACHE; carry it where there is no internet);
#   5. whole-volume prediction time and peak memory, DSM stage 2 vs ResEnc (benchmarks/predict.py).
#
# Results: benchmarks/results/{scan_backends,train_step,overfit_cuda_amp,predict}_cuda.json, then one
# summary table.   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset DSM_SCAN_BACKEND  # the automatic choice is what is checked
started=$(date +%s)

if [ "${DSM_GPU_USE_CURRENT_ENV:-0}" != 1 ]; then
  venv=${DSM_GPU_VENV:-/tmp/dsm-gpu-venv}
  echo "== install: fresh virtual environment in $venv (README: pip install .)"
  python3 -m venv "$venv"
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  pip install -q --upgrade pip
  pip install -q .
fi
python - <<'EOF'
import torch
from nnunetv2_dsm.networks.ssm import scan_backend
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: selective scan backend {scan_backend('cuda')}")
EOF

R=benchmarks/results
echo "== 1/4 selective-scan backends (L = 1e4, 1e5)"
python benchmarks/scan_backends.py --device cuda --lengths 10000 100000 --repeats 10 --out $R/scan_backends_cuda.json
echo "== 2/4 training step, DSM vs ResEnc, ResEnc-M sizes, float16 autocast"
python benchmarks/train_step.py --device cuda --warmup 3 --repeats 20 --out $R/train_step_cuda.json
echo "== 3/4 overfit one case under autocast, 200 iterations"
python benchmarks/overfit.py --device cuda --amp --iterations 200 --out $R/overfit_cuda_amp.json || true
echo "== 4/4 whole-volume prediction, DSM stage 2 vs ResEnc"
python benchmarks/predict.py --device cuda --patch 64 64 64 --features 32 64 128 256 320 --query-dim 128 \
  --classes 25 --repeats 3 --out $R/predict_cuda.json

python - "$started" <<'EOF'
import json, sys, time
R = "benchmarks/results"
def load(name):
    with open(f"{R}/{name}") as f:
        return json.load(f)
scan, step, fit, pred = (load(n) for n in ("scan_backends_cuda.json", "train_step_cuda.json",
                                           "overfit_cuda_amp.json", "predict_cuda.json"))
rows = []
for e in scan["entries"]:
    t, p = e.get("triton", {}), e["torch"]
    rows.append((f"scan L={e['L']:g}: triton vs torch fwd+bwd",
                 f"{t.get('forward_backward_s', float('nan')):.4f} s vs {p['forward_backward_s']:.4f} s "
                 f"({e.get('speedup_triton_over_torch', float('nan')):.1f}x)",
                 f"rel. error out {t.get('max_rel_error_output', float('nan')):.1e}, "
                 f"grads {t.get('max_rel_error_gradients', float('nan')):.1e}"))
rows.append(("train step DSM / ResEnc (ResEnc-M, fp16)", f"{step['ratio_dsm_over_resenc']:.3f}",
             "target <= 1.15: " + ("met" if step["ratio_dsm_over_resenc"] <= 1.15 else "NOT met")))
rows.append(("overfit 200 it, AMP: non-finite losses", str(fit["non_finite_losses"]),
             "training Dice " + ", ".join(f"{k} {v:.2f}" for k, v in fit["training_dice"].items())))
ratio = pred["ratio_dsm_over_resenc"]
rows.append(("predict DSM / ResEnc: time, peak memory", f"{ratio['seconds']:.2f}, {ratio['peak_mib']:.2f}", ""))
width = max(len(r[0]) for r in rows)
print(f"\n{'check':<{width}} | result | note\n{'-' * width}-+--------+-----")
for name, value, note in rows:
    print(f"{name:<{width}} | {value} | {note}")
print(f"\nscan backend chosen: {scan['auto_backend']}; total {(time.time() - int(sys.argv[1])) / 60:.1f} min")
EOF
