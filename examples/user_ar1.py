"""A user's own two-parameter model, as a newcomer writes one: an AR(1) series.

x_t = phi x_{t-1} + sigma eps_t, x_0 = 0; params (B, 2) = (phi, sigma). Used by
benchmarks/init.py and tests/test_report.py as "a model nobody here wrote into the library"
(a TOML run names it `"user_ar1:MyAR1"`, found in the config's folder).
"""

import torch

from gradcal.models import Model


class MyAR1(Model):
    """x_t = phi x_{t-1} + sigma eps_t, x_0 = 0; params (B, 2) = (phi, sigma)."""

    batched = True
    n_params = 2
    history_length = 1

    def __init__(self, n_timesteps=100):
        super().__init__()
        self.n_timesteps = n_timesteps

    def initialize(self, params):
        return params.new_zeros(params.shape[0], 1)

    def step(self, params, x):
        phi, sigma = params[:, :1], params[:, 1:]
        return phi * x[:, -1:] + sigma * torch.randn_like(phi)

    def observe(self, x):
        return [x]

    def observed_lengths(self):
        return [self.n_timesteps + 1]
