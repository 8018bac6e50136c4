"""Samplers in flow-matching coordinates: integrate dx/ds = v(x, s) in the flow time s itself.

    sample_flow_<name>(velocity, x, ts, *, generator=None, callback=None, **options) -> x at ts[-1] [B, ...]

(Their table, with the multistep flow solvers of multistep.py, is dfm.diffusion.samplers.FLOW_SAMPLERS; run one by
name with samplers.sample_flow.)

- ``velocity(x [B, ...], t [B]) -> v [B, ...]`` on the path x_t = (1 - t) x0 + t eps with v = eps - x0
  (rectified flow, SD3, Wan); t is float32 at least.
- ``ts`` is 1-D, descending from <= 1 to (normally) 0; with ts[0] == 1 the initial x is pure noise.
- Runge-Kutta schemes are not invariant under the change of variables to EDM's sigma = s / (1 - s), so these
  integrate in s, as diffusers' FlowMatch* schedulers and Wan do; EDM-space solvers are in ``samplers``.
  (First-order methods do agree: Euler in s is Euler in sigma on the matching grid, and DDIM with eta = 0.)
- ``callback`` gets, once per step after it is taken, ``{'x', 'i', 't', 't_next', 'denoised', 'nfe'}``:
  x and t before the step, the x0 estimate x - t v from the step's first evaluation, and the number of
  velocity evaluations so far (this step included) -- the way to read the cost of the adaptive `dopri5`.
- Precision: the grid arithmetic is float64 Python numbers; the state is float32 at least; the model sees x in
  the caller's dtype and t in float32 at least; the result comes back in the caller's dtype.

An EDM denoiser runs here as ``paths.velocity_from_denoiser(D)``. `euler`, `heun` and `midpoint` never evaluate
the velocity at s = 0; `rk4` and `dopri5` do (once per run / per step), which a velocity network handles but
needs an adapter that is finite at s = 0.
"""

from __future__ import annotations

import torch

from .paths import Velocity, flow_x0
from .sampler_api import grid_floats, working_dtype

Tensor = torch.Tensor


def _flow_grid(ts: Tensor) -> list[float]:
    t = grid_floats(ts, "ts")
    if t[0] > 1:
        raise ValueError(f"flow time ts must lie in [0, 1], got ts[0] = {t[0]}")
    return t


class _Counted:
    """v(x, t: float) on the working state, counting evaluations (the model sees x in `dtype`, t [B] fp32+)."""

    def __init__(self, velocity: Velocity, dtype: torch.dtype):
        self.velocity, self.dtype, self.nfe = velocity, dtype, 0

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        self.nfe += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])  # [B], fp32 at least
        return self.velocity(x.to(self.dtype), t).to(x.dtype)


def _callback(callback, v: _Counted, x, i, t, t_next, velocity):
    if callback is not None:
        callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": flow_x0(x, t, velocity), "nfe": v.nfe})


def sample_flow_euler(velocity, x, ts, *, generator=None, callback=None):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): diffusers' FlowMatchEulerDiscreteScheduler."""
    dtype, t = x.dtype, _flow_grid(ts)
    x, v = x.to(working_dtype(dtype)), _Counted(velocity, dtype)
    for i in range(len(t) - 1):
        v1 = v(x, t[i])
        x_next = x + (t[i + 1] - t[i]) * v1
        _callback(callback, v, x, i, t[i], t[i + 1], v1)
        x = x_next
    return x.to(dtype)


def sample_flow_heun(velocity, x, ts, *, generator=None, callback=None):
    """Heun's method (explicit trapezoid) in s; Euler on the last step to 0: FlowMatchHeunDiscreteScheduler."""
    dtype, t = x.dtype, _flow_grid(ts)
    x, v = x.to(working_dtype(dtype)), _Counted(velocity, dtype)
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        v1 = v(x, t[i])
        x_next = x + h * v1  # Euler predictor
        if t[i + 1] > 0:  # trapezoid corrector at (x_next, t_next)
            x_next = x + h * (0.5 * v1 + 0.5 * v(x_next, t[i + 1]))
        _callback(callback, v, x, i, t[i], t[i + 1], v1)
        x = x_next
    return x.to(dtype)


def sample_flow_midpoint(velocity, x, ts, *, generator=None, callback=None):
    """The explicit midpoint rule: x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2); second order."""
    dtype, t = x.dtype, _flow_grid(ts)
    x, v = x.to(working_dtype(dtype)), _Counted(velocity, dtype)
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        v1 = v(x, t[i])
        x_next = x + h * v(x + 0.5 * h * v1, t[i] + 0.5 * h)
        _callback(callback, v, x, i, t[i], t[i + 1], v1)
        x = x_next
    return x.to(dtype)


def sample_flow_rk4(velocity, x, ts, *, generator=None, callback=None):
    """Classical fourth-order Runge-Kutta in s (evaluates v at t_{i+1}, s = 0 included)."""
    dtype, t = x.dtype, _flow_grid(ts)
    x, v = x.to(working_dtype(dtype)), _Counted(velocity, dtype)
    for i in range(len(t) - 1):
        h, t_mid = t[i + 1] - t[i], t[i] + 0.5 * (t[i + 1] - t[i])
        k1 = v(x, t[i])
        k2 = v(x + 0.5 * h * k1, t_mid)
        k3 = v(x + 0.5 * h * k2, t_mid)
        k4 = v(x + h * k3, t[i + 1])
        x_next = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        _callback(callback, v, x, i, t[i], t[i + 1], k1)
        x = x_next
    return x.to(dtype)


def sample_flow_dopri5(velocity, x, ts, *, generator=None, callback=None, rtol=1e-5, atol=1e-5):
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) between consecutive points of `ts`, to tolerance rtol/atol.

    `ts` only says where to report (one callback per interval); the solver picks its own steps, so `ts` = [1, 0]
    is the usual grid. The number of velocity evaluations is the callback's 'nfe'.
    """
    from torchdiffeq import odeint

    dtype, t = x.dtype, _flow_grid(ts)
    x, v = x.to(working_dtype(dtype)), _Counted(velocity, dtype)
    for i in range(len(t) - 1):
        first: list[Tensor] = []  # the interval's first evaluation, at (x_i, t_i), for the callback's x0 estimate

        def f(s: Tensor, y: Tensor) -> Tensor:
            out = v(y, s)
            if not first:
                first.append(out)
            return out

        span = torch.tensor([t[i], t[i + 1]], dtype=x.dtype, device=x.device)
        x_next = odeint(f, x, span, rtol=rtol, atol=atol, method="dopri5")[-1]
        _callback(callback, v, x, i, t[i], t[i + 1], first[0])
        x = x_next
    return x.to(dtype)
