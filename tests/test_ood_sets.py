"""The OOD sets of the evidence benchmark and the OOD detection metrics."""

import numpy as np
import pytest
import torch

from dgc_pyro.data.ood import OOD_SETS, ood_sets, upscaled_digits
from dgc_pyro.metrics import fpr_at_tpr, ood_auroc


def _images(n: int = 6, shape=(1, 28, 28)) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(0))


def test_every_set_is_in_range_and_shaped_like_the_input():
    x = _images()
    sets = ood_sets(x, seed=3)
    assert tuple(sets) == OOD_SETS
    for name, s in sets.items():
        assert s.dtype == torch.float32 and tuple(s.shape[1:]) == (1, 28, 28), name
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0, name
    assert len(sets["digits"]) == 1797
    assert torch.equal(sets["vflip"], x.flip(-2))
    assert torch.equal(sets["invert"], 1 - x)
    assert len(sets["noise"]) == len(x)


def test_noise_follows_the_seed_and_digits_follow_the_channels():
    x = _images(shape=(3, 32, 32))
    assert torch.equal(ood_sets(x, seed=1, sets=("noise",))["noise"], ood_sets(x, seed=1, sets=("noise",))["noise"])
    assert not torch.equal(ood_sets(x, seed=1, sets=("noise",))["noise"], ood_sets(x, seed=2, sets=("noise",))["noise"])
    d = upscaled_digits((3, 32, 32))
    assert d.shape == (1797, 3, 32, 32) and torch.equal(d[:, 0], d[:, 2])
    # an upscaled digit keeps its shape: the centre of a "1" is brighter than its corners
    assert float(d[:, 0, 12:20, 12:20].mean()) > float(d[:, 0, :4, :4].mean())


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown OOD set"):
        ood_sets(_images(), sets=("svhn",))
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\)"):
        ood_sets(torch.rand(4, 64))
    with pytest.raises(ValueError, match="outside"):
        ood_sets(_images() * 255)


def test_auroc_and_fpr95_on_known_scores():
    s_in = np.arange(100.0)
    assert ood_auroc(s_in, s_in + 1000) == 1.0
    assert ood_auroc(s_in + 1000, s_in) == 0.0
    assert ood_auroc(s_in, s_in) == pytest.approx(0.5)
    # a threshold keeping 95 of the 100 in-distribution scores (<= 95) accepts OOD scores 90..95: 6 of 20
    assert fpr_at_tpr(s_in, np.arange(90.0, 110.0)) == pytest.approx(6 / 20)
    assert fpr_at_tpr(s_in, s_in + 1000) == 0.0


def test_ood_metrics_refuse_empty_or_nonfinite_scores():
    with pytest.raises(ValueError, match="score_out is empty"):
        ood_auroc([1.0, 2.0], [])
    with pytest.raises(ValueError, match="score_in contains NaN"):
        fpr_at_tpr([1.0, float("nan")], [2.0])
    with pytest.raises(ValueError, match="tpr must lie"):
        fpr_at_tpr([1.0], [2.0], tpr=0.0)


def test_logit_scores_are_one_minus_max_softmax_and_negative_logsumexp():
    from dgc_pyro.ood_detector import logit_scores

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = logit_scores(logits)
    assert torch.allclose(s["max_softmax"], 1 - torch.softmax(logits, -1).max(-1).values)
    assert torch.allclose(s["energy"], torch.tensor([-torch.logsumexp(logits[0], 0), -np.log(3.0)]).float())
    assert float(s["max_softmax"][1]) > float(s["max_softmax"][0])  # the flat row is the more unusual one
