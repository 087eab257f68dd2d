#!/usr/bin/env bash
# Every GPU measurement of issues 3, 4 and 5 in one prepared run (the device time is short):
#   1. benchmarks/speed.py, alone on the GPU: the paper's 28x28 networks and the small ones;
#   2. the Fashion-MNIST paper table (one process per seed, then collected) and, if PHASES names it, the
#      augmentation benchmark (one process per seed) side by side.
# Each phase has its own time limit, and every finished run is already on disk when a limit hits,
# so a partial result is still a result; the last step packs WORK into OUT/results.tgz.
#
#   benchmarks/gpu_suite.sh OUT DATA_DIR            # the GPU run
#   SMOKE=1 benchmarks/gpu_suite.sh OUT DATA_DIR    # a tiny CPU dry run of the same commands
#   PHASES="table" PRESET=small T_TABLE=320 benchmarks/gpu_suite.sh OUT DATA_DIR   # a part, other settings
#   (TRANSFORM=none|shift|shift-flip: the training transform of every table method, default shift-flip;
#    LR_SCHEDULE=constant|cosine: their learning-rate schedule, default cosine, the table's protocol since session 7)
set -u
OUT=${1:?usage: gpu_suite.sh OUT DATA_DIR}
DATA=${2:?usage: gpu_suite.sh OUT DATA_DIR}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/dgc_gpu_suite}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"

if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SEEDS="1 2"; EPOCHS=1; PRESET=small; COUNTS="--counts 60,40,30,20,15,10,8,6,5,4"
  SPEED_PAPER="--repeats 2 --steps 1 --warmup 1 --predict-examples 8 --predict-repeats 1 --samples 1,10"
  SPEED_SMALL="$SPEED_PAPER"; AUG="--dgc-epochs 1 --cnn-epochs 1 --counts 60,40,30,20,15,10,8,6,5,4 --output residual"
  T_SPEED=120; T_TABLE=300; NUM_SAMPLES=2; COMPILE_MODE=""; export OMP_NUM_THREADS=1
else
  DEVICE=cuda; SEEDS="1 2 3 4 5"; EPOCHS=30; PRESET=${PRESET:-paper}; COUNTS=""
  SPEED_PAPER="--repeats 21 --steps 2 --predict-examples 500 --predict-repeats 2 --autocast bf16"
  SPEED_SMALL="--repeats 11 --steps 2 --predict-examples 1000 --predict-repeats 2 --autocast bf16"
  AUG="--output residual --filter-threshold 0.9"   # the configuration measured on ten seeds on the CPU
  T_SPEED=100; T_TABLE=${T_TABLE:-300}; NUM_SAMPLES=10; COMPILE_MODE=${COMPILE_MODE-reduce-overhead}; export OMP_NUM_THREADS=1
fi
TRANSFORM=${TRANSFORM:-shift-flip}   # the CPU table's protocol since session 5 (none: the session-2 protocol)
LR_SCHEDULE=${LR_SCHEDULE:-cosine}   # the table's protocol since session 7 (constant: sessions 2-6)
METHODS=${METHODS:-"dgc_elbo logit_adjusted cb_focal dgc_wae_mmd ce balanced_softmax ldam_drw dgc_elbo_paper_guide"}
# Augmentation is answered on the CPU (RESULTS.md, ten seeds); add it to PHASES for a GPU replication.
PHASES=${PHASES:-"speed table"}
# One folder per protocol: WORK outlives a call, and paper_table --collect refuses to pool runs of other settings.
TABLE="$WORK/fashion_table_${PRESET}_${TRANSFORM}_${LR_SCHEDULE}_e${EPOCHS}$( [ "${SMOKE:-0}" = 1 ] && echo _smoke )"
has() { case " $PHASES " in *" $1 "*) return 0;; esac; return 1; }
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started )) s] $*"; }

{
  stamp "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
  nproc; date -u

  if has speed; then
  stamp "phase 1: speed (alone on the device)"
  timeout $T_SPEED $PY benchmarks/speed.py --device $DEVICE --preset paper --shape 1,28,28 $SPEED_PAPER \
      --json "$WORK/speed_paper.json" > "$WORK/speed_paper.log" 2>&1; echo "speed paper rc=$?"
  timeout $(( T_SPEED / 2 )) $PY benchmarks/speed.py --device $DEVICE --preset small --shape 1,28,28 $SPEED_SMALL \
      --json "$WORK/speed_small.json" > "$WORK/speed_small.log" 2>&1; echo "speed small rc=$?"
  # engine='graph' with its captured graph compiled by inductor, and replayed as CUDA graphs
  timeout $T_SPEED $PY benchmarks/speed.py --device $DEVICE --preset small --shape 1,28,28 $SPEED_SMALL --compile \
      ${COMPILE_MODE:+--compile-mode $COMPILE_MODE} --json "$WORK/speed_small_compiled.json" > "$WORK/speed_small_compiled.log" 2>&1
  echo "speed small compiled rc=$?"
  cat "$WORK/speed_paper.log" "$WORK/speed_small.log" "$WORK/speed_small_compiled.log" | grep -v Warning
  fi

  stamp "phase 2: paper table (one process per seed) and augmentation, side by side"
  pids=()
  has table && for s in $SEEDS; do
    timeout $T_TABLE $PY benchmarks/paper_table.py --dataset fashion --data-dir "$DATA" --seeds $s --backbone conv \
        --preset $PRESET --epochs $EPOCHS --num-samples $NUM_SAMPLES --val-num-samples 2 --device $DEVICE $COUNTS \
        --transform $TRANSFORM --lr-schedule $LR_SCHEDULE --methods $METHODS --out "$TABLE" > "$WORK/table_seed$s.log" 2>&1 &
    pids+=($!)
  done
  has augmentation && for s in 1 2 3; do
    timeout $T_TABLE $PY benchmarks/augmentation.py --dataset fashion --data-dir "$DATA" --seed $s --device $DEVICE $AUG \
        --out "$WORK/augmentation_seed$s.json" $( [ $s = 1 ] && echo --grid "$WORK/augmentation_fashion.png" ) \
        > "$WORK/augmentation_seed$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; echo "pid $p rc=$?"; done
  tail -n 3 "$WORK"/table_seed*.log "$WORK"/augmentation_seed*.log 2>/dev/null

  stamp "collect"
  has table && $PY benchmarks/paper_table.py --dataset fashion --data-dir "$DATA" --seeds $SEEDS --backbone conv --preset $PRESET \
      --epochs $EPOCHS --num-samples $NUM_SAMPLES --val-num-samples 2 --device $DEVICE $COUNTS --methods $METHODS \
      --transform $TRANSFORM --lr-schedule $LR_SCHEDULE --collect --out "$TABLE" 2>&1 | tail -n 20
  stamp "done"
} 2>&1 | tee "$WORK/suite.log"

tar czf "$OUT/results.tgz" -C "$WORK" . && cp "$WORK/suite.log" "$OUT/suite.log"
ls -la "$OUT"
