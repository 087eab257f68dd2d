#!/usr/bin/env bash
# The GPU checks of issue 18 in one prepared run, under 8 minutes on one H200 (the phase limits add up to 7):
#   1. benchmarks/speed.py, alone on the device: the small and the paper 28x28 networks, every engine;
#   2. the main job, alone: `dgc-pyro fit --dataset fashion` with the default recipe and engine (its wall time);
#   3. side by side: the test suite with --device cuda, and the 3-seed Fashion-MNIST table of the paper networks
#      (--preset paper with that preset's own recipe, lr 3e-4; DGC and logit-adjusted CE), then collected.
# Every finished piece is on disk when a limit hits, so a partial result is still a result. Files for $OUT (at
# most 8 come back from the device machine): suite.log, pytest.log, speed_small.json, speed_paper.json,
# main_metrics.json, table.md, results.tgz (everything under WORK but the data and the weights).
#
#   benchmarks/gpu_suite.sh prepare DATA_DIR    # here, once, in the repository root: wheels -> .whl/, data -> .gpu_data/
#   benchmarks/gpu_suite.sh run OUT             # there: run(command="benchmarks/gpu_suite.sh run $OUT",
#                                               #            carry=[".whl", ".gpu_data"], timeout_s=540)
#   SMOKE=1 benchmarks/gpu_suite.sh run OUT DATA_DIR   # a small CPU dry run of the same commands (a few minutes)
#
# The device machine has torch, torchvision, scikit-learn, scipy, matplotlib, xarray, pytest and pytest-xdist but
# not the packages below (/work/.library/device/KINDS.md); "prepare" downloads them as wheels into .whl/ and writes
# Fashion-MNIST gzipped into .gpu_data/ (the raw files are 55 MB, over what travels beside the tree), both
# ignored through .git/info/exclude; "run" installs the wheels into /tmp/site and unpacks the data under WORK.
set -u
MODE=${1:?usage: gpu_suite.sh prepare DATA_DIR | run OUT [DATA_DIR]}
PY=${PYTHON:-python3}
WHEELS="pyro-ppl==1.9.2 pyro-api==0.1.2 imbalanced-learn==0.14.2 sklearn-compat==0.1.6 arviz==1.3.0 arviz-base==1.3.1
arviz-plots==1.3.2 arviz-stats==1.3.3 xarray-einstats==0.11.0"

if [ "$MODE" = prepare ]; then
  DATA=${2:?usage: gpu_suite.sh prepare DATA_DIR}
  EXCLUDE=$(git rev-parse --git-path info/exclude) || exit 1   # also right in a git worktree
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
  grep -qx '/.gpu_data/' "$EXCLUDE" 2>/dev/null || echo '/.gpu_data/' >> "$EXCLUDE"
  mkdir -p .whl .gpu_data/FashionMNIST/raw
  # shellcheck disable=SC2086  # WHEELS is a list of requirement strings
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $WHEELS || exit 1
  for f in "$DATA"/FashionMNIST/raw/*-ubyte; do gzip -c "$f" > ".gpu_data/FashionMNIST/raw/$(basename "$f").gz" || exit 1; done
  du -sh .whl .gpu_data
  exit 0
fi
[ "$MODE" = run ] || { echo "unknown mode $MODE: prepare or run" >&2; exit 2; }
OUT=${2:?usage: gpu_suite.sh run OUT [DATA_DIR]}
WORK=${WORK:-/tmp/dgc_gpu_suite}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT" "$WORK"

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=${3:-}
if [ -z "$DATA" ]; then  # the carried, gzipped Fashion-MNIST
  DATA="$WORK/data"; mkdir -p "$DATA/FashionMNIST/raw"
  for f in .gpu_data/FashionMNIST/raw/*.gz; do gunzip -c "$f" > "$DATA/FashionMNIST/raw/$(basename "$f" .gz)" || exit 1; done
fi

if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SEEDS="1 2"; EPOCHS=1; SMALL="--counts 60,40,30,20,15,10,8,6,5,4"; NUM_SAMPLES=2; MAIN_EPOCHS="--epochs 1"
  SPEED="--repeats 2 --steps 1 --warmup 1 --predict-examples 8 --predict-repeats 1 --samples 1,10"
  TESTS="tests/test_arguments.py tests/test_lr_schedule.py"; XDIST=""
  T_SPEED=120; T_MAIN=300; T_TABLE=400
else
  DEVICE=cuda; SEEDS="1 2 3"; EPOCHS=30; SMALL=""; NUM_SAMPLES=10; MAIN_EPOCHS=""
  SPEED="--repeats 11 --steps 2 --predict-examples 500 --predict-repeats 2 --autocast bf16"
  # The notebooks need a Jupyter kernel the device image lacks. loadfile keeps a module's fixtures in one worker.
  TESTS="--ignore=tests/test_notebooks.py tests"; XDIST="-n 6 --dist loadfile"
  T_SPEED=45; T_MAIN=90; T_TABLE=240
fi
METHODS="dgc_elbo logit_adjusted"
TABLE="$WORK/fashion_table_paper_e${EPOCHS}"
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started )) s] $*"; }

{
  stamp "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
  nproc; date -u; git log -1 --format='commit %H' 2>/dev/null

  stamp "phase 1: speed (alone on the device)"
  for preset in small paper; do
    # shellcheck disable=SC2086  # SPEED is a list of options
    timeout $T_SPEED $PY benchmarks/speed.py --device $DEVICE --preset $preset --shape 1,28,28 --batch-size 100 $SPEED \
        --json "$WORK/speed_$preset.json" > "$WORK/speed_$preset.log" 2>&1
    echo "speed $preset rc=$?"; grep -v Warning "$WORK/speed_$preset.log"
  done

  stamp "phase 2: the main job (alone on the device)"
  t0=$(date +%s%N)
  # shellcheck disable=SC2086  # SMALL and MAIN_EPOCHS are empty or lists of options
  timeout $T_MAIN $PY -m dgc_pyro.cli fit --dataset fashion --data-dir "$DATA" --device $DEVICE $SMALL $MAIN_EPOCHS \
      --transform shift-flip --lr-schedule cosine --no-progress --out "$WORK/main" > "$WORK/main.log" 2>&1
  rc=$?; t1=$(date +%s%N)
  echo "main job rc=$rc wall $(( (t1 - t0) / 1000000 )) ms"; cat "$WORK/main.log"

  stamp "phase 3: the suite with --device $DEVICE and the paper-preset table ($SEEDS), side by side"
  # shellcheck disable=SC2086  # TESTS and XDIST are lists of arguments
  timeout $T_TABLE $PY -m pytest -q -p no:cacheprovider --device $DEVICE $XDIST $TESTS > "$WORK/pytest.log" 2>&1 &
  suite=$!
  pids=()
  for s in $SEEDS; do
    # shellcheck disable=SC2086
    timeout $T_TABLE $PY benchmarks/paper_table.py --dataset fashion --data-dir "$DATA" --seeds $s --backbone conv \
        --preset paper --epochs $EPOCHS --num-samples $NUM_SAMPLES --val-num-samples 2 --device $DEVICE $SMALL \
        --transform shift-flip --lr-schedule cosine --methods $METHODS --out "$TABLE" > "$WORK/table_seed$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; echo "table pid $p rc=$?"; done
  wait $suite; echo "pytest rc=$?"; tail -n 25 "$WORK/pytest.log"
  tail -n 3 "$WORK"/table_seed*.log

  stamp "collect"
  # shellcheck disable=SC2086
  $PY benchmarks/paper_table.py --dataset fashion --data-dir "$DATA" --seeds $SEEDS --backbone conv --preset paper \
      --epochs $EPOCHS --num-samples $NUM_SAMPLES --val-num-samples 2 --device $DEVICE $SMALL --methods $METHODS \
      --transform shift-flip --lr-schedule cosine --collect --out "$TABLE" > "$WORK/table.md" 2>&1
  echo "collect rc=$?"; tail -n 20 "$WORK/table.md"
  stamp "done"
} 2>&1 | tee "$WORK/suite.log"

for f in suite.log pytest.log speed_small.json speed_paper.json table.md; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"
done
[ -f "$WORK/main/metrics.json" ] && cp "$WORK/main/metrics.json" "$OUT/main_metrics.json"
tar czf "$OUT/results.tgz" --exclude=./data --exclude="*.safetensors" -C "$WORK" .   # weights: over 16 MiB
ls -la "$OUT"
