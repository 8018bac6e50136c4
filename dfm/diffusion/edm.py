"""Preconditioning and training losses of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), Table 1; semantics follow NVlabs/edm training/networks.py and training/loss.py.

Each preconditioning wraps ANY backbone ``F = net(x_in, c_noise, **cond)`` into a denoiser (eq. 7)

    D(x, sigma, **cond) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), **cond)

so the backbone never knows the paradigm; every sampler drives the result through ``D(x, sigma)`` (paths.py).

    Table 1      c_skip                    c_out                          c_in                      c_noise
    VP           1                         -sigma                         1/sqrt(sigma^2+1)         (M-1) sigma^-1(sigma)
    VE           1                         sigma                          1                         ln(sigma/2)
    iDDPM        1                         -sigma                         1/sqrt(sigma^2+1)         M-1-argmin_j |u_j - sigma|
    EDM          sd^2/(sigma^2+sd^2)       sigma*sd/sqrt(sigma^2+sd^2)    1/sqrt(sigma^2+sd^2)      ln(sigma)/4

(sd = sigma_data.) The losses return PER-SAMPLE values [B] = lambda(sigma) * mean((D(x0 + sigma*n, sigma) - x0)^2)
so a trainer can mask or weight them. NVlabs sums over pixels; the mean here keeps the scale independent of the
video size (a constant factor, i.e. a learning-rate rescale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from dfm.diffusion.noise import Generator, rand, randn, randn_like
from dfm.diffusion.paths import append_dims

Tensor = torch.Tensor


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Table 1); expm1 keeps small t exact."""
    t = torch.as_tensor(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """t = sigma^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d (Table 1)."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


# --- preconditioning (Table 1) ------------------------------------------------------------------------------------


class Precond(nn.Module):
    """D(x, sigma, **cond) = c_skip*x + c_out*F(c_in*x, c_noise, **cond); subclasses give the coefficients.

    `dtype` is the backbone's compute dtype (e.g. torch.bfloat16; None = fp32). Only the backbone input x_in is
    cast to it: sigma, c_noise and all c_* stay fp32 and the skip connection is summed in fp32.
    """

    sigma_min: float
    sigma_max: float
    learned_variance = False

    def __init__(self, net: Callable[..., Tensor], dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.dtype = dtype

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each [B] fp32, for sigma [B] fp32."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """The nearest noise level the network supports (the identity for continuous-time models)."""
        return torch.as_tensor(sigma)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        """x [B, ...], sigma [B] or scalar -> D(x, sigma) [B, ...] in fp32."""
        x = x.float()
        # fp32 on purpose: sigma and the c_* coefficients never go through the backbone's (bf16) dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)  # [B] each, fp32
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))  # [B, 1, ..., 1]
        x_in = (c_in * x).to(self.dtype or torch.float32)
        F_x = self.net(x_in, c_noise, **cond)
        if self.learned_variance:  # iDDPM backbones output [eps, variance] (2C channels); D uses the first C
            F_x = F_x[:, : x.shape[1]]
        return c_skip * x + c_out * F_x.float()  # fp32 skip connection


class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021), Table 1 column "VP".

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [epsilon_t, 1]; c_noise = (M - 1) sigma^-1(sigma).
    """

    def __init__(self, net, *, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, dtype=None):
        super().__init__(net, dtype)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021), Table 1 column "VE": D = x + sigma * F(x, ln(sigma / 2))."""

    def __init__(self, net, *, sigma_min=0.02, sigma_max=100.0, dtype=None):
        super().__init__(net, dtype)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(0.5 * sigma)


class iDDPMPrecond(Precond):
    """Improved DDPM (Nichol & Dhariwal 2021), Table 1 column "iDDPM": a discrete model on M + 1 levels u_j.

    abar_j = sin^2(pi/2 * j / (M (C_2 + 1))),  u_M = 0,  u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1}/abar_j, C_1) - 1)
    c_noise = M - 1 - j* with j* the index of the table value nearest to sigma (`round_sigma`).
    """

    learned_variance = True

    def __init__(self, net, *, C_1=0.001, C_2=0.008, M=1000, dtype=None):
        super().__init__(net, dtype)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1, dtype=torch.float64)  # the recursion in float64, the buffer in fp32 (portable)
        for j in range(M, 0, -1):  # j = M, ..., 1
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clamp(min=C_1) - 1).sqrt()
        self.register_buffer("u", u.float())  # [M + 1], descending from u_0 = sigma_max to u_M = 0
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def alpha_bar(self, j):
        j = torch.as_tensor(j, dtype=torch.float64)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index: bool = False):
        """The nearest table value u_j (or its index j when `return_index`), same shape as sigma."""
        sigma = torch.as_tensor(sigma)
        dist = (sigma.reshape(-1, 1).to(self.u) - self.u.reshape(1, -1)).abs()  # [N, M + 1]
        index = dist.argmin(dim=1).reshape(sigma.shape)
        return index if return_index else self.u[index].to(sigma.dtype)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).float()
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(Precond):
    """Karras et al. 2022, Table 1 column "ours": unit-variance input and target at every sigma."""

    def __init__(self, net, *, sigma_data=0.5, sigma_min=0.0, sigma_max=math.inf, dtype=None):
        super().__init__(net, dtype)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# --- noise-level distributions for training (Table 1, "Training") -------------------------------------------------


class SigmaSampler(Protocol):
    """Anything with `.sample(batch, generator) -> sigma [B]`, e.g. a learned schedule module."""

    def sample(self, batch: int, generator: Generator = None) -> Tensor: ...


@dataclass
class LogNormalSigma:
    """EDM: ln(sigma) ~ N(P_mean, P_std^2)."""

    P_mean: float = -1.2
    P_std: float = 1.2

    def sample(self, batch, generator=None):
        return (self.P_mean + self.P_std * randn(batch, generator)).exp()


@dataclass
class VPSigma:
    """VP: sigma = sigma(t) with t ~ U(epsilon_t, 1)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5

    def sample(self, batch, generator=None):
        t = 1 + rand(batch, generator) * (self.epsilon_t - 1)  # U(epsilon_t, 1]
        return vp_sigma(t, self.beta_d, self.beta_min)


@dataclass
class LogUniformSigma:
    """VE: ln(sigma) ~ U(ln sigma_min, ln sigma_max)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def sample(self, batch, generator=None):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** rand(batch, generator)


# --- losses (Table 1: lambda(sigma) and p_train(sigma)) -----------------------------------------------------------


def denoising_loss(denoiser, x0: Tensor, sigma: Tensor, weight: Tensor, generator: Generator = None, **cond) -> Tensor:
    """lambda(sigma) * mean over non-batch dims of (D(x0 + sigma*n, sigma) - x0)^2, per sample [B] (eq. 8 / 108).

    x0 [B, ...]; sigma, weight [B] fp32; n ~ N(0, I) from `generator` (drawn after sigma).
    """
    n = randn_like(x0, generator)  # [B, ...]
    sigma = sigma.to(x0.device)
    x = x0 + append_dims(sigma, x0.ndim) * n
    D_x = denoiser(x, sigma, **cond)
    err = (D_x.float() - x0.float()) ** 2  # [B, ...]
    return weight.to(x0.device) * err.mean(dim=tuple(range(1, x0.ndim)))  # [B]


def edm_loss(denoiser, x0, *, generator=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, sigma_sampler=None, **cond):
    """EDM loss [B]: ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma*sigma_data)^2.

    lambda = 1 / c_out^2 of EDMPrecond, so the backbone's effective target has unit weight at every sigma.
    `sigma_sampler` (anything with `.sample(batch, generator)`) replaces the log-normal.
    """
    sampler = sigma_sampler if sigma_sampler is not None else LogNormalSigma(P_mean, P_std)
    sigma = sampler.sample(x0.shape[0], generator).float()  # [B] fp32
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return denoising_loss(denoiser, x0, sigma, weight, generator, **cond)


def vp_loss(denoiser, x0, *, generator=None, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, sigma_sampler=None, **cond):
    """VP loss [B]: sigma = sigma(t), t ~ U(epsilon_t, 1), lambda(sigma) = 1 / sigma^2."""
    sampler = sigma_sampler if sigma_sampler is not None else VPSigma(beta_d, beta_min, epsilon_t)
    sigma = sampler.sample(x0.shape[0], generator).float()
    return denoising_loss(denoiser, x0, sigma, 1 / sigma**2, generator, **cond)


def ve_loss(denoiser, x0, *, generator=None, sigma_min=0.02, sigma_max=100.0, sigma_sampler=None, **cond):
    """VE loss [B]: ln(sigma) ~ U(ln sigma_min, ln sigma_max), lambda(sigma) = 1 / sigma^2."""
    sampler = sigma_sampler if sigma_sampler is not None else LogUniformSigma(sigma_min, sigma_max)
    sigma = sampler.sample(x0.shape[0], generator).float()
    return denoising_loss(denoiser, x0, sigma, 1 / sigma**2, generator, **cond)
