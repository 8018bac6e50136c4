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
    net = randomize(DiT(tiny(adaln_lora_rank=4, fps_embedding=True)))
    x, c_noise, context, mask = batch(F=2, H=4, W=4)
    assert_checkpointing_changes_nothing(net, x, c_noise, context, mask, fps=24.0)
    with torch.no_grad():
        ref = net(x, c_noise, context, mask)
        net.cast(torch.bfloat16)
        assert net.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
        assert net.blocks[0].adaln.up.weight.dtype == torch.float32 and net.t_embedder.fc1.weight.dtype == torch.float32
        out = net(x, c_noise, context, mask)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()
