"""Plant plausible bugs one at a time in a copy of the tree and see whether the test suite catches each.

    .venv/bin/python benchmarks/mutations.py                 # every mutation, the whole suite each (stops at the
                                                              # first failing test: a caught bug costs seconds)
    .venv/bin/python benchmarks/mutations.py --only ema      # mutations whose name contains "ema"
    .venv/bin/python benchmarks/mutations.py --list

Each mutation is one exact text replacement in one file of dfm/ (it must match exactly once, so a mutation that no
longer applies is reported, not silently skipped). The copy is made with `git ls-files` into a temporary folder and
the suite runs there with `pytest -x`; the table says which test caught it (or SURVIVED) and how long it took.
Exit status 1 if any mutation survived or failed to apply.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    why: str  # the real-world bug it imitates


MUTATIONS = [
    # EMA (every shipped model is EMA weights)
    Mutation("ema_weight_swapped", "dfm/training/optim.py", "s.lerp_(p.detach(), w)", "s.lerp_(p.detach(), 1 - w)",
             "EMA interpolation weight swapped: the average follows the new weights almost entirely"),
    Mutation("ema_warmup_skipped", "dfm/training/optim.py",
             "return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay",
             "return self.decay", "EMA warm-up skipped: early EMA weights stay at the random init"),
    # precision
    Mutation("wan_timestep_bf16", "dfm/models/wan.py",
             "t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(B)  # [B]",
             "t = torch.as_tensor(t, device=x.device).to(torch.bfloat16).float().reshape(-1).expand(B)  # [B]",
             "timestep rounded to bf16 (NeMo DFM): ~8 distinct values near t = 1000"),
    # distributed gradient scale
    Mutation("ddp_world_size_dropped", "dfm/training/trainer.py",
             "scale = self.info.world_size / cfg.train.batch_size",
             "scale = 1 / cfg.train.batch_size", "loss scale without the world-size factor: gradients W x too small"),
    # samplers
    Mutation("heun_correction_at_x_hat", "dfm/diffusion/samplers.py",
             "d_next = (x - D(x, sig[i + 1])) / sig[i + 1]", "d_next = (x_hat - D(x_hat, sigma_hat)) / sigma_hat",
             "Heun correction evaluated at (x_hat, t_hat) (NeMo DFM): Euler at twice the NFE"),
    Mutation("flow_shift_inverted", "dfm/diffusion/schedules.py", "return shift * s / (1 + (shift - 1) * s)",
             "return s / (shift - (shift - 1) * s)", "timestep shift applied inverted (1/a for a)"),
    # guidance
    Mutation("cfg_from_cond", "dfm/diffusion/guidance.py", "guided = D_u + self.scale * (D_c - D_u)",
             "guided = D_c + self.scale * (D_c - D_u)", "CFG extrapolated from the conditional branch"),
    Mutation("negative_prompt_ignored", "dfm/text.py", "    if negative is not None:", "    if False:",
             "a negative prompt silently ignored"),
    # objectives
    Mutation("flow_target_flipped", "dfm/diffusion/flow.py", "u = eps - x0  # target velocity",
             "u = x0 - eps  # target velocity", "flow-matching target with the wrong sign"),
    Mutation("edm_loss_weight", "dfm/diffusion/edm.py",
             "weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2",
             "weight = torch.ones_like(sigma)", "EDM's lambda(sigma) = 1/c_out^2 dropped"),
    Mutation("flow_x0_sign", "dfm/diffusion/paths.py", "    return x_s - s * v\n", "    return x_s + s * v\n",
             "x0 = x_s + s v: the flow adapter's sign"),
    Mutation("logit_normal_mean_sign", "dfm/diffusion/flow.py",
             "s = torch.sigmoid(self.logit_mean + self.logit_std * randn(batch, generator, device))",
             "s = torch.sigmoid(-self.logit_mean + self.logit_std * randn(batch, generator, device))",
             "logit-normal timestep density with its mean negated"),
    # seeding
    Mutation("batch_shares_one_generator", "dfm/pipeline/pipeline.py",
             "generators = [torch.Generator().manual_seed(seed) for seed in seeds]",
             "generators = [torch.Generator().manual_seed(seeds[0])] * len(seeds)",
             "one generator for the batch: a video depends on the batch it sits in"),
    Mutation("caption_dropout_by_position", "dfm/training/data.py",
             "np.random.default_rng([seed, int(g), 1]).random() >= dropout) for g in samples]",
             "np.random.default_rng([seed, i, 1]).random() >= dropout) for i, g in enumerate(samples)]",
             "conditioning dropout drawn per batch position, not per sample: world-size and resume dependent"),
    # VAE normalisation
    Mutation("vae_latents_not_normalised", "dfm/vae.py",
             "    def normalize(self, z: torch.Tensor) -> torch.Tensor:\n        mean, std = self._stats(z)\n"
             "        return (z - mean) / std\n",
             "    def normalize(self, z: torch.Tensor) -> torch.Tensor:\n        mean, std = self._stats(z)\n"
             "        return z - mean\n",
             "our VAE's latents shifted but not scaled by the stored std (CausalVAE.normalize)"),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_suite(tree: Path, timeout: float) -> tuple[str, float]:
    """('caught by TEST' | 'SURVIVED' | 'TIMEOUT', seconds): pytest -x in `tree`, dfm imported from there."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "SURVIVED", seconds
    failed = [ln.split(" ", 2)[1] for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return f"caught by {failed[0] if failed else '(exit %d)' % proc.returncode}", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per suite run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:<30} {m.file:<28} {m.why}")
        return 0
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="dfm-mutants-") as tmp:
        base = Path(tmp) / "tree"
        copy_tree(base)
        for m in chosen:
            path = base / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, f"DID NOT APPLY ({original.count(m.old)} matches)", 0.0))
                bad += 1
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                verdict, seconds = run_suite(base, args.timeout)
            finally:
                path.write_text(original)
            bad += not verdict.startswith("caught")
            rows.append((m, verdict, seconds))
            print(f"{m.name}: {verdict} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print("| mutation | what it imitates | result | s |\n|---|---|---|---|")
    for m, verdict, seconds in rows:
        print(f"| `{m.name}` ({m.file}) | {m.why} | {verdict} | {seconds:.0f} |")
    print(f"\n{len(rows) - bad} of {len(rows)} caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
