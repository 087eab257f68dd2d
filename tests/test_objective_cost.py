"""benchmarks/objective_cost.py on a tiny set: it fits every asked objective and writes its figures."""

from __future__ import annotations

import json

import pytest
from fixtures import load_benchmark


def test_every_objective_is_fitted_and_written(tmp_path):
    cost = load_benchmark("objective_cost")
    out = tmp_path / "cost.json"
    assert cost.main(["--objectives", "elbo", "iwae-cf", "--n", "20", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["seconds"]) == {"elbo", "iwae-cf"} and report["n"] == 20
    assert all(s > 0 for s in report["seconds"].values())
    with pytest.raises(SystemExit, match="--n must be at least 20"):
        cost.main(["--n", "5"])
