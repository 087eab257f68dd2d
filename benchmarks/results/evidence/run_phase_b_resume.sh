#!/bin/bash
# resumes phase B after the session-12 cut-off (finished runs are reused); two processes, balanced by expected time:
# the fast rows first, the slow dgc_paper_guide last, split by seeds.
set -u
OUT=/work/bench_ev/benchmarks/results/evidence
PY=/work/main/.venv/bin/python
cd /work/bench_test && mkdir -p logs
date -u +%FT%TZ > logs/phaseB_resumed
run() { PYTHONPATH=/work/bench_test $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --ood-per-set 2000 --threads 1 --out $OUT "$@"; }
( run --seeds 51 52 53 54 55 --methods dgc_elbo vib ce logit_adjusted balanced_softmax && run --seeds 52 53 --methods dgc_paper_guide ) > logs/B3.log 2>&1 &
( run --seeds 51 52 53 54 55 --methods logit_adjusted_matched balanced_softmax_matched && run --seeds 54 55 --methods dgc_paper_guide ) > logs/B4.log 2>&1 &
wait
date -u +%FT%TZ > logs/phaseB_done
