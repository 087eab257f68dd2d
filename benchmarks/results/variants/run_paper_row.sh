#!/bin/bash
# issue 21's missing registered row (dgc_paper_iwae_cf, seeds 71-75), from the worktree at the registering commit bb46676
OUT=/work/main/benchmarks/results/variants
PY=/work/main/.venv/bin/python
cd /work/bench_var
run() { PYTHONPATH=/work/bench_var nice -n 10 $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds "$@" --ood-per-set 2000 --threads 1 --out $OUT --methods dgc_paper_iwae_cf; }
( run 71 72 73 > logs/P1.log 2>&1 ) &
( run 74 75 > logs/P2.log 2>&1 ) &
wait
