"""Where q starts: ``method.init = "family"`` (N(0, 1) unconstrained) or ``"prior"``."""

from pathlib import Path

import pytest
import torch

from gradcal.config import ConfigError, build, checked
from gradcal.priors import Product, marginal
from gradcal.report import width_ratios
from gradcal.runs import make_family, prior_start


def config(init: str | None, family: str = "diagonal") -> dict:
    method = {"kind": "vi", "family": family, "transforms": 1, "hidden_features": [8]}
    if init is not None:
        method["init"] = init
    return {
        "model": {"name": "AR1", "options": {"n_timesteps": 20}},
        "parameters": [
            {"name": "phi", "prior": {"kind": "normal", "loc": 0.5, "scale": 0.2}},
            {"name": "sigma", "prior": {"kind": "lognormal", "loc": -1.0, "scale": 0.3}},
        ],
        "data": {"simulate": True, "at": [0.5, 0.3]},
        "loss": {"kind": "mmd"},
        "method": method,
    }


def family_and_prior(init: str | None, family: str = "diagonal"):
    resolved = checked(config(init, family), Path("."))
    built = build(resolved, Path("."))
    return make_family(resolved["method"], built), built


@pytest.mark.parametrize("family", ["diagonal", "full_rank", "nsf", "maf", "flow_mixture"])
def test_init_prior_starts_q_at_the_priors_width(family):
    # 4000 draws each: a 5-95 % width carries about 2 % Monte Carlo error, the ratio of
    # two about 3 %; 0.15 is 5 such sds. From N(0, 1) unconstrained, phi's width would be
    # 5 times the prior's (1 / 0.2) and sigma's 3.3 times on the log scale.
    q, built = family_and_prior("prior", family)
    torch.manual_seed(0)
    with torch.no_grad():
        ratios = width_ratios(q.sample(4000)[0], built.prior.sample((4000,)), built.names)
    if family == "flow_mixture":  # components spread over the prior: wider, not 5 times
        assert all(0.9 < r < 2.5 for r in ratios.values()), ratios
    else:
        assert all(abs(r - 1) < 0.15 for r in ratios.values()), ratios
    q, built = family_and_prior("family", family)
    with torch.no_grad():
        wide = width_ratios(q.sample(4000)[0], built.prior.sample((4000,)), built.names)
    assert wide["phi"] > 4, wide


def test_prior_start_is_exact_for_normal_and_lognormal_priors():
    _, built = family_and_prior("prior")
    loc, scale = prior_start(built.prior, built.prior.supports)
    assert loc.tolist() == pytest.approx([0.5, -1.0]) and scale.tolist() == pytest.approx(
        [0.2, 0.3]
    )
    # others from draws: a uniform's logit has mean 0 and sd pi / sqrt(3) = 1.814; from 4000
    # draws the mean's Monte Carlo sd is 0.03 and the sd's about 0.02
    prior = Product([marginal("uniform", low=0.0, high=1.0)])
    loc, scale = prior_start(prior, prior.supports)
    assert abs(loc.item()) < 0.15 and abs(scale.item() - 1.814) < 0.1


def test_init_is_checked():
    with pytest.raises(ConfigError, match=r"method\.init"):
        checked(config("middle"), Path("."))
