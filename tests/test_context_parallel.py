"""Context parallelism on 2 gloo processes (tests/context_parallel_worker.py under torchrun): for WAN, DiT (flat:
full / factorized / causal attention, RoPE and sin-cos) and the hourglass DiT, with Ulysses and ring attention, token
counts divisible by the degree and not (padding), and for ring attention on 4 processes too, the sharded forward's
output and the ranks' mean parameter (and input) gradients equal the one-process ones to 1e-5 of their largest
value; the impossible choices are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, nproc: int, *names: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "context_parallel_worker.py"), str(out), *([",".join(names)] if names else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("cp") / "results.json", 2)


CASES = ["wan_ulysses_even", "wan_ring_even", "wan_ulysses_odd", "wan_ring_odd", "wan_auto_odd_checkpointing",
         "wan_ring_one_token_per_rank", "wan_per_token_t_ulysses_odd", "wan_per_token_t_ring_odd", "dit_ulysses_odd", "dit_ring_even", "dit_ring_odd_sincos",
         "dit_ulysses_factorized_odd", "dit_ulysses_causal_odd", "hourglass_ulysses", "hourglass_ulysses_odd"]


@pytest.mark.parametrize("case", CASES)
def test_sharded_forward_and_gradients_equal_one_process(results, case):
    r = results[case]
    assert r["params"] > 50 and r["out_scale"] > 1 and r["grad_scale"] > 1  # every parameter got a gradient
    assert r["out"] <= 1e-5 * r["out_scale"], r
    assert r["grad"] <= 1e-5 * r["grad_scale"], r


def test_ring_of_four_equals_one_process(tmp_path):
    """4 ranks: K/V chunks take 3 hops and dK/dV 4 back to their owner; 9 tokens leave rank 3 padding only, and
    one token leaves 3 ranks with padding only."""
    cases = ["wan_ring_even", "wan_ring_odd", "dit_ring_odd_sincos", "wan_ring_one_token_per_rank"]
    results = launch(tmp_path / "results.json", 4, *cases)
    for case in cases:
        r = results[case]
        assert r["out"] <= 1e-5 * r["out_scale"] and r["grad"] <= 1e-5 * r["grad_scale"], (case, r)
    assert "does not divide the world size 4" in results["errors"]["degree"]


@pytest.mark.parametrize("case, words", [("degree", ["does not divide the world size 2"]),
                                         ("ulysses_heads", ["divide the 3 attention heads", "ring"]),
                                         ("ring_pattern", ["full attention only", "'spatial'"])])
def test_impossible_choices_are_one_line(results, case, words):
    msg = results["errors"][case]
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_without_a_process_group_is_one_line():
    from dfm.models.context_parallel import ContextParallel, ContextParallelError, context_parallel_group

    for make in (lambda: ContextParallel(), lambda: context_parallel_group(2)):
        with pytest.raises(ContextParallelError, match="torchrun") as e:
            make()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("fused", [True, False])
def test_ring_blocks_equal_autograd_attention(fused):
    """One ring block, torch's fused CPU kernels (used on the CPU) and the plain matmuls (used elsewhere), against
    autograd through softmax attention; the backward takes the final output and lse, here those of the one block."""
    import torch

    from dfm.models.context_parallel import _block_backward, _block_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))  # [B, H, c, d]
    mask = torch.tensor([True, True, True, False, False])
    s = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ v
    do = torch.randn(ref.shape, generator=g)
    ref.backward(do)
    with torch.no_grad():
        out, lse = _block_forward(q, k, v, 8**-0.5, mask, fused=fused)
        grads = _block_backward(do, q, k, v, out, lse, 8**-0.5, mask, fused=fused)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).detach(), rtol=0, atol=1e-6)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=0, atol=1e-5)
