#!/bin/bash
# waits for phase A's two queues, writes plan.json, then runs phase B in two processes (methods split)
set -u
OUT=/work/bench_ev/benchmarks/results/evidence
PY=/work/main/.venv/bin/python
while pgrep -f "evidence.py --phase tune" >/dev/null; do sleep 15; done
cd /work/bench_ev && PYTHONPATH=/work/bench_ev $PY benchmarks/evidence.py --phase tune --data-dir ../shared/data --seeds 31 --grid-lr 5e-4 1e-3 2e-3 --grid-tau 1.0 1.5 --threads 1 --out $OUT > logs/plan.log 2>&1
[ -f $OUT/plan.json ] || { echo "no plan"; exit 1; }
cd /work/bench_test && mkdir -p logs
date -u +%FT%TZ > logs/phaseB_started
PYTHONPATH=/work/bench_test nohup $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds 51 52 53 54 55 --ood-per-set 2000 --threads 1 --methods dgc_elbo vib dgc_paper_guide ce --out $OUT > logs/B1.log 2>&1 &
PYTHONPATH=/work/bench_test nohup $PY benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds 51 52 53 54 55 --ood-per-set 2000 --threads 1 --methods logit_adjusted balanced_softmax logit_adjusted_matched balanced_softmax_matched --out $OUT > logs/B2.log 2>&1 &
wait
date -u +%FT%TZ > logs/phaseB_done
