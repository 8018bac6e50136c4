"""Sampler accuracy: error to the exact probability-flow ODE solution against NFE, dfm beside diffusers.

Two problems, each on Gaussian-mixture data whose denoiser is exact (dfm.diffusion.gmm), so the only error left is
the solver's:

- **EDM**: sigma from 80 to 0 (x_T = 80 * eps), the setting of Karras et al. 2022. diffusers' peers are its EDM
  schedulers (EDMEuler, EDMDPMSolverMultistep order 1-3) on the same Karras grid and the same x_T.
- **flow**: s from 1 to 0 (x_T = eps, pure noise), the setting of Wan 2.1 / SD3. diffusers' peers are
  FlowMatchEuler and FlowMatchHeun (shift 3), and UniPC and DPMSolverMultistep with Wan's flow sigmas (shift 3).

Each runs on 2-D data (a 8-component mixture, 256 samples) and on a video-shaped tensor [2, 16, 8, 16, 16].
The reference is the same ODE solved in float64 by adaptive Dormand-Prince at rtol 1e-10. The error is the RMS over
all elements of (x_0 - x_0_exact), for data of std ~0.5. A method's steps are the most whose NFE (counted model
calls) fits the budget; the table shows the NFE actually used where it differs.

    python benchmarks/samplers.py            # NFE 5, 10, 20, 35, 50 on both shapes
    python benchmarks/samplers.py --quick    # 2-D only, NFE 10 and 20, fewer methods (the demo)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dfm.diffusion import paths, samplers, schedules
from dfm.diffusion.gmm import GaussianMixture

SIGMA_MIN, SIGMA_MAX, SHIFT = 0.002, 80.0, 3.0
# dfm's few-step grid is the registry's "logsnr" (EDM models) / "flow_logsnr" (flow models, from s = 1): uniform in
# log-SNR (DPM-Solver's recommendation, Lu et al. 2022 Sec. 3.3), i.e. `exponential`, from 80 to sigma_data / 10 =
# 0.05 rather than 0.002 (schedules.LOGSNR_SIGMA_MIN: the end point was chosen on this benchmark, 0.002, 0.01, 0.03,
# 0.06 tried). On Karras grids dfm equals diffusers.
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


def dfm_flow(method: str, grid: str = "shift", **opts):
    def run(n, velocity, x):
        if grid == "shift":  # Wan's grid
            ts = schedules.flow_shifted(n, shift=SHIFT)
        else:  # s = 1, then the log-SNR grid's levels below sigma_max, as flow times s = sigma / (1 + sigma)
            ts = schedules.sampling_grid("flow_logsnr", n).flow_times()
        return samplers.sample_flow(velocity, x, ts, method=method, **opts)

    return run


# --- diffusers peers --------------------------------------------------------------------------------------------


def diffusers_run(make_scheduler: Callable, model_kind: str):
    """Drive a diffusers scheduler with the exact model, the way its pipelines do (scale_model_input, step)."""

    def run(n, fn, x):
        sch = make_scheduler()
        sch.set_timesteps(n)
        if model_kind == "edm":
            x = x * sch.sigmas[0]
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            out = fn(inp, t.expand(x.shape[0]) if t.ndim == 0 else t)
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


def peers(kind: str, quick: bool):
    import diffusers as d

    if kind == "edm":
        rows = {
            "diffusers EDMEuler": lambda: d.EDMEulerScheduler(),
            "diffusers EDMDPMSolver++ 2M": lambda: d.EDMDPMSolverMultistepScheduler(solver_order=2),
            "diffusers EDMDPMSolver++ 3M": lambda: d.EDMDPMSolverMultistepScheduler(solver_order=3),
        }
    else:
        flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
        rows = {
            "diffusers FlowMatchEuler": lambda: d.FlowMatchEulerDiscreteScheduler(shift=SHIFT),
            "diffusers FlowMatchHeun": lambda: d.FlowMatchHeunDiscreteScheduler(shift=SHIFT),
            "diffusers UniPC bh2 (Wan)": lambda: d.UniPCMultistepScheduler(solver_order=2, **flow),
            "diffusers DPMSolver++ 2M (flow)": lambda: d.DPMSolverMultistepScheduler(solver_order=2, **flow),
        }
        if not quick:
            rows["diffusers UniPC bh2 order 3"] = lambda: d.UniPCMultistepScheduler(solver_order=3, **flow)
    return {name: diffusers_run(make, kind) for name, make in rows.items()}


def ours(kind: str, quick: bool):
    if kind == "edm":
        rows = {
            "dfm euler": dfm_edm("euler"),
            "dfm heun": dfm_edm("heun"),
            "dfm dpmpp_2m": dfm_edm("dpmpp_2m"),
            "dfm dpmpp_3m": dfm_edm("dpmpp_3m"),
            "dfm unipc bh2 order 3": dfm_edm("unipc", order=3, variant="bh2"),
            "dfm dpmpp_2m, log-SNR grid": dfm_edm("dpmpp_2m", grid="logsnr"),
            "dfm unipc order 2, log-SNR grid": dfm_edm("unipc", grid="logsnr", order=2),
        }
        if not quick:
            rows.update({
                "dfm dpm_2": dfm_edm("dpm_2"),
                "dfm lms": dfm_edm("lms"),
                "dfm rk4": dfm_edm("rk4"),
                "dfm ddim": dfm_edm("ddim", eta=0.0),
                "dfm unipc bh1 order 3": dfm_edm("unipc", order=3, variant="bh1"),
                "dfm dpmpp_3m taylor": dfm_edm("dpmpp_3m", d2="taylor"),
                "dfm dpmpp_3m taylor, log-SNR grid": dfm_edm("dpmpp_3m", grid="logsnr", d2="taylor"),
                "dfm unipc order 3, log-SNR grid": dfm_edm("unipc", grid="logsnr", order=3),
            })
    else:
        rows = {
            "dfm flow euler": dfm_flow("euler"),
            "dfm flow heun": dfm_flow("heun"),
            "dfm flow dpmpp_2m": dfm_flow("dpmpp_2m"),
            "dfm flow unipc bh2 order 3": dfm_flow("unipc", order=3, variant="bh2"),
            "dfm flow dpmpp_2m, log-SNR grid": dfm_flow("dpmpp_2m", grid="logsnr"),
            "dfm flow unipc order 2, log-SNR grid": dfm_flow("unipc", grid="logsnr", order=2),
        }
        if not quick:
            rows.update({
                "dfm flow midpoint": dfm_flow("midpoint"),
                "dfm flow rk4": dfm_flow("rk4"),
                "dfm flow unipc bh2 order 2": dfm_flow("unipc", order=2, variant="bh2"),
                "dfm flow unipc order 3, log-SNR grid": dfm_flow("unipc", grid="logsnr", order=3),
            })
    return rows


def evaluate(problem: Problem, name: str, run: Callable, nfe: int, model_for: Callable) -> tuple[float, int]:
    steps, used = steps_for_budget(lambda n, f, x: run(n, model_for(f), x), nfe, problem.noise[:1, ...].clone())
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
    summary = []
    for kind in KINDS:
        shapes = (((2,), 256),) if args.quick else (((2,), 256), ((16, 8, 16, 16), 2))
        for shape, batch in shapes:
            prob = make_problem(kind, shape, batch, seed=0)
            edm_model_for = (lambda f: f) if kind == "edm" else None
            rows = []
            for name, run in {**ours(kind, args.quick), **peers(kind, args.quick)}.items():
                if name.startswith("diffusers"):
                    model_for = edm_eps_model if kind == "edm" else (lambda f: flow_model(paths.velocity_from_denoiser(f)))
                else:
                    model_for = (lambda f: f) if kind == "edm" else paths.velocity_from_denoiser
                cells = [evaluate(prob, name, run, n, model_for) for n in nfes]
                rows.append((name, cells))
            print_table(prob.name, nfes, rows)
            summary.append((prob.name, best_at(rows, nfes, 10)))
    print("\nAt 10 NFE (best of each side; lower is better):")
    for name, (ours_best, peer_best) in summary:
        if ours_best and peer_best:
            print(f"  {name:24s} {ours_best[0]} {ours_best[1]:.2e}  vs  {peer_best[0]} {peer_best[1]:.2e}"
                  f"  -> {peer_best[1] / ours_best[1]:.1f}x lower error")
    print(f"\n({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {DTYPE})")
    return 0


def best_at(rows, nfes, nfe):
    if nfe not in nfes:
        return None, None
    j = nfes.index(nfe)
    best = {}
    for name, cells in rows:
        side = "peer" if name.startswith("diffusers") else "dfm"
        if cells[j][1] <= nfe and (side not in best or cells[j][0] < best[side][1]):
            best[side] = (name, cells[j][0])
    return best.get("dfm"), best.get("peer")


def print_table(title: str, nfes, rows):
    print(f"\n### {title}: RMS error to the exact PF-ODE solution (NFE budget; actual NFE in brackets if lower)\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for name, cells in rows:
        txt = [f"{e:.2e}" + (f" [{c}]" if c != n else "") for (e, c), n in zip(cells, nfes)]
        print(f"| {name} | " + " | ".join(txt) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
