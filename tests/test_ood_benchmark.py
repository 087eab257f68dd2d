"""benchmarks/ood.py end to end on digits in its smoke mode (1 epoch): every figure is there and in range."""

from __future__ import annotations

import json

import pytest
from fixtures import load_benchmark


@pytest.mark.slow
def test_ood_benchmark_smoke(tmp_path):
    bench = load_benchmark("ood")
    assert bench.main(["--smoke", "--test-subset", "60", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ood.json").read_text())
    (record,) = report["seeds"]
    assert set(record["sets"]) == {"digits", "vflip", "invert", "noise"}
    for row in record["sets"].values():
        for key, value in row.items():
            if key.endswith(("_auroc", "_fpr95")) or key == "flag_rate":
                assert 0.0 <= value <= 1.0, key
    # inverted images are far from anything the model saw: its density flags them even after one epoch
    assert record["sets"]["invert"]["dgc_density_auroc"] > 0.9
    stream = record["stream"]
    assert abs(stream["ood_share"] - 0.2) < 0.03
    assert all(0.0 <= stream[f"aurc_{k}"] <= 1.0 for k in ("entropy", "density", "both", "baseline_max_softmax"))
    md = (tmp_path / "ood.md").read_text()
    assert "AURC on the mixed stream (2" in md and "| invert |" in md
