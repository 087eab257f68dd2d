"""benchmarks/ood_dev.py in its smoke mode: every candidate score of the dev-set OOD comparison (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ood_dev():
    return load_benchmark("ood_dev")


def test_the_smoke_run_scores_every_candidate_on_every_set(ood_dev, tmp_path):
    assert ood_dev.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ood_dev_seed31.json").read_text())
    expected = {*ood_dev.BASE_SCORES, *ood_dev.BASELINE_SCORES, *ood_dev.COMBINED}
    assert set(report["auroc"]) == expected
    sets = ("digits", "vflip", "invert", "noise")
    for score, cells in report["auroc"].items():
        assert all(0.0 <= cells[s] <= 1.0 for s in sets), score
        assert cells["mean"] == pytest.approx(np.mean([cells[s] for s in sets]))
        margin = min(cells[s] - report["auroc"]["la_energy"][s] for s in sets)
        assert cells["min_margin_over_la_energy"] == pytest.approx(margin)
    assert report["auroc"]["la_energy"]["min_margin_over_la_energy"] == 0.0
    assert "test" not in report["evaluated_on"]
    assert "| la_energy |" in (tmp_path / "ood_dev_seed31.md").read_text()


def test_latent_gaussians_distance_is_the_nearest_class_mahalanobis(ood_dev):
    rng = np.random.default_rng(0)
    mu = np.concatenate([rng.normal(0, 1, (200, 2)), rng.normal(5, 1, (200, 2))])
    y = np.repeat([0, 1], 200)
    g = ood_dev.LatentGaussians(mu, y, 2)
    point = np.array([[5.0, 5.0], [20.0, 20.0]])
    d = point[:, None] - g.means[None]
    by_hand = np.einsum("nck,kl,ncl->nc", d, g.precision, d).min(1)
    assert np.allclose(g.distance(point), by_hand)
    assert g.distance(point)[0] < 1.0 < g.distance(point)[1]


def test_combined_scores_take_the_both_rules_percentile(ood_dev):
    """The ``A+B`` scores are the package's ``"both"`` calibration (OODDetector.combined), not a copy of it."""
    from dgc_pyro.ood_detector import reference_percentile

    ref = np.linspace(0.0, 1.0, 201)
    u = reference_percentile(np.array([0.0, 0.5, 1.0, 1.5]), ref)
    assert u[:3].tolist() == pytest.approx([0.0, 0.5, 1.0]) and u[3] == pytest.approx(2.0)  # continued above the max
    assert ood_dev.reference_percentile is reference_percentile
