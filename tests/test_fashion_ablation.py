"""benchmarks/fashion_ablation.py: what it scores on, and how it keys its results."""

from __future__ import annotations

import json

import pytest
from fixtures import load_benchmark

COUNTS = "20,15,12,10,8,6,5,5,4,4"  # small enough that digits leaves unused training images for a dev set


def _fake_run(calls):
    def run(cfg, split, x_tr, x_ev, y_ev, seed, num_samples):
        calls.append({"name": cfg.name, "y_ev": y_ev, "x_ev": x_ev})
        return {
            "config": {"name": cfg.name, "label_weight": cfg.label_weight},
            "fit_seconds": 0.0,
            "best_epoch": 1,
            "rules": {"mixture": {"acsa": cfg.label_weight / 1000, "ece": 0.0}},
        }

    return run


def _spy_load(bench, monkeypatch):
    loads = []
    real = bench.load_imbalanced

    def load(*args, **kwargs):
        loads.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "load_imbalanced", load)
    return loads


def test_ablation_scores_on_the_dev_set_by_default_and_records_it(tmp_path, monkeypatch):
    bench = load_benchmark("fashion_ablation")
    loads = _spy_load(bench, monkeypatch)
    out = tmp_path / "ablation.json"
    # one real fit, end to end, at a size that measures nothing
    saved = bench.main(
        [
            "--dataset",
            "digits",
            "--counts",
            COUNTS,
            "--dev-per-class",
            "3",
            "--num-samples",
            "2",
            "--only",
            "label_weight 100",
            "--out",
            str(out),
        ]
    )
    assert loads == [{"counts": loads[0]["counts"], "seed": 1, "evaluate_on": "dev", "dev_per_class": 3}]
    assert saved["evaluation"]["evaluate_on"] == "dev" and saved["evaluation"]["size"] == 30
    entry = saved["results"]["phase 1: label_weight 100"]
    assert entry["evaluate_on"] == "dev" and 0.0 <= entry["rules"]["mixture"]["acsa"] <= 1.0
    assert json.loads(out.read_text()) == json.loads(json.dumps(saved))


def test_ablation_on_the_test_split_only_when_asked_and_refuses_mixing(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("fashion_ablation")
    loads = _spy_load(bench, monkeypatch)
    calls = []
    monkeypatch.setattr(bench, "run", _fake_run(calls))
    out = tmp_path / "ablation.json"
    saved = bench.main(
        [
            "--dataset",
            "digits",
            "--counts",
            COUNTS,
            "--evaluate-on",
            "test",
            "--test-per-class",
            "2",
            "--only",
            "label_weight 10",
            "--out",
            str(out),
        ]
    )
    assert "evaluate_on" not in loads[0] and saved["evaluation"]["evaluate_on"] == "test"
    assert len(calls[0]["y_ev"]) == 20
    # a dev-set run must not be appended to a file of test-split scores
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--dataset", "digits", "--counts", COUNTS, "--dev-per-class", "2", "--out", str(out)])
    assert exit_info.value.code == 2 and "holds results of another evaluation" in capsys.readouterr().err
    # a session-1 file (flat, keyed by name, no record of its evaluation set) is refused too
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"label_weight 100": {"phase": 1}}))
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "digits", "--counts", COUNTS, "--dev-per-class", "2", "--out", str(old)])
    assert "session-1 format" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--test-per-class", "2"], "--test-per-class applies to --evaluate-on test only"),
        (["--evaluate-on", "test", "--dev-per-class", "2"], "--dev-per-class applies to --evaluate-on dev only"),
        (["--only", "no such config"], "--only: no configuration"),
    ],
)
def test_ablation_refuses_options_it_would_ignore(tmp_path, capsys, argv, message):
    bench = load_benchmark("fashion_ablation")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--dataset", "digits", "--counts", COUNTS, "--out", str(tmp_path / "a.json"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_ablation_keeps_a_config_rerun_in_a_later_phase_apart(tmp_path, monkeypatch):
    bench = load_benchmark("fashion_ablation")
    calls = []
    monkeypatch.setattr(bench, "run", _fake_run(calls))
    out = tmp_path / "ablation.json"
    common = [
        "--dataset",
        "digits",
        "--counts",
        COUNTS,
        "--dev-per-class",
        "2",
        "--only",
        "label_weight 100",
        "--out",
        str(out),
    ]
    bench.main(["--phase", "1", *common])
    saved = bench.main(["--phase", "4", *common])
    assert [c["name"] for c in calls] == ["label_weight 100", "label_weight 100"]
    assert set(saved["results"]) == {"phase 1: label_weight 100", "phase 4: label_weight 100"}
    assert [saved["results"][k]["phase"] for k in sorted(saved["results"])] == [1, 4]
