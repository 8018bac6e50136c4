"""Sampler accuracy: error to the exact probability-flow ODE solution against NFE, dfm beside diffusers.

Two problems, each on Gaussian-mixture data whose denoiser is exact (dfm.diffusion.gmm), so the only error left is
the solver's:

- **EDM**: sigma from 80 to 0 (x_T = 80 * eps), the setting of Karras et al. 2022. diffusers' peers are its EDM
  schedulers (EDMEuler, EDMDPMSolverMultistep order 2-3) on the same Karras grid and the same x_T.
- **flow**: s from 1 to 0 (x_T = eps, pure noise), the setting of Wan 2.1 / SD3. diffusers' peers are
  FlowMatchEuler and FlowMatchHeun (shift 3), and UniPC and DPMSolverMultistep with Wan's flow sigmas (shift 3),
  each on its own grid; dfm's default flow rows use `flow_shifted` (linspace(1, 1/n, n) shifted by 3), which is
  none of those, so they are not same-grid comparisons.

Rows come in three groups. "recipe": each side on its own default grids. "logsnr": dfm's few-step grid, uniform in
log-SNR from 80 to 0.05 (schedules "logsnr" / "flow_logsnr"), and diffusers on the same grid where its public
API can express it (EDM schedulers: sigma_schedule="exponential", sigma_min=0.05; FlowMatchEuler and UniPC:
`set_timesteps(sigmas=...)` with shift 1; DPMSolverMultistep and FlowMatchHeun cannot take it). "check": dfm on a
diffusers flow scheduler's own grid (UniPC's log-SNR grid is dfm's with s = 1 lowered to 1 - 1e-6), and
diffusers' UniPC / DPMSolverMultistep with the model called at the scheduler's float sigma instead of its integer
`timesteps` entry (what its pipelines pass). The summary at 10 NFE prints the recommended-recipe ratio (dfm's
best, log-SNR grid included, against diffusers' best on its default grids), the like-for-like ratio (both on the
log-SNR grid) and the grid's share (diffusers against itself); then the same-solver/same-grid pairs with their
relative difference.

Each runs on 2-D data (a 8-component mixture, 256 samples) and on a video-shaped tensor [2, 16, 8, 16, 16].
The reference is the same ODE solved in float64 by adaptive Dormand-Prince at rtol 1e-10. The error is the RMS over
all elements of (x_0 - x_0_exact), for data of std ~0.5. A method's steps are the most whose NFE (counted model
calls) fits the budget; the table shows the NFE actually used where it differs.

    python benchmarks/samplers.py            # NFE 5, 10, 20, 35, 50 on both shapes (~80 s on 2 idle cores)
    python benchmarks/samplers.py --quick    # 2-D only, NFE 10 and 20, fewer methods (the demo)
    python benchmarks/samplers.py --nfe 10   # both shapes, all methods, one budget
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dfm.diffusion import paths, samplers, schedules
from dfm.diffusion.gmm import GaussianMixture

SIGMA_MIN, SIGMA_MAX, SHIFT = 0.002, 80.0, 3.0
# dfm's few-step grid is the registry's "logsnr" (EDM models) / "flow_logsnr" (flow models, from s = 1): uniform in
# log-SNR (DPM-Solver's recommendation, Lu et al. 2022 Sec. 3.3), i.e. `exponential`, from 80 to sigma_data / 10 =
# 0.05 rather than 0.002 (schedules.LOGSNR_SIGMA_MIN: the end point was chosen on this benchmark, 0.002, 0.01, 0.03,
# 0.06 tried). On the same grid dfm equals diffusers (the SAME_GRID pairs below print by how much).
KINDS = ("edm", "flow")
DTYPE = torch.float32  # samplers run in the precision a user runs them in; the reference is float64


@dataclass
class Problem:
    name: str
    gmm: GaussianMixture
    noise: torch.Tensor  # eps [B, ...]
    x0_exact: torch.Tensor  # float64 [B, ...]
    kind: str  # "edm" or "flow"


def make_gmm(shape, seed: int) -> GaussianMixture:
    """Means ~ N(0, 0.5^2 I), component std 0.15: data of std ~0.5, like normalised latents."""
    g = torch.Generator().manual_seed(seed)
    k = 8 if math.prod(shape) <= 16 else 4
    means = 0.5 * torch.randn(k, math.prod(shape), generator=g, dtype=torch.float64)
    return GaussianMixture(means, 0.15, torch.rand(k, generator=g, dtype=torch.float64) + 0.5, shape)


def make_problem(kind: str, shape, batch: int, seed: int) -> Problem:
    gmm = make_gmm(shape, seed)
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if kind == "edm":
        x0 = gmm.reference_solution(noise * SIGMA_MAX, SIGMA_MAX, 0.0)
    else:  # from s = 1, i.e. sigma = inf: x_edm = sigma * eps + O(1), and the ODE shrinks an O(1) offset at
        # sigma_0 to O(1 / sigma_0) at sigma ~ 1, so starting at sigma_0 = 1e8 is exact to ~1e-8
        x0 = gmm.reference_solution(noise * 1e8, 1e8, 0.0)
    return Problem(f"{kind} {list(shape)}", gmm, noise.to(DTYPE), x0, kind)


# --- running a sampler under an NFE budget -----------------------------------------------------------------------


class Counted:
    """Wraps a function and counts its calls (one model evaluation per call, whatever the batch)."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def steps_for_budget(run: Callable[[int, Callable], torch.Tensor], nfe: int, probe_x: torch.Tensor) -> tuple[int, int]:
    """The largest step count whose NFE fits `nfe`, found with a cheap counting dry run; returns (steps, nfe used)."""
    best = None
    for n in range(1, nfe + 1):
        c = Counted(lambda x, s: torch.zeros_like(x))
        run(n, c, probe_x)
        if c.calls > nfe:
            break
        best = (n, c.calls)
    return best if best is not None else (1, 0)


def dfm_edm(method: str, grid: str = "karras", **opts):
    def run(n, denoiser, x):
        sigmas = edm_grid(grid, n)
        return samplers.sample(denoiser, x * sigmas[0], sigmas, method=method, **opts)

    return run


def edm_grid(grid: str, n: int) -> torch.Tensor:
    if grid == "karras":
        return schedules.karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    if grid == "logsnr":
        return schedules.sampling_grid("logsnr", n).sigmas()
    raise ValueError(grid)


def dfm_flow(method: str, grid: str | Callable = "shift", **opts):
    """grid: "shift" (linspace(1, 1/n, n) shifted by 3: `flow_shifted`, the default grid of dfm's own flow models),
    "logsnr", or a function n -> flow times (a diffusers scheduler's own grid)."""

    def run(n, velocity, x):
        if callable(grid):
            ts = grid(n)
        elif grid == "shift":
            ts = schedules.flow_shifted(n, shift=SHIFT)
        else:  # s = 1, then the log-SNR grid's levels below sigma_max, as flow times s = sigma / (1 + sigma)
            ts = schedules.sampling_grid("flow_logsnr", n).flow_times()
        return samplers.sample_flow(velocity, x, ts, method=method, **opts)

    return run


# --- diffusers peers --------------------------------------------------------------------------------------------


def diffusers_run(make_scheduler: Callable, model_kind: str, sigmas: Callable | None = None, at_sigma: bool = False):
    """Drive a diffusers scheduler with the exact model, the way its pipelines do (scale_model_input, step).

    sigmas: n -> the n noise levels to pass to `set_timesteps(sigmas=...)` (flow schedulers that take custom
    sigmas), instead of `set_timesteps(n)`. at_sigma: call a flow model at the scheduler's own sigma (times 1000)
    instead of its `timesteps` entry, which UniPC / DPMSolverMultistep round to integers as the pipelines pass them
    (a "check" row: what dfm's parity tests compare against)."""

    def run(n, fn, x):
        sch = make_scheduler()
        if sigmas is None:
            sch.set_timesteps(n)
        else:
            sch.set_timesteps(sigmas=np.asarray(sigmas(n), dtype=np.float64))
        if model_kind == "edm":
            x = x * sch.sigmas[0]
        for i, t in enumerate(sch.timesteps):
            inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            t_model = sch.sigmas[i] * 1000 if at_sigma else t
            out = fn(inp, t_model.expand(x.shape[0]) if t_model.ndim == 0 else t_model)
            x = sch.step(out, t, x).prev_sample
        return x

    return run


def edm_eps_model(gmm_denoiser, sigma_data: float = 0.5):
    """What an EDM scheduler with prediction_type="epsilon" expects: F with D = c_skip x + c_out F, given c_in x."""

    def model(x_in, c_noise):
        sigma = torch.exp(4 * c_noise.double()).to(x_in.dtype)  # diffusers' c_noise = log(sigma) / 4
        sig = paths.append_dims(sigma, x_in.ndim)
        x = x_in * (sig**2 + sigma_data**2).sqrt()
        c_skip = sigma_data**2 / (sig**2 + sigma_data**2)
        c_out = sig * sigma_data / (sig**2 + sigma_data**2).sqrt()
        return (gmm_denoiser(x, sigma) - c_skip * x) / c_out

    return model


def flow_model(velocity):
    """A diffusers flow scheduler's model: timestep on the 0..1000 scale, velocity output."""
    return lambda x, t: velocity(x, t.to(x.dtype) / 1000)


def flow_logsnr_levels(n: int) -> np.ndarray:
    """dfm's flow log-SNR grid without its final 0: what diffusers' flow schedulers take as `sigmas`."""
    return schedules.sampling_grid("flow_logsnr", n).values[:-1].numpy()


# Row groups: "recipe" = the side's own default grids (EDM: Karras; flow: shift 3, each scheduler's own spacing);
# "logsnr" = dfm's log-SNR grid (80 -> 0.05, uniform in log-SNR), on both sides where diffusers can express it;
# "check" = dfm on a diffusers scheduler's grid, or diffusers with the model at its float sigma: same-grid checks.


def peers(kind: str, quick: bool) -> dict:
    import diffusers as d

    lo, hi = schedules.LOGSNR_SIGMA_MIN, schedules.LOGSNR_SIGMA_MAX
    if kind == "edm":
        logsnr = dict(sigma_schedule="exponential", sigma_min=lo, sigma_max=hi)  # == dfm's "logsnr" grid
        rows = {
            "diffusers EDMEuler": ("recipe", lambda: d.EDMEulerScheduler(), {}),
            "diffusers EDMDPMSolver++ 2M": ("recipe", lambda: d.EDMDPMSolverMultistepScheduler(solver_order=2), {}),
            "diffusers EDMDPMSolver++ 3M": ("recipe", lambda: d.EDMDPMSolverMultistepScheduler(solver_order=3), {}),
            "diffusers EDMEuler, log-SNR grid": ("logsnr", lambda: d.EDMEulerScheduler(**logsnr), {}),
            "diffusers EDMDPMSolver++ 2M, log-SNR grid":
                ("logsnr", lambda: d.EDMDPMSolverMultistepScheduler(solver_order=2, **logsnr), {}),
            "diffusers EDMDPMSolver++ 3M, log-SNR grid":
                ("logsnr", lambda: d.EDMDPMSolverMultistepScheduler(solver_order=3, **logsnr), {}),
        }
    else:
        flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
        unshifted = {**flow, "flow_shift": 1.0}  # custom sigmas pass through the shift unchanged
        custom = dict(sigmas=flow_logsnr_levels)
        rows = {
            "diffusers FlowMatchEuler": ("recipe", lambda: d.FlowMatchEulerDiscreteScheduler(shift=SHIFT), {}),
            "diffusers FlowMatchHeun": ("recipe", lambda: d.FlowMatchHeunDiscreteScheduler(shift=SHIFT), {}),
            "diffusers UniPC bh2 (Wan)": ("recipe", lambda: d.UniPCMultistepScheduler(solver_order=2, **flow), {}),
            "diffusers DPMSolver++ 2M (flow)":
                ("recipe", lambda: d.DPMSolverMultistepScheduler(solver_order=2, **flow), {}),
            "diffusers UniPC bh2 (Wan), model at sigma":
                ("check", lambda: d.UniPCMultistepScheduler(solver_order=2, **flow), dict(at_sigma=True)),
            "diffusers DPMSolver++ 2M (flow), model at sigma":
                ("check", lambda: d.DPMSolverMultistepScheduler(solver_order=2, **flow), dict(at_sigma=True)),
            "diffusers FlowMatchEuler, log-SNR grid":
                ("logsnr", lambda: d.FlowMatchEulerDiscreteScheduler(shift=1.0), custom),
            "diffusers UniPC bh2 order 2, log-SNR grid":
                ("logsnr", lambda: d.UniPCMultistepScheduler(solver_order=2, **unshifted), custom),
            "diffusers UniPC bh2 order 2, log-SNR grid, model at sigma":
                ("check", lambda: d.UniPCMultistepScheduler(solver_order=2, **unshifted), {**custom, "at_sigma": True}),
        }
        if not quick:
            rows["diffusers UniPC bh2 order 3"] = ("recipe", lambda: d.UniPCMultistepScheduler(solver_order=3, **flow), {})
            rows["diffusers UniPC bh2 order 3, log-SNR grid"] = (
                "logsnr", lambda: d.UniPCMultistepScheduler(solver_order=3, **unshifted), custom)
            rows["diffusers UniPC bh2 order 3, log-SNR grid, model at sigma"] = (
                "check", lambda: d.UniPCMultistepScheduler(solver_order=3, **unshifted), {**custom, "at_sigma": True})
    return {name: (group, diffusers_run(make, kind, **opts)) for name, (group, make, opts) in rows.items()}


def scheduler_grid(make_scheduler: Callable, sigmas: Callable | None = None) -> Callable[[int], torch.Tensor]:
    """n -> a diffusers flow scheduler's grid after set_timesteps(n), or set_timesteps(sigmas=sigmas(n)) (its
    `sigmas`: flow times s, ending in 0)."""

    def grid(n):
        sch = make_scheduler()
        if sigmas is None:
            sch.set_timesteps(n)
        else:
            sch.set_timesteps(sigmas=np.asarray(sigmas(n), dtype=np.float64))
        return sch.sigmas.float()

    return grid


def ours(kind: str, quick: bool) -> dict:
    if kind == "edm":
        rows = {
            "dfm euler": ("recipe", dfm_edm("euler")),
            "dfm heun": ("recipe", dfm_edm("heun")),
            "dfm dpmpp_2m": ("recipe", dfm_edm("dpmpp_2m")),
            "dfm dpmpp_3m": ("recipe", dfm_edm("dpmpp_3m")),
            "dfm unipc bh2 order 3": ("recipe", dfm_edm("unipc", order=3, variant="bh2")),
            "dfm euler, log-SNR grid": ("logsnr", dfm_edm("euler", grid="logsnr")),
            "dfm dpmpp_2m, log-SNR grid": ("logsnr", dfm_edm("dpmpp_2m", grid="logsnr")),
            "dfm dpmpp_3m, log-SNR grid": ("logsnr", dfm_edm("dpmpp_3m", grid="logsnr")),
            "dfm unipc order 2, log-SNR grid": ("logsnr", dfm_edm("unipc", grid="logsnr", order=2)),
        }
        if not quick:
            rows.update({
                "dfm dpm_2": ("recipe", dfm_edm("dpm_2")),
                "dfm lms": ("recipe", dfm_edm("lms")),
                "dfm rk4": ("recipe", dfm_edm("rk4")),
                "dfm ddim": ("recipe", dfm_edm("ddim", eta=0.0)),
                "dfm unipc bh1 order 3": ("recipe", dfm_edm("unipc", order=3, variant="bh1")),
                "dfm dpmpp_3m taylor": ("recipe", dfm_edm("dpmpp_3m", d2="taylor")),
                "dfm dpmpp_3m taylor, log-SNR grid": ("logsnr", dfm_edm("dpmpp_3m", grid="logsnr", d2="taylor")),
                "dfm unipc order 3, log-SNR grid": ("logsnr", dfm_edm("unipc", grid="logsnr", order=3)),
            })
    else:
        import diffusers as d

        flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
        fme_grid = scheduler_grid(lambda: d.FlowMatchEulerDiscreteScheduler(shift=SHIFT))
        unipc_grid = scheduler_grid(lambda: d.UniPCMultistepScheduler(solver_order=2, **flow))
        dpm_grid = scheduler_grid(lambda: d.DPMSolverMultistepScheduler(solver_order=2, **flow))
        # UniPC's log-SNR grid: dfm's, except that diffusers lowers the first point s = 1 to 1 - 1e-6
        unipc_logsnr = scheduler_grid(lambda: d.UniPCMultistepScheduler(**{**flow, "flow_shift": 1.0}),
                                      flow_logsnr_levels)
        rows = {
            "dfm flow euler": ("recipe", dfm_flow("euler")),
            "dfm flow heun": ("recipe", dfm_flow("heun")),
            "dfm flow dpmpp_2m": ("recipe", dfm_flow("dpmpp_2m")),
            "dfm flow unipc bh2 order 3": ("recipe", dfm_flow("unipc", order=3, variant="bh2")),
            "dfm flow euler, FlowMatchEuler's grid": ("check", dfm_flow("euler", grid=fme_grid)),
            "dfm flow unipc bh2 order 2, Wan UniPC's grid": ("check", dfm_flow("unipc", grid=unipc_grid, order=2)),
            "dfm flow dpmpp_2m, DPMSolver++ (flow)'s grid": ("check", dfm_flow("dpmpp_2m", grid=dpm_grid)),
            "dfm flow euler, log-SNR grid": ("logsnr", dfm_flow("euler", grid="logsnr")),
            "dfm flow dpmpp_2m, log-SNR grid": ("logsnr", dfm_flow("dpmpp_2m", grid="logsnr")),
            "dfm flow unipc order 2, log-SNR grid": ("logsnr", dfm_flow("unipc", grid="logsnr", order=2)),
            "dfm flow unipc order 2, UniPC's log-SNR grid": ("check", dfm_flow("unipc", grid=unipc_logsnr, order=2)),
        }
        if not quick:
            rows.update({
                "dfm flow midpoint": ("recipe", dfm_flow("midpoint")),
                "dfm flow rk4": ("recipe", dfm_flow("rk4")),
                "dfm flow unipc bh2 order 2": ("recipe", dfm_flow("unipc", order=2, variant="bh2")),
                "dfm flow unipc order 3, log-SNR grid": ("logsnr", dfm_flow("unipc", grid="logsnr", order=3)),
                "dfm flow unipc order 3, UniPC's log-SNR grid":
                    ("check", dfm_flow("unipc", grid=unipc_logsnr, order=3)),
            })
    return rows


# (dfm row, diffusers row) that run the same solver on the same grid: their errors should agree
SAME_GRID = {
    "edm": [("dfm euler", "diffusers EDMEuler"), ("dfm dpmpp_2m", "diffusers EDMDPMSolver++ 2M"),
            ("dfm dpmpp_3m", "diffusers EDMDPMSolver++ 3M"),
            ("dfm euler, log-SNR grid", "diffusers EDMEuler, log-SNR grid"),
            ("dfm dpmpp_2m, log-SNR grid", "diffusers EDMDPMSolver++ 2M, log-SNR grid"),
            ("dfm dpmpp_3m, log-SNR grid", "diffusers EDMDPMSolver++ 3M, log-SNR grid")],
    "flow": [("dfm flow euler, FlowMatchEuler's grid", "diffusers FlowMatchEuler"),
             ("dfm flow unipc bh2 order 2, Wan UniPC's grid", "diffusers UniPC bh2 (Wan)"),
             ("dfm flow unipc bh2 order 2, Wan UniPC's grid", "diffusers UniPC bh2 (Wan), model at sigma"),
             ("dfm flow dpmpp_2m, DPMSolver++ (flow)'s grid", "diffusers DPMSolver++ 2M (flow)"),
             ("dfm flow dpmpp_2m, DPMSolver++ (flow)'s grid", "diffusers DPMSolver++ 2M (flow), model at sigma"),
             ("dfm flow euler, log-SNR grid", "diffusers FlowMatchEuler, log-SNR grid"),
             ("dfm flow unipc order 2, log-SNR grid", "diffusers UniPC bh2 order 2, log-SNR grid"),
             ("dfm flow unipc order 2, log-SNR grid", "diffusers UniPC bh2 order 2, log-SNR grid, model at sigma"),
             ("dfm flow unipc order 3, log-SNR grid", "diffusers UniPC bh2 order 3, log-SNR grid"),
             ("dfm flow unipc order 3, log-SNR grid", "diffusers UniPC bh2 order 3, log-SNR grid, model at sigma"),
             ("dfm flow unipc order 2, UniPC's log-SNR grid", "diffusers UniPC bh2 order 2, log-SNR grid, model at sigma"),
             ("dfm flow unipc order 3, UniPC's log-SNR grid", "diffusers UniPC bh2 order 3, log-SNR grid, model at sigma")],
}


_BUDGET: dict = {}  # (kind, row, nfe) -> (steps, nfe used): a method's call count does not depend on the data


def evaluate(problem: Problem, name: str, run: Callable, nfe: int, model_for: Callable) -> tuple[float, int]:
    key = (problem.kind, name, nfe)
    if key not in _BUDGET:
        _BUDGET[key] = steps_for_budget(lambda n, f, x: run(n, model_for(f), x), nfe, problem.noise[:1, ...].clone())
    steps, used = _BUDGET[key]
    counted = Counted(problem.gmm.denoiser)
    x0 = run(steps, model_for(counted), problem.noise.clone())
    err = (x0.double() - problem.x0_exact).pow(2).mean().sqrt().item()
    return err, counted.calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-D only, NFE 10 and 20, fewer methods (the demo)")
    ap.add_argument("--nfe", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    nfes = args.nfe or ([10, 20] if args.quick else [5, 10, 20, 35, 50])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    summary, checks = [], []
    for kind in KINDS:
        shapes = (((2,), 256),) if args.quick else (((2,), 256), ((16, 8, 16, 16), 2))
        for shape, batch in shapes:
            prob = make_problem(kind, shape, batch, seed=0)
            rows = []
            for name, (group, run) in {**ours(kind, args.quick), **peers(kind, args.quick)}.items():
                if name.startswith("diffusers"):
                    model_for = edm_eps_model if kind == "edm" else (lambda f: flow_model(paths.velocity_from_denoiser(f)))
                else:
                    model_for = (lambda f: f) if kind == "edm" else paths.velocity_from_denoiser
                cells = [evaluate(prob, name, run, n, model_for) for n in nfes]
                rows.append((name, group, cells))
            print_table(prob.name, nfes, rows)
            summary.append((prob.name, rows))
            checks.append((prob.name, same_grid(rows, SAME_GRID[kind])))
    print_summary(summary, nfes, 10)
    print("\nSame solver on the same grid, dfm beside diffusers: largest relative difference of the errors over the "
          "NFE budgets")
    for name, pairs in checks:
        for a, b, rel in pairs:
            print(f"  {name:19s} {a:46s} vs {b:58s} {rel:.1e}")
    print(f"\n({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {DTYPE})")
    return 0


def same_grid(rows, pairs):
    by_name = {name: cells for name, _, cells in rows}
    out = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            rel = max(abs(ea - eb) / eb for (ea, _), (eb, _) in zip(by_name[a], by_name[b]))
            out.append((a, b, rel))
    return out


def best(rows, j, nfe, side: str, groups: tuple[str, ...]):
    """(name, error) of the lowest error at column j among `side`'s rows in `groups` that used at most nfe calls."""
    found = None
    for name, group, cells in rows:
        if name.startswith("diffusers") == (side == "diffusers") and group in groups and cells[j][1] <= nfe:
            if found is None or cells[j][0] < found[1]:
                found = (name, cells[j][0])
    return found


def print_summary(summary, nfes, nfe):
    if nfe not in nfes:
        return
    j = nfes.index(nfe)
    print(f"\nAt {nfe} NFE, best of each side (lower is better):")
    print("  recommended recipes: dfm's best (its few-step log-SNR grid included) vs diffusers' best on its own "
          "default grids")
    print("  same log-SNR grid:   both on dfm's log-SNR grid (80 -> 0.05), where diffusers can express it")
    print("  grid alone:          diffusers on its default grids vs diffusers on the log-SNR grid")
    for name, rows in summary:
        lines = [("recommended recipes", best(rows, j, nfe, "dfm", ("recipe", "logsnr")),
                  best(rows, j, nfe, "diffusers", ("recipe",))),
                 ("same log-SNR grid", best(rows, j, nfe, "dfm", ("logsnr",)),
                  best(rows, j, nfe, "diffusers", ("logsnr",))),
                 ("grid alone", best(rows, j, nfe, "diffusers", ("logsnr",)),
                  best(rows, j, nfe, "diffusers", ("recipe",)))]
        print(f"  {name}")
        for label, a, b in lines:
            if a and b:
                print(f"    {label:20s} {a[0]} {a[1]:.2e}  vs  {b[0]} {b[1]:.2e}  -> {b[1] / a[1]:.2f}x lower error")


def print_table(title: str, nfes, rows):
    print(f"\n### {title}: RMS error to the exact PF-ODE solution (NFE budget; actual NFE in brackets if lower)\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for name, _, cells in rows:
        txt = [f"{e:.2e}" + (f" [{c}]" if c != n else "") for (e, c), n in zip(cells, nfes)]
        print(f"| {name} | " + " | ".join(txt) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
