"""Drivers on a CUDA device (skipped where there is none): tensors follow the family."""

import pytest
import torch

from gradcal import VI
from gradcal.infer import MALA, MCMC, SMD, importance_sampling
from gradcal.losses import MMDLoss, NegativeLogLikelihood
from gradcal.models import BrockHommesBeliefs, RamaCont
from gradcal.posterior_estimators import Flow

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _prior(device):
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(4, device=device), torch.ones(4, device=device)), 1
    )


def test_vi_runs_on_cuda():
    model = RamaCont(1000, 50, 0.1, 5.0, log10_params=True).cuda()
    truth = torch.tensor([0.0, -0.3, 0.0, -0.15], device="cuda")
    y = model.run_and_observe(truth)[0].detach()
    q = Flow(4).cuda()
    vi = VI(
        MMDLoss(model, y),
        _prior("cuda"),
        q,
        n_samples_per_epoch=8,
        progress_bar=False,
        seed=0,
        device="cuda",
    )
    vi.run(y, 3, 10)
    assert q.sample(5)[0].is_cuda and len(vi.losses_hist["total"]) == 3


def test_smd_mcmc_and_importance_sampling_on_cuda():
    model = BrockHommesBeliefs.wavy().cuda()
    y = model.run_and_observe(model.true_params.cuda())[0].detach()
    loss = NegativeLogLikelihood(model)
    theta = (model.true_params.cuda() + 0.05 * torch.randn(3, 4, device="cuda")).requires_grad_()
    estimate, _ = SMD(loss, torch.optim.Adam([theta], lr=0.01), seed=0).run(y, 5, 5)
    assert estimate.is_cuda
    mcmc = MCMC(MALA(_prior("cuda"), loss), num_samples=5, progress_bar=False)
    mcmc.run(model.true_params.cuda().expand(2, -1), y, scale=1e-4, seed=0)
    assert mcmc.samples.is_cuda
    assert importance_sampling(loss, _prior("cuda"), y, 50, min_ess=0).theta.is_cuda
