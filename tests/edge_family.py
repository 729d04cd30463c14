"""A variational family with a bounded support whose draws can land on its edge."""

import math

import torch

from gradcal.posterior_estimators import Family


class EdgeFamily(Family):
    """q: theta = loc + scale * u with u ~ Beta(2, 2) on [0, 1], over one parameter:
    log q(theta) = log 6 + log z + log(1 - z) - log scale, z = (theta - loc) / scale.

    The draws take the given noise ``u`` (n,) in order, so a test can put one on the edge
    u = 0: there log q = -inf and d log z / dz = inf, so a graph of log q built over that
    draw sends 0 * inf = NaN into ``loc`` and ``scale`` even when the draw is dropped.
    """

    def __init__(self, u: torch.Tensor, loc: float = 1.5, scale: float = 1.0):
        super().__init__()
        self.dim = 1
        self.u = u
        self.loc = torch.nn.Parameter(torch.tensor(loc))
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def distribution(self):
        raise NotImplementedError("EdgeFamily is not a torch distribution.")

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """theta (n, 1) for the noise u (n,), with its graph to loc and scale."""
        return (self.loc + self.scale * u)[:, None]

    def sample(self, n):
        theta = self.draw(self.u[:n])
        return theta, self.log_prob(theta)

    def log_prob(self, theta):
        return self.density(theta, self.loc, self.scale)

    @staticmethod
    def density(theta, loc, scale):
        """log q(theta) (n,) for theta (n, 1) at the given loc and scale."""
        z = (theta[:, 0] - loc) / scale
        return math.log(6.0) + torch.log(z) + torch.log1p(-z) - torch.log(scale)

    def grads(self) -> torch.Tensor:
        """(loc, scale) gradients, then cleared."""
        out = torch.stack([self.loc.grad.clone(), self.scale.grad.clone()])
        self.zero_grad()
        return out


def edge_noise(n: int, seed: int = 0) -> torch.Tensor:
    """n Beta(2, 2) noise values (the median of three uniforms, a seeded stream), the first
    one set on the edge u = 0."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=gen).median(-1).values
    u[0] = 0.0
    return u
