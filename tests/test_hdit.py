"""The hourglass (hierarchical) DiT: shapes, size errors, window attention against masked full attention, token
merge/split, gradients at every level, equality with the flat DiT for one level, causality, EDM and flow
matching training, and the trainer building it from `model.overrides`."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from test_dit import (  # the tests folder is on sys.path
    assert_checkpointing_changes_nothing,
    randomize,
)
from test_dit import batch as dit_batch

from dfm.config import load_config
from dfm.errors import UserError
from dfm.models import DIT_CONFIGS, DiT, DiTConfig, HourglassDiT
from dfm.models.layers import (
    VideoShapeError,
    merge_tokens,
    patchify,
    split_tokens,
    window_attention,
)
from dfm.text import WordTokenizer

CTX = 10  # as in test_dit, whose helpers these tests share


def hg(**kw) -> DiTConfig:
    """A tiny hourglass: dim 32, head dim 8, two levels unless `depths` says otherwise."""
    base = dict(in_channels=3, context_dim=CTX, dim=32, heads=4, freq_dim=32, depth=2, depths=(1, 1),
                window=(2, 4, 4))
    return DiTConfig(**{**base, **kw})


def batch(B=2, F=4, H=8, W=8, seed=0):
    """test_dit's batch (x, c_noise, context, mask), 8x8 frames by default: two 2x2 merges fit."""
    return dit_batch(B, F, H, W, seed)


# ------------------------------------------------------------------------------------------------- shapes

CASES = {  # name: (config fields, input (F, H, W))
    "2 levels, patch 1x2x2, window + full": (dict(patch_size=(1, 2, 2)), (4, 16, 16)),
    "3 levels, patch 1x1x1, widths, temporal merge, factorized coarse": (
        dict(patch_size=(1, 1, 1), depths=(1, 1, 2), widths=(16, 32, 48), merge=((1, 2, 2), (2, 2, 2)),
             attention="factorized"), (4, 8, 8)),
    "2 levels, patch 2x2x2, spatial fine, linear skip, sincos": (
        dict(patch_size=(2, 2, 2), level_attention=("spatial", "full"), skip="linear", position="sincos"),
        (4, 8, 12)),
    "causal, windows of one frame": (
        dict(patch_size=(1, 2, 2), attention="causal", window=(1, 2, 2)), (3, 8, 8)),
    "one level (flat-like), adaLN-LoRA": (dict(patch_size=(1, 2, 2), depths=(2,), adaln_lora_rank=4), (2, 6, 10)),
}


@pytest.mark.parametrize("case", CASES)
def test_shapes_for_level_and_patch_combinations(case):
    fields, (F_, H, W) = CASES[case]
    net = DiT(hg(out_channels=6, pooled_text=True, fps_embedding=True, **fields))
    assert isinstance(net, HourglassDiT)
    randomize(net)
    x, c_noise, context, mask = batch(F=F_, H=H, W=W)
    out = net(x, c_noise, context=context, context_mask=mask, fps=torch.tensor([8.0, 24.0]))
    assert out.shape == (2, 6, F_, H, W) and torch.isfinite(out).all()
    assert net(x, c_noise).shape == out.shape  # no text: cross-attention is skipped


def test_config_from_lists_and_registry():
    cfg = hg(depths=[1, 1, 1], widths=[16, 32, 32], merge=[[1, 2, 2], [2, 2, 2]], window=[1, 4, 4],
             level_attention=["window", "spatial", "full"])  # as YAML/JSON give them
    assert cfg.merge == ((1, 2, 2), (2, 2, 2)) and cfg.level_merges == ((1, 2, 2), (2, 2, 2))
    assert cfg.level_heads == (2, 4, 4) and hash(cfg) == hash(dataclasses.replace(cfg))
    assert DiTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # as a model folder stores it
    assert hg(depths=(1, 1, 1)).level_attentions == ("window", "window", "full")
    assert hg(depths=(1, 1, 1)).level_merges == ((1, 2, 2), (1, 2, 2))
    assert type(DiT(DIT_CONFIGS["tiny"])) is DiT and type(DiT("hourglass-tiny")) is HourglassDiT
    with torch.device("meta"):  # the hourglass sizes match their flat namesakes' parameter counts
        for name in ("S", "B"):
            counts = [sum(p.numel() for p in DiT(dataclasses.replace(DIT_CONFIGS[n], in_channels=4)).parameters())
                      for n in (name, f"hourglass-{name}")]
            assert abs(counts[1] / counts[0] - 1) < 0.05, (name, counts)


def test_each_level_alternates_its_attention_patterns_down_and_up():
    net = DiT(hg(depths=(1, 1, 2), level_attention=("window", "factorized", "full")))
    patterns = lambda blocks: [b.pattern for b in blocks]
    assert patterns(net.down[0]) == ["window"] and patterns(net.up[0]) == ["shifted_window"]
    assert patterns(net.down[1]) == ["spatial"] and patterns(net.up[1]) == ["temporal"]
    assert patterns(net.mid) == ["full", "full"]
    assert net.down[0][0].window == (2, 4, 4) and net.mid[0].window is None
    assert [b.attn.heads for b in net.blocks] == [4, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("fields, match", [
    (dict(widths=(32,)), "one width per level"),
    (dict(widths=(32, 36)), "multiple of the head dim 8"),
    (dict(level_attention=("window", "sparse")), "level_attention 'sparse'"),
    (dict(merge=((1, 2, 2), (1, 2, 2))), "one per step"),
    (dict(skip="add"), "skip"),
    (dict(depths=(1, 0)), "at least one block"),
    (dict(attention="causal", merge=(2, 2, 2), window=(1, 4, 4)), "causal hourglass"),
    (dict(attention="causal"), "window t = 1"),  # window (2, 4, 4) would see the next frame
    (dict(level_attention=("full", "causal")), "causal hourglass"),
    (dict(depths=(), widths=(32, 64)), "set depths"),
])
def test_bad_configs_are_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        hg(**fields)


def test_odd_sizes_are_rejected_with_a_clear_error():
    net = DiT(hg(depths=(1, 1, 1), merge=((1, 2, 2), (2, 2, 2)), patch_size=(1, 2, 2)))
    x, c_noise, _, _ = batch(F=4, H=16, W=16)
    assert net(x, c_noise).shape == x.shape
    for size in [(4, 12, 16), (3, 16, 16), (4, 16, 18)]:  # not multiples of (2, 8, 8)
        with pytest.raises(VideoShapeError, match=r"multiples of \(2, 8, 8\)"):
            net(torch.zeros(1, 3, *size), c_noise[:1])
    # the merges fit but level 0's 4 x 12 x 12 tokens are not whole 2 x 8 x 8 windows
    net = DiT(hg(patch_size=(1, 1, 1), window=(2, 8, 8)))
    with pytest.raises(VideoShapeError, match=r"level 0: the token grid \(F, H, W\) = \(4, 12, 12\) is not a whole "
                                              r"number of attention windows \(2, 8, 8\)") as e:
        net(torch.zeros(1, 3, 4, 12, 12), torch.zeros(1))
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)  # one line from the CLI


# ------------------------------------------------------------------------------------------- the layers


def reference_window_mask(grid, win, shift):
    """[L, L]: tokens i, j attend iff they share a window of the grid rolled back by `shift` and were both or
    neither wrapped around the edge by that roll (computed from coordinates, not as the model does)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)  # [L, 3]
    rolled = (coords - torch.tensor(shift)) % torch.tensor(grid)  # position after the roll
    window = rolled // torch.tensor(win)  # [L, 3] window index per axis
    wrapped = coords < torch.tensor(shift)  # moved from the start to the end
    key = torch.cat([window, wrapped.long()], -1)  # [L, 6]
    return (key[:, None, :] == key[None, :, :]).all(-1)  # [L, L]


@pytest.mark.parametrize("grid, window", [((4, 8, 12), (2, 4, 4)), ((2, 6, 4), (4, 2, 8)), ((3, 4, 4), (1, 4, 2))])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_masked_full_attention(grid, window, shifted):
    g = torch.Generator().manual_seed(0)
    L = math.prod(grid)
    q, k, v = (torch.randn(2, L, 3, 8, generator=g) for _ in range(3))
    win = tuple(min(a, n) for a, n in zip(window, grid))
    shift = tuple(a // 2 if shifted and a < n else 0 for a, n in zip(win, grid))
    mask = reference_window_mask(grid, win, shift)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(window_attention(q, k, v, grid, window, shifted), ref, rtol=1e-5, atol=1e-5)
    if shifted and any(shift):  # the shift changes which tokens meet
        assert not torch.equal(mask, reference_window_mask(grid, win, (0, 0, 0)))


def test_merge_is_patchify_of_the_token_grid_and_split_inverts_it():
    g = torch.Generator().manual_seed(0)
    grid, factor = (4, 6, 8), (2, 3, 2)
    x = torch.randn(2, math.prod(grid), 5, generator=g)  # [B, L, D]
    merged = merge_tokens(x, grid, factor)
    assert merged.shape == (2, math.prod(grid) // 12, 60)
    as_video = x.transpose(1, 2).reshape(2, 5, *grid)  # [B, D, F, H, W]
    assert torch.equal(merged, patchify(as_video, factor))
    assert torch.equal(split_tokens(merged, (2, 2, 4), factor), x)
    with pytest.raises(VideoShapeError, match="merge"):
        merge_tokens(x, grid, (3, 2, 2))


# -------------------------------------------------------------------------------------------- the model


def test_gradient_reaches_every_level():
    net = randomize(DiT(hg(depths=(1, 1, 1), widths=(16, 32, 32), patch_size=(1, 1, 1), adaln_lora_rank=4,
                           pooled_text=True)))
    x, c_noise, context, mask = batch(F=2, H=8, W=8)
    x.requires_grad_(True)
    net(x, c_noise, context, mask).square().mean().backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not silent, silent
    for part in ("down.0.", "down.1.", "mid.", "up.1.", "up.0.", "merges.1.", "splits.1.", "skips.0.fac",
                 "adaln_shared.2."):
        assert any(n.startswith(part) for n, _ in net.named_parameters()), part
    assert x.grad.abs().min() > 0  # every input pixel reaches the output


def test_at_init_every_level_is_an_identity_and_the_output_zero():
    net = DiT(hg(depths=(1, 1, 1), patch_size=(1, 1, 1)))
    x, c_noise, context, mask = batch(F=2, H=8, W=8)
    assert net(x, c_noise, context, mask).abs().max() == 0  # zero final layer (adaLN-Zero)
    assert all(s.fac.item() == 0.5 for s in net.skips)


def test_one_level_hourglass_equals_the_flat_dit():
    flat = randomize(DiT(dataclasses.replace(DIT_CONFIGS["tiny"], in_channels=3, context_dim=CTX,
                                             adaln_lora_rank=4, pooled_text=True, attention="factorized")))
    one = DiT(dataclasses.replace(flat.config, depths=(2,), level_attention=("factorized",)))
    rename = {"blocks.": "mid.", "adaln_shared.": "adaln_shared.0."}
    state = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
             for k, v in flat.state_dict().items()}
    one.load_state_dict(state)
    x, c_noise, context, mask = batch(F=2, H=4, W=6)
    torch.testing.assert_close(one(x, c_noise, context, mask), flat(x, c_noise, context, mask), rtol=0, atol=0)


def test_causal_hourglass_ignores_future_frames():
    net = randomize(DiT(hg(depths=(1, 1, 1), attention="causal", window=(1, 4, 4), patch_size=(1, 1, 1))))
    x, c_noise, context, mask = batch(F=4, H=8, W=8)
    x2 = x.clone()
    x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])  # change frames 2, 3
    out, out2 = net(x, c_noise, context, mask), net(x2, c_noise, context, mask)
    torch.testing.assert_close(out[:, :, :2], out2[:, :, :2])
    assert (out[:, :, 2:] - out2[:, :, 2:]).abs().max() > 1e-3


def test_checkpointing_and_bf16_cast():
    net = randomize(DiT(hg(adaln_lora_rank=4, fps_embedding=True, skip="lerp")))
    x, c_noise, context, mask = batch(F=2, H=8, W=8)
    assert_checkpointing_changes_nothing(net, x, c_noise, context, mask, fps=24.0)
    assert len(net.blocks) == 3  # down, mid, up: what FSDP wraps and compile_blocks compiles
    with torch.no_grad():
        ref = net(x, c_noise, context, mask)
        net.cast(torch.bfloat16)
        assert net.mid[0].mlp.fc1.weight.dtype == net.merges[0].proj.weight.dtype == torch.bfloat16
        assert net.skips[0].fac.dtype == net.adaln_shared[0].proj.weight.dtype == torch.float32
        out = net(x, c_noise, context, mask)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()


def overfit(loss_fn, net, steps=40):
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfits_a_batch_under_edm_preconditioning():
    from dfm.diffusion.edm import EDMPrecond

    torch.manual_seed(0)
    net = DiT(hg(pooled_text=True, patch_size=(1, 1, 1)))
    denoiser = EDMPrecond(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 8, 8, generator=g) * 0.5
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.3, 2.0])
    context, mask = torch.randn(2, 5, CTX, generator=g), torch.ones(2, 5, dtype=torch.bool)
    x = x0 + sigma[:, None, None, None, None] * noise
    losses = overfit(lambda: (denoiser(x, sigma, context=context, context_mask=mask) - x0).square().mean(), net)
    assert losses[-1] < 0.2 * losses[0]


def test_overfits_a_batch_under_flow_matching():
    from dfm.diffusion.flow import flow_loss

    torch.manual_seed(0)
    net = DiT(hg(patch_size=(1, 2, 2), skip="linear"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 8, 8, generator=g) * 0.5
    context, mask = torch.randn(2, 5, CTX, generator=g), torch.ones(2, 5, dtype=torch.bool)
    # the same timesteps and noise every step (a fresh generator with one seed): a fixed regression target
    loss = lambda: flow_loss(net, x0, generator=torch.Generator().manual_seed(1), timestep_scale=1000.0,
                             context=context, context_mask=mask).mean()
    losses = overfit(loss, net)
    assert losses[-1] < 0.2 * losses[0]


def test_trainer_builds_the_hourglass_from_model_overrides(tmp_path):
    from dfm.model import DiffusionModule, backbone_config, build_text_encoder
    from dfm.training import TrainConfig

    cfg_file = tmp_path / "hdit.yaml"
    cfg_file.write_text("model: {arch: dit, size: hourglass-tiny}\ndiffusion: {paradigm: flow}\n"
                        "data: {num_frames: 2, size: 8}\ntext: {dim: 16, layers: 1, heads: 2}\n")
    cfg = load_config(TrainConfig, cfg_file, ["model.overrides.depths=[1,1,1]", "model.overrides.widths=[32,32,64]",
                                              "model.overrides.merge=[[1,2,2],[2,2,2]]"])
    net = DiT(backbone_config(cfg.model, 3, 16))
    assert isinstance(net, HourglassDiT) and net.config.level_merges == ((1, 2, 2), (2, 2, 2))
    module = DiffusionModule(net, build_text_encoder(cfg.text, WordTokenizer.from_captions(["a", "b"]).vocab), cfg.diffusion)
    ids, mask = module.text.tokenizer(["a", "b"], 8)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for paradigm in ("flow", "edm"):
        module.diffusion = dataclasses.replace(cfg.diffusion, paradigm=paradigm)
        loss = module("loss", torch.randn(2, 3, 2, 8, 8), ids, mask, torch.ones(2, dtype=torch.bool), gens)
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        with torch.no_grad():
            d = module("denoise", torch.randn(2, 3, 2, 8, 8), torch.tensor([0.5, 5.0]),
                       context=module("encode", ids, mask), context_mask=mask)
        assert d.shape == (2, 3, 2, 8, 8) and torch.isfinite(d).all()
