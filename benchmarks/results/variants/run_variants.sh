#!/bin/bash
# issue 21's registered test run (RESULTS.md section 10), from a worktree at the commit that registered the plan:
# two queues, each row over seeds 71-75 before the next (method-major), one thread per process.
set -u
OUT=/work/main/benchmarks/results/variants
PY=/work/main/.venv/bin/python
cd /work/bench_var && mkdir -p logs
run() { PYTHONPATH=/work/bench_var $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds 71 72 73 74 75 --ood-per-set 2000 --threads 1 --out $OUT --methods "$@"; }
( for m in "dgc_swag dgc_elbo" dgc_drw dgc_head_noise dgc_paper_iwae_cf; do run $m; done > logs/A.log 2>&1 ) &
( for m in logit_adjusted_matched dgc_crt dgc_class_conditional balanced_softmax_matched; do run $m; done > logs/B.log 2>&1 ) &
wait
