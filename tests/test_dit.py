import dataclasses

import pytest
import torch

from dfm.models import DIT_CONFIGS, DiT

CTX = 10


def tiny(**kw):
    return dataclasses.replace(DIT_CONFIGS["tiny"], in_channels=3, context_dim=CTX, **kw)


def randomize(net, seed=0):
    """Perturb every parameter (including the zero-initialised ones) so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def batch(B=2, F=4, H=6, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, F, H, W, generator=g)
    context = torch.randn(B, 5, CTX, generator=g)
    mask = torch.tensor([[True, True, False, False, False]] + [[True] * 5] * (B - 1))
    return x, torch.randn(B, generator=g), context, mask


@pytest.mark.parametrize("attention", ["full", "factorized", "causal"])
@pytest.mark.parametrize("position", ["rope", "sincos"])
def test_shapes_for_all_patterns(attention, position):
    net = randomize(DiT(tiny(attention=attention, position=position, out_channels=6, pooled_text=True,
                             fps_embedding=True, adaln_lora_rank=4 if position == "rope" else None)))
    x, c_noise, context, mask = batch()
    out = net(x, c_noise, context=context, context_mask=mask, fps=torch.tensor([8.0, 24.0]))
    assert out.shape == (2, 6, 4, 6, 8) and torch.isfinite(out).all()
    assert net(x, c_noise).shape == out.shape  # no text: cross-attention is skipped


def test_registry_sizes_follow_dit():
    for name, (dim, depth, heads) in {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
                                      "XL": (1152, 28, 16)}.items():
        cfg = DIT_CONFIGS[name]
        assert (cfg.dim, cfg.depth, cfg.heads) == (dim, depth, heads)
    with torch.device("meta"):
        n = sum(p.numel() for p in DiT(dataclasses.replace(DIT_CONFIGS["XL"], in_channels=4)).parameters())
    assert abs(n / 1e6 - 675) < 5  # DiT-XL/2 has 675M parameters
    with pytest.raises(ValueError, match="attention"):
        tiny(attention="sparse")


@pytest.mark.parametrize("lora", [None, 4])
def test_adaln_zero_blocks_start_as_identity(lora):
    cfg = tiny(adaln_lora_rank=lora)
    net = DiT(cfg)  # DiT's init zeroes the block's adaLN and cross-attention output
    block = net.blocks[0]
    x = torch.randn(2, 12, cfg.dim)
    c = torch.randn(2, cfg.dim)
    out = block(x, c, (1, 3, 4), None, torch.randn(2, 5, CTX), None, None)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    x5, c_noise, context, mask = batch()
    assert net(x5, c_noise, context=context).abs().max() == 0  # zero final layer


@pytest.mark.parametrize("position", ["rope", "sincos"])
def test_causal_dit_ignores_future_frames(position):
    net = randomize(DiT(tiny(attention="causal", position=position)))
    x, c_noise, context, mask = batch()
    x2 = x.clone()
    x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])  # change frames 2, 3
    out, out2 = net(x, c_noise, context, mask), net(x2, c_noise, context, mask)
    torch.testing.assert_close(out[:, :, :2], out2[:, :, :2])
    assert (out[:, :, 2:] - out2[:, :, 2:]).abs().max() > 1e-3


def test_padding_mask_hides_padded_tokens():
    net = randomize(DiT(tiny(pooled_text=True)))
    x, c_noise, context, mask = batch()
    junk = context.clone()
    junk[0, 2:] = 100.0  # padded positions of sample 0
    torch.testing.assert_close(net(x, c_noise, context, mask), net(x, c_noise, junk, mask))


def test_runs_under_edm_preconditioning_and_overfits_a_batch():
    from dfm.diffusion.edm import EDMPrecond

    torch.manual_seed(0)
    net = DiT(tiny(attention="factorized", pooled_text=True))
    denoiser = EDMPrecond(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=g) * 0.5
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.3, 2.0])
    context, mask = torch.randn(2, 5, CTX, generator=g), torch.ones(2, 5, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        d = denoiser(x0 + sigma[:, None, None, None, None] * noise, sigma, context=context, context_mask=mask)
        loss = (d - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def assert_checkpointing_changes_nothing(net, *inputs, **kwargs):
    """The same gradients with and without per-block activation checkpointing."""
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = ckpt
        net(*inputs, **kwargs).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_cast_and_checkpointing():
    torch.manual_seed(0)
    net = randomize(DiT(tiny(adaln_lora_rank=4, fps_embedding=True)))
    x, c_noise, context, mask = batch(F=2, H=4, W=4)
    assert_checkpointing_changes_nothing(net, x, c_noise, context, mask, fps=24.0)
    with torch.no_grad():
        ref = net(x, c_noise, context, mask)
        net.cast(torch.bfloat16)
        assert net.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
        assert net.blocks[0].adaln.up.weight.dtype == torch.float32 and net.t_embedder.fc1.weight.dtype == torch.float32
        out = net(x, c_noise, context, mask)
    assert out.dtype == torch.float32
    err = out - ref
    # measured (seed 0, CPU): max |err| 0.0130, RMS 0.0042 (max |ref| 3.1); bounds 2x that
    assert err.abs().max() < 0.026 and err.pow(2).mean().sqrt() < 0.0085, (err.abs().max(), err.pow(2).mean().sqrt())
    assert err.abs().max() > 0  # the bf16 weights were really used


def time_path(net, x, c_noise, context, mask, autocast=False):
    """(output, {time embedding, conditioning c and adaLN modulation of every block, final layer's adaLN})."""
    rec = {}

    def keep(name):
        return lambda m, a, out: rec.__setitem__(name, out)

    hooks = [net.t_embedder.register_forward_hook(keep("temb")), net.final.adaln.register_forward_hook(keep("final"))]
    for i, block in enumerate(net.blocks):  # block(x, c, grid, ...)
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(f"c{i}", a[1])))
        hooks.append(block.adaln.register_forward_hook(keep(f"adaln{i}")))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x, c_noise, context, mask, fps=24.0)
    finally:
        for h in hooks:
            h.remove()
    return out, rec


def test_bf16_weights_time_path_is_the_fp32_one():
    """The time path on its own: with bf16 weights the noise embedding, the conditioning vector and every adaLN
    modulation are fp32 and bit-identical to the fp32 model's, and c_noise 999 vs 999.5 (DiT's 0..999 convention;
    bf16's spacing there is 4) still gives different outputs. A c_noise rounded to the weights' dtype (planted in a
    copy) moves the time embedding by 2.8e-4 and makes 999 and 999.5 give identical outputs; the output-level check
    above cannot see it at EDM's c_noise = ln(sigma)/4 (max |err| 0.0135 with it, 0.0130 without)."""
    import copy

    torch.manual_seed(0)
    fp32 = randomize(DiT(tiny(adaln_lora_rank=4, fps_embedding=True)))
    bf16 = copy.deepcopy(fp32).cast(torch.bfloat16)
    x, c_noise, context, mask = batch(F=2, H=4, W=4)
    for t in (c_noise, torch.tensor([999.0, 0.3])):
        _, want = time_path(fp32, x, t, context, mask)
        _, got = time_path(bf16, x, t, context, mask)
        assert want.keys() == got.keys() and len(got) == 2 + 2 * len(bf16.blocks)
        for k in want:
            assert got[k].dtype == torch.float32, k
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # measured max |change| of the output from 999 to 999.5: 0.075 in fp32, 0.080 with bf16 weights; 0 with the planted bug
    changes = []
    for net in (fp32, bf16):
        a, _ = time_path(net, x, torch.tensor([999.0, 0.3]), context, mask)
        b, _ = time_path(net, x, torch.tensor([999.5, 0.3]), context, mask)
        assert torch.equal(a[1], b[1])
        changes.append((a[0] - b[0]).abs().max())
    assert changes[0] > 0.01 and changes[1] > 0.5 * changes[0], changes


def test_autocast_time_path_is_fp32():
    torch.manual_seed(0)
    net = randomize(DiT(tiny(adaln_lora_rank=4, fps_embedding=True)))
    x, c_noise, context, mask = batch(F=2, H=4, W=4)
    _, want = time_path(net, x, c_noise, context, mask)
    _, got = time_path(net, x, c_noise, context, mask, autocast=True)
    for k in want:
        assert got[k].dtype == torch.float32, (k, got[k].dtype)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
