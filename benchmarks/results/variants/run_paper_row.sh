#!/bin/bash
# issue 21's registered paper row (dgc_paper_iwae_cf; RESULTS.md section 10) from a worktree at the registering commit
# bb46676 (made when missing): the seeds given (default 71-75) shared out over two one-thread processes, one seed per
# call, so every finished seed is written at once; finished runs are reused, so a later call completes the row.
# About 100 minutes a seed on one core of the 2-core VM (fit 88, mixture-rule evaluation 14; RESULTS section 10).
set -u
MAIN=/work/main
WT=/work/bench_var
OUT=$MAIN/benchmarks/results/variants
PY=$MAIN/.venv/bin/python
[ -d $WT ] || git -C $MAIN worktree add --detach $WT bb46676
cd $WT && mkdir -p logs
seeds=("${@:-71 72 73 74 75}")
read -r -a seeds <<< "${seeds[*]}"
run() { PYTHONPATH=$WT $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds "$1" --ood-per-set 2000 \
  --threads 1 --out $OUT --methods dgc_paper_iwae_cf; }
queue() { for ((i = $1; i < ${#seeds[@]}; i += 2)); do run "${seeds[$i]}"; done; }
( queue 0 > logs/P1.log 2>&1 ) &
( queue 1 > logs/P2.log 2>&1 ) &
wait
