"""BlackBIRDS' Rama Cont tutorial, running on gradcal with only the imports renamed.

    python examples/blackbirds_rama_cont.py [--epochs 100] [--agents 1000]

A user-written single-draw ``Model`` subclass (10**params, LogNormal thresholds drawn with
``torch.distributions``), BlackBIRDS' ``SingleOutput_SimulateAndMMD`` loss, a normflows
affine-coupling flow and ``VI(..., w=0.001, gradient_clipping_norm=1.0)``. gradcal batches
the single-draw loss over the draws of each epoch with ``torch.func.vmap`` (it says so in
the log) instead of running them one by one.
"""

from __future__ import annotations

import argparse
import logging

import normflows as nf
import torch

from gradcal.infer.vi import VI
from gradcal.losses import SingleOutput_SimulateAndMMD
from gradcal.models.model import Model


class RamaCont(Model):
    def __init__(self, n_agents, n_timesteps, s, sigmoid_k):
        super().__init__()
        self.n_agents = n_agents
        self.n_timesteps = n_timesteps
        self.s = s
        self.sigmoid_k = sigmoid_k

    def initialize(self, params):
        nu_0 = torch.distributions.LogNormal(params[0], params[1]).rsample((self.n_agents,))
        epsilon_t = torch.zeros(self.n_agents)
        order = self.compute_order(epsilon_t, nu_0)
        eta = params[3]
        returns = self.compute_returns(order, eta) * torch.ones(self.n_agents)
        x = torch.vstack((nu_0, epsilon_t, returns))
        return x.reshape(1, 3, self.n_agents)

    def step(self, params, x):
        sigma = params[2]
        epsilon_t = torch.distributions.Normal(0, sigma).rsample()
        nu_t = x[-1, 0, :]
        order = self.compute_order(epsilon_t, nu_t)
        eta = params[3]
        returns = self.compute_returns(order, eta)
        new_nu_t = self.compute_new_nu_t(nu_t, self.s, returns)
        x = torch.vstack(
            (new_nu_t, epsilon_t * torch.ones(self.n_agents), returns * torch.ones(self.n_agents))
        )
        return x.reshape(1, 3, self.n_agents)

    def observe(self, x):
        return [x[:, 2, 0]]

    def compute_order_soft(self, epsilon_t, nu_t):
        return torch.sigmoid(self.sigmoid_k * (epsilon_t - nu_t)) - torch.sigmoid(
            self.sigmoid_k * (-nu_t - epsilon_t)
        )

    def compute_order_hard(self, epsilon_t, nu_t):
        return (epsilon_t > nu_t).float() - (epsilon_t < -nu_t).float()

    def compute_order(self, epsilon_t, nu_t):
        soft = self.compute_order_soft(epsilon_t, nu_t)
        return self.compute_order_hard(epsilon_t, nu_t) + soft - soft.detach()

    def compute_returns(self, order, eta):
        return 1.0 / (self.n_agents * eta) * order.sum()

    def compute_new_nu_t(self, nu_t, s, returns):
        probs = s * torch.ones(self.n_agents)
        probs = torch.vstack((probs, 1.0 - probs)).transpose(0, 1)
        q = torch.nn.functional.gumbel_softmax(probs.log(), tau=0.1, hard=True)[:, 0]
        return torch.abs(returns) * q + (1 - q) * nu_t

    def trim_time_series(self, x):
        return x


class LogModel(RamaCont):
    def initialize(self, params):
        return super().initialize(10**params)

    def step(self, params, x):
        return super().step(10**params, x)


class MMDLoss:
    def __init__(self, *args, offset=0.0, **kwargs):
        self.mmd_calculator = SingleOutput_SimulateAndMMD(*args, **kwargs)
        self.offset = offset

    def __call__(self, *args, **kwargs):
        return self.mmd_calculator(*args, **kwargs) - self.offset


def make_flow(dim):
    torch.manual_seed(1)
    base = nf.distributions.base.DiagGaussian(dim)
    flows = []
    for _ in range(5):
        param_map = nf.nets.MLP([2, 50, 50, 4], init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(param_map))
        flows.append(nf.flows.Permute(4, mode="swap"))
    return nf.NormalizingFlow(base, flows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model = LogModel(n_agents=args.agents, n_timesteps=100, s=0.1, sigmoid_k=5.0)
    true_parameters = torch.log10(torch.tensor([1.0, 0.5, 1.0, 0.7]))
    true_data = model.run_and_observe(true_parameters)
    prior = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
    path_estimator = make_flow(len(true_parameters))
    mmd_loss = MMDLoss(model=model, y=true_data[0], offset=1.0)
    optimizer = torch.optim.AdamW(path_estimator.parameters(), lr=1e-3)
    vi = VI(
        loss=mmd_loss,
        posterior_estimator=path_estimator,
        prior=prior,
        optimizer=optimizer,
        n_samples_per_epoch=10,
        w=0.001,
        gradient_estimation_method="pathwise",
        gradient_clipping_norm=1.0,
    )
    vi.run(true_data[0], n_epochs=args.epochs, max_epochs_without_improvement=100)
    path_estimator.load_state_dict(vi.best_estimator_state_dict)
    with torch.no_grad():
        samples = path_estimator.sample(10_000)[0]
    print("posterior mean of log10 parameters:", samples.mean(0).tolist())
    print("true log10 parameters:             ", true_parameters.tolist())


if __name__ == "__main__":
    main()
