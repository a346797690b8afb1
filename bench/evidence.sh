#!/usr/bin/env bash
# Everything behind the README's Results section: the accuracy grids (ResNet-8 on the
# Fashion-MNIST stand-in at 32x32x3, 3 seeds), the Hessian trace of the final LSQ and FPQ
# models, and the figures (Hessian-trace and gradient-norm trajectories, output variance under
# input noise, feature distributions). Finished runs are kept, so a stopped run of this script
# continues where it stopped. About 3 hours on one CPU thread.
#
#     bash bench/evidence.sh                 # train every seed, then summarize and analyze
#     git diff results/
#
# The seeds' runs are independent, so on a machine with several cores train them side by side
# (one thread each; no number changes), then summarize:
#
#     for s in 0 1 2; do SEEDS=$s bash bench/evidence.sh train & done; wait
#     bash bench/evidence.sh report
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=.venv/bin/python
FLATQ=.venv/bin/flatq
STAGE=${1:-all}
SEEDS=${SEEDS:-0,1,2}
GRID=(--model resnet8 --fp-epochs 5 --qat-epochs 2 --max-steps 100 --batch-size 256
      --device cpu --threads 1 --out runs/accuracy --results results/accuracy)
R=runs/accuracy/resnet8
OUT=results/accuracy
FIG=results/figures
FEATURE_LAYER=stages.1.0.residual.1.0   # the second conv of the middle stage
mkdir -p "$FIG"

# Each grid with the bit widths it runs at: the Table 4 stand-in (with LSQ+SAM), the Table 2
# ablation and Table 3 p-sweep, LSQ and FPQ with min-max first/last-layer weights
# (--edge-weights minmax). Training takes W2A2 and LSQ+SAM last, so that a stopped run has the
# cells the README discusses most. (The `bn` grid, qat --bn-images, is left out: it trains the
# same runs as the grids here, and bench/bn_statistics.py below re-estimates their BatchNorm
# statistics the same way.)
GRIDS=("table4 w4a4,w2a4,w2a2" "sam w2a4" "ablation,psweep w2a4" "edge w4a4,w2a4")
TRAIN_ORDER=("table4 w4a4,w2a4" "ablation,psweep w2a4" "edge w4a4,w2a4" "table4 w2a2"
             "sam w2a4")

if [[ $STAGE == all || $STAGE == train ]]; then
  # Seed 0's W2A4 LSQ and FPQ runs also log the Hessian trace and gradient norms every 20
  # steps (their own random streams: the runs train as untracked ones would).
  if [[ ,$SEEDS, == *,0,* ]]; then
    $PY bench/accuracy.py "${GRID[@]}" --grid table4 --bits w2a4 --seeds 0 --cells LSQ,FPQ \
      --track-cells LSQ,FPQ
  fi
  for entry in "${TRAIN_ORDER[@]}"; do
    read -r grid bits <<< "$entry"
    $PY bench/accuracy.py "${GRID[@]}" --grid "$grid" --bits "$bits" --seeds "$SEEDS"
  done
fi
[[ $STAGE == all || $STAGE == report ]] || exit 0

# Summaries over all three seeds (train stages run per seed write per-seed tables).
for entry in "${GRIDS[@]}"; do
  read -r grid bits <<< "$entry"
  $PY bench/accuracy.py "${GRID[@]}" --grid "$grid" --bits "$bits" --seeds 0,1,2 --report
done
$PY bench/step_sizes.py $R/w4a4/*/seed* $R/w2a4/*/seed* --out $OUT/step_sizes.json
# Train/test gaps from stale BatchNorm statistics: accuracy before and after re-estimating them.
$PY bench/bn_statistics.py $R/w4a4/lsq-lsq/seed* $R/w4a4/lsq-lsq-q.edge_weights=minmax/seed* \
  $R/w4a4/lsq-pact/seed* $R/w2a4/lsq-lsq/seed* $R/w2a4/lsq-lsq-q.edge_weights=minmax/seed* \
  $R/w2a4/fpq-lsq/seed* $R/w2a4/fpq-lsq-q.edge_weights=minmax/seed* --out $OUT/bn_statistics.json
$PY bench/bn_statistics.py $R/w2a2/lsq-lsq/seed* $R/w2a2/lsq-pact/seed* $R/w2a2/kd-lsq/seed* \
  $R/w2a2/fpq-lsq/seed* --out $OUT/bn_statistics_w2a2.json
$PY bench/bn_statistics.py $R/w2a4/fpq-lsq-sfp=False/seed* $R/w2a4/fpq-lsq-csd=False/seed* \
  --out $OUT/bn_statistics_ablation.json
$PY bench/csd_stability.py $R/fp/seed0 --bits w4a4 --out results/csd_stability.json

# Hessian trace of the final W2A4 models (the FPQ paper's Fig. 5 claim: FPQ's is lower).
$FLATQ analyze hessian $R/w2a4/lsq-lsq/seed{0,1,2} $R/w2a4/fpq-lsq/seed{0,1,2} \
  --labels "LSQ s0,LSQ s1,LSQ s2,FPQ s0,FPQ s1,FPQ s2" --device cpu \
  --batches 2 --batch-size 128 --samples 32 --top-k 0 --out $OUT/hessian_final_w2a4.json
$FLATQ plot $OUT/hessian_final_w2a4.json -o $FIG/hessian_final_w2a4.png

# Trajectories during W2A4 QAT (seed 0).
TRACKED=($R/w2a4/lsq-lsq/seed0 $R/w2a4/fpq-lsq/seed0)
$FLATQ plot "${TRACKED[@]}" --labels LSQ,FPQ --metric hessian_trace -o $FIG/hessian_trace_w2a4.png
$FLATQ plot "${TRACKED[@]}" --labels LSQ,FPQ --metric task_grad_norm -o $FIG/task_grad_norm_w2a4.png

# Output variance under Gaussian input noise (Fig. 1) and feature distributions (Figs. 3/4).
$FLATQ analyze noise $R/fp/seed0 "${TRACKED[@]}" --labels FP,LSQ,FPQ --device cpu \
  --out $OUT/noise_w2a4.json
$FLATQ plot $OUT/noise_w2a4.json -o $FIG/noise_w2a4.png
$FLATQ analyze features $R/fp/seed0 "${TRACKED[@]}" --labels FP,LSQ,FPQ --device cpu \
  --layer "$FEATURE_LAYER" --out $OUT/features_w2a4.json
$FLATQ plot $OUT/features_w2a4.json -o $FIG/features_w2a4.png
