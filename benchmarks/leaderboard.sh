#!/usr/bin/env bash
# Leaderboard of DSM, its ablations and stock nnU-Net on the synthetic-tumour benchmark, on CPU.
#
#   benchmarks/leaderboard.sh [WORK_DIR]        (default ./leaderboard_work)
#
# Every step is a stock nnU-Net or an nnunetv2_dsm command (see the logs/ folder for each one):
#   1. nnunetv2_dsm synth: real example CT with synthetic seen tumours (liver, kidney) in imagesTr and
#      unseen tumours (pancreas, spleen) in imagesTs/labelsTs
#   2. nnUNetv2_plan_and_preprocess with DSMPlannerCPU (DSMPlansCPU) and DSMBaselinePlannerCPU
#      (ResEncPlansCPU: same sizes and preprocessed data, nnU-Net's own ResidualEncoderUNet)
#   3. nnUNetv2_train fold 0 on CPU, same budget for every model (2 epochs x 5 iterations):
#      DSM stage 1, its noKMMM and noSSM ablations, the stock ResEnc baseline, and DSM stage 2 from
#      the stage-1 weights (-pretrained_weights)
#   4. nnUNetv2_predict --save_probabilities on imagesTs; nnunetv2_dsm predict --prompts for stage 2
#   5. nnunetv2_dsm anomaly-maxlogit for the stage-1 and stock models (-max over organ probabilities)
#   6. nnunetv2_dsm evaluate on labelsTs (DSC; AUROC/FPR95 in the body ROI) -> <model>/fold_0/metrics.json
#   7. nnunetv2_dsm leaderboard -> WORK_DIR/leaderboard, copied to results/ of this checkout
#
# Environment: MODELS (space-separated subset of: stage1 noKMMM noSSM resenc stage2 stage2_noAMVP
#   stage2_noDQR stage2_noCLIP; default all),
# DSM_SEED (default 0). Needs the package installed (pip install .) and about 25 minutes on 2 CPU cores.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mkdir -p "${1:-./leaderboard_work}" && cd "${1:-./leaderboard_work}" && pwd)"
MODELS="${MODELS:-stage1 noKMMM noSSM resenc stage2 stage2_noAMVP stage2_noDQR stage2_noCLIP}"
DATASET_ID=995
DATASET=Dataset995_TumourSynth
CONFIG=3d_fullres
FOLD=0

export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" \
    nnUNet_results="$WORK/nnUNet_results" nnUNet_compile=f DSM_SEED="${DSM_SEED:-0}"
unset nnUNet_extTrainer
RAW="$nnUNet_raw/$DATASET"
RES="$nnUNet_results/$DATASET"
mkdir -p "$WORK/logs" "$WORK/predictions" "$WORK/anomaly"
TIMINGS="$WORK/timings.tsv"
printf 'step\tseconds\n' > "$TIMINGS"

# step NAME CMD...: runs CMD with its output in logs/NAME.log and its wall time in timings.tsv.
step() {
    local name="$1"; shift
    echo "[$(date +%H:%M:%S)] $name: $*"
    local start=$SECONDS
    if ! "$@" > "$WORK/logs/$name.log" 2>&1; then
        echo "step $name failed; last lines of $WORK/logs/$name.log:" >&2
        tail -n 30 "$WORK/logs/$name.log" >&2
        exit 1
    fi
    printf '%s\t%d\n' "$name" $((SECONDS - start)) >> "$TIMINGS"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "cores: $(nproc)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "python: $(python -c 'import sys; print(sys.version.split()[0])')"
    python -c 'import torch, nnunetv2, importlib.metadata as m; print("torch:", torch.__version__); print("nnunetv2:", m.version("nnunetv2")); print("nnunetv2_dsm:", m.version("nnunetv2_dsm"))'
    echo "models: $MODELS"
    echo "DSM_SEED: $DSM_SEED"
} > "$WORK/machine.txt"
cat "$WORK/machine.txt"

step synth nnunetv2_dsm synth --out "$RAW" --overwrite
# nnU-Net's planner hands nnUNet_n_proc_DA to torch.set_num_threads, which rejects 0.
step plan_dsm env nnUNet_n_proc_DA=2 nnUNetv2_plan_and_preprocess -d $DATASET_ID -pl DSMPlannerCPU -c $CONFIG -np 2
step plan_resenc env nnUNet_n_proc_DA=2 \
    nnUNetv2_plan_and_preprocess -d $DATASET_ID -pl DSMBaselinePlannerCPU -c $CONFIG -np 2
# Augmentation in the main process: repeatable with DSM_SEED and kind to a small, shared CPU.
export nnUNet_n_proc_DA=0

trainer_of() {
    case "$1" in
        stage1) echo "DSMTrainer_2epochs_NoMirroring DSMPlansCPU" ;;
        noKMMM) echo "DSMTrainer_noKMMM_2epochs_NoMirroring DSMPlansCPU" ;;
        noSSM) echo "DSMTrainer_noSSM_2epochs_NoMirroring DSMPlansCPU" ;;
        resenc) echo "DSMBaselineTrainer_2epochs_NoMirroring ResEncPlansCPU" ;;
        stage2) echo "DSMTrainerStage2_2epochs_NoMirroring DSMPlansCPU" ;;
        stage2_noAMVP) echo "DSMTrainerStage2_noAMVP_2epochs_NoMirroring DSMPlansCPU" ;;
        stage2_noDQR) echo "DSMTrainerStage2_noDQR_2epochs_NoMirroring DSMPlansCPU" ;;
        stage2_noCLIP) echo "DSMTrainerStage2_noCLIP_2epochs_NoMirroring DSMPlansCPU" ;;
        *) echo "unknown model '$1' in MODELS (stage1 noKMMM noSSM resenc stage2 stage2_noAMVP stage2_noDQR stage2_noCLIP)" >&2; exit 2 ;;
    esac
}

STAGE1_CHECKPOINT="$RES/DSMTrainer_2epochs_NoMirroring__DSMPlansCPU__$CONFIG/fold_$FOLD/checkpoint_final.pth"
# Stage 2 predicts every dataset class by its name, in label-id order, so the label ids of its label
# map are those of dataset.json, plus the unseen tumour types it never saw a label of.
mapfile -t ALL_CLASSES < <(python -c "import json, sys; print('\n'.join(k for k in json.load(open(sys.argv[1]))['labels'] if k not in ('background', 'ignore')))" "$RAW/dataset.json")

for model in $MODELS; do
    read -r trainer plans <<< "$(trainer_of "$model")"
    folder="$RES/${trainer}__${plans}__$CONFIG"
    pred="$WORK/predictions/$model"
    extra=()
    if [[ "$model" == stage2* ]]; then
        [ -f "$STAGE1_CHECKPOINT" ] || { echo "stage2 needs stage1 first (MODELS order)" >&2; exit 2; }
        extra=(-pretrained_weights "$STAGE1_CHECKPOINT")
    fi
    step "train_$model" nnUNetv2_train $DATASET_ID $CONFIG $FOLD -tr "$trainer" -p "$plans" -device cpu "${extra[@]}"
    rm -rf "$pred"
    if [[ "$model" == stage2* ]]; then
        step "predict_$model" nnunetv2_dsm predict -i "$RAW/imagesTs" -o "$pred" -m "$folder" -f $FOLD \
            --device cpu --disable-tta --prompts "${ALL_CLASSES[@]}"
        scores="$pred/scores"
    else
        step "predict_$model" nnUNetv2_predict -i "$RAW/imagesTs" -o "$pred" -d $DATASET_ID -c $CONFIG -f $FOLD \
            -tr "$trainer" -p "$plans" -device cpu --save_probabilities -npp 1 -nps 1
        scores="$WORK/anomaly/$model"
        rm -rf "$scores"
        step "anomaly_$model" nnunetv2_dsm anomaly-maxlogit -i "$pred" -o "$scores" --images "$RAW/imagesTs" \
            -d "$RAW/dataset.json"
    fi
    step "evaluate_$model" nnunetv2_dsm evaluate "$pred" "$RAW/labelsTs" -d "$RAW/dataset.json" \
        -i "$RAW/imagesTs" --roi body -s "$scores" -o "$folder/fold_$FOLD"
done

step leaderboard nnunetv2_dsm leaderboard "$nnUNet_results" -o "$WORK/leaderboard"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$WORK/machine.txt"

mkdir -p "$REPO/results"
cp "$WORK"/leaderboard/leaderboard.md "$WORK"/leaderboard/leaderboard.csv "$WORK"/leaderboard/leaderboard.html \
    "$WORK"/leaderboard/*.png "$WORK/timings.tsv" "$WORK/machine.txt" "$REPO/results/"
echo "leaderboard written to $REPO/results/leaderboard.md"
