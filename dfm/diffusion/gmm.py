"""Gaussian mixtures: data whose EDM denoiser is known in closed form, for tests and sampler benchmarks.

x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma * n give (per component, then mixed by responsibility)

    p(x | k)          = N(mu_k, (s_k^2 + sigma^2) I)
    E[x0 | x, k]      = mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)
    D(x, sigma)       = sum_k r_k(x) E[x0 | x, k],   r_k ∝ w_k p(x | k)

For one Gaussian the probability-flow ODE dx/dsigma = (x - D) / sigma has the exact solution
x(sigma) - mu = (x(sigma_0) - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


class GaussianMixture:
    """Isotropic Gaussian mixture over tensors of `shape`. Computation in float64; outputs in the input dtype."""

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None, shape=None):
        self.means = means.double().reshape(means.shape[0], -1)  # [K, D]
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()  # [K]
        w = torch.ones(k, dtype=torch.float64) if weights is None else weights.double()
        self.weights = w / w.sum()  # [K]
        self.shape = tuple(shape) if shape is not None else tuple(means.shape[1:])

    @classmethod
    def random(cls, shape, components: int = 4, std: float = 0.3, seed: int = 0) -> "GaussianMixture":
        """A fixed random mixture: means ~ N(0, I), equal weights, component std `std`."""
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(shape)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        return cls(means, std, weights, shape)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples [n, *shape] (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # [n]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.shape)

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Exact D(x, sigma) = E[x0 | x0 + sigma*n = x] for x [B, *shape], sigma [B] (or scalar); sigma may be inf."""
        xf = x.double().reshape(x.shape[0], -1)  # [B, D]
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])[:, None]  # [B, 1]
        var = self.stds[None] ** 2 + sig**2  # [B, K]
        d2 = torch.cdist(xf, self.means) ** 2  # [B, K]
        logp = torch.log(self.weights)[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(var)
        r = torch.softmax(logp, dim=1)  # [B, K] responsibilities
        shrink = self.stds[None] ** 2 / var  # [B, K]
        # E[x0|x] = sum_k r_k (mu_k + shrink_k (x - mu_k)) = sum_k r_k (1 - shrink_k) mu_k + (sum_k r_k shrink_k) x
        x0 = (r * (1 - shrink)) @ self.means + (r * shrink).sum(1, keepdim=True) * xf  # [B, D]
        inf = torch.isinf(sig[:, 0])
        if inf.any():  # the limit sigma -> inf: the prior mean
            x0[inf] = (self.weights @ self.means)[None].expand(int(inf.sum()), -1)
        return x0.reshape(x.shape).to(x.dtype)

    def exact_solution(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """The exact probability-flow ODE map from sigma_from to sigma_to; one Gaussian only."""
        if self.means.shape[0] != 1:
            raise ValueError("exact_solution needs a single Gaussian; use reference_solution for mixtures")
        mu, s2 = self.means[0].reshape(self.shape), float(self.stds[0]) ** 2
        ratio = math.sqrt(s2 + sigma_to**2) / math.sqrt(s2 + sigma_from**2)
        return (mu + (x.double() - mu) * ratio).to(x.dtype)

    def reference_solution(self, x: Tensor, sigma_from: float, sigma_to: float = 0.0, rtol: float = 1e-10) -> Tensor:
        """The probability-flow ODE map solved to `rtol` by adaptive Dormand-Prince in float64.

        Integrates in u = log(sigma) down to sigma = 1e-3, where the steps shrink geometrically, then the last
        stretch to `sigma_to` in sigma itself (D is smooth in sigma near 0, so the ODE is benign there).
        """
        from torchdiffeq import odeint

        x64 = x.double()

        def f_sigma(sig, y):  # dx/dsigma = (x - D(x, sigma)) / sigma
            s = sig.expand(y.shape[0])
            return (y - self.denoiser(y, s)) / sig

        def f_log(u, y):  # dx/du = sigma * dx/dsigma with sigma = exp(u)
            sig = torch.exp(u)
            return sig * f_sigma(sig, y)

        opts = dict(rtol=rtol, atol=rtol, method="dopri5")
        mid = max(min(1e-3, sigma_from), sigma_to)
        y = odeint(f_log, x64, torch.tensor([math.log(sigma_from), math.log(mid)], dtype=torch.float64), **opts)[-1]
        if sigma_to < mid:
            y = odeint(f_sigma, y, torch.tensor([mid, sigma_to], dtype=torch.float64), **opts)[-1]
        return y.to(x.dtype)
