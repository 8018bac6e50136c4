"""Context parallelism: one video's tokens across the ranks of a process group (sequence parallelism).

    cp = ContextParallel(group, mode="auto")      # ulysses | ring | auto (Ulysses when the degree divides the heads)
    enable_context_parallel(model, cp)            # a WanModel or a DiT (flat or hourglass); None turns it off again
    v = model(x, t, context)                      # same call, same full-size output on every rank of the group

Each rank keeps 1/N of the patch tokens through the blocks. The model's forward cuts its token sequence
[B, L, D] after patchify (`shard`: padded with zeros to a multiple of N, then rank r keeps tokens
[r*c, (r+1)*c), c = ceil(L/N)) and gathers the per-token output before unpatchify (`gather`: all-gather, padding
cut). Everything per token (norms, modulation, MLPs, cross-attention to the short text) is then local; only
self-attention needs the other ranks' tokens, in one of two ways:

- Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses"): an all-to-all turns [B, c, H, d] sequence shards into
  [B, N*c, H/N, d] head shards, attention runs on the whole sequence for H/N heads (any pattern: full, causal,
  spatial, temporal, windows; the padding is cut before and put back after), a second all-to-all goes back.
  Needs N | H. Per layer and rank it moves 4 tensors of B*L*D/N elements, 3/4*(N-1)/N of them off-rank.
- Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): K/V chunks travel around the
  ring of ranks (P2P), each rank attends its c queries to one chunk per step and merges the partial results with
  the online softmax (Milakov & Gimelshein 2018; FlashAttention): lse = logaddexp(lse, lse_j),
  out = out * exp(lse_old - lse) + out_j * exp(lse_j - lse). Any head count; "full" attention only. Padding keys
  are masked. The backward recomputes the blocks and sends dK/dV around the ring with their chunk
  (`_RingAttention`), so a rank holds one K/V chunk at a time, never the whole sequence.

Gradients: every rank of the group computes the same loss from the gathered output; the all-gather's backward
(a reduce-scatter, sum) hands each rank N times its share, so the *mean* of the ranks' parameter gradients is
the one-process gradient, which is what DDP / FSDP2 over all ranks (DP x CP) compute anyway. RoPE is applied
inside `attention` with each rank's own rows of the full table; sin-cos positions are added before `shard`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

from dfm.errors import UserError

from .layers import SelfAttention, attention
from .rope import apply_rope

MODES = ("auto", "ulysses", "ring")


class ContextParallelError(UserError, ValueError):
    """A context-parallel degree or mode that cannot work here (world size, process group, attention heads)."""


class ContextParallel:
    """The ranks of `group` share one sequence; `mode` picks how self-attention sees all of it."""

    def __init__(self, group=None, mode: str = "auto"):
        if mode not in MODES:
            raise ContextParallelError(f"context-parallel mode {mode!r} is unknown; choose one of {MODES}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ContextParallelError("context parallelism needs a process group: launch with torchrun "
                                       "(e.g. torchrun --nproc_per_node N -m dfm ...)")
        self.group = group if group is not None else dist.group.WORLD
        self.mode = mode
        self.degree = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.ranks = dist.get_process_group_ranks(self.group)  # global ranks, for P2P
        self.calls = {"ulysses": 0, "ring": 0}  # self-attention forwards of each kind (what ran, for the record)

    def __repr__(self) -> str:
        return f"ContextParallel(degree={self.degree}, rank={self.rank}, mode={self.mode!r})"

    # --------------------------------------------------------------------------------- sequence shards

    def chunk(self, length: int) -> int:
        """Tokens per rank, c = ceil(L / N)."""
        return -(-length // self.degree)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full sequence: [.., L, ..] -> [.., c, ..] along `dim` (zero padding at the end)."""
        length = x.shape[dim]
        c = self.chunk(length)
        pad = c * self.degree - length
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)  # [.., N*c, ..]
        return x.narrow(dim, self.rank * c, c)  # [.., c, ..]

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Inverse of `shard`: every rank's [.., c, ..] -> the full [.., L, ..] on every rank (differentiable)."""
        full = fc.all_gather_single_autograd(x.contiguous(), dim, self.group)  # [.., N*c, ..]
        return full.narrow(dim, 0, length)

    # ---------------------------------------------------------------------------------- self-attention

    def mode_for(self, heads: int, pattern: str = "full") -> str:
        """"ulysses" or "ring" for a layer with `heads` heads and an attention pattern, or a one-line error."""
        divides = heads % self.degree == 0
        mode = self.mode if self.mode != "auto" else ("ulysses" if divides else "ring")
        if mode == "ulysses" and not divides:
            raise ContextParallelError(f"Ulysses context parallelism needs the degree {self.degree} to divide the "
                                       f"{heads} attention heads; use mode ring (or auto), or a degree that divides "
                                       f"{heads}")
        if mode == "ring" and pattern != "full":
            why = "" if self.mode == "ring" else f" (the degree {self.degree} does not divide the {heads} heads)"
            raise ContextParallelError(f"ring attention computes full attention only, this layer uses {pattern!r}"
                                       f"{why}; use a context-parallel degree that divides {heads} (Ulysses)")
        return mode

    def attention(self, q, k, v, rope=None, pattern="full", grid=None, attn_mask=None, window=None):
        """Self-attention of this rank's tokens against the whole sequence. q, k, v [B, c, H, d] before RoPE,
        rope the FULL table [L, d/2] (or None), grid the full token grid -> [B, c, H, d]."""
        if attn_mask is not None:
            raise ContextParallelError("an explicit attention mask is not supported under context parallelism")
        length = rope.shape[0] if rope is not None else (math.prod(grid) if grid is not None else None)
        if length is None:
            raise ValueError("context-parallel attention needs the RoPE table or the token grid (the sequence length)")
        if rope is not None:
            rope = self.shard(rope, dim=0)  # [c, d/2] this rank's rotations (padding rows: 0, unused)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        mode = self.mode_for(q.shape[2], pattern)
        self.calls[mode] += 1
        if mode == "ring":
            return _RingAttention.apply(q, k, v, self, length)
        q, k, v = (self._seq_to_heads(t).narrow(1, 0, length) for t in (q, k, v))  # [B, L, H/N, d]
        out = attention(q, k, v, pattern, grid, None, window)  # [B, L, H/N, d]
        c = self.chunk(length)
        out = F.pad(out, (0, 0, 0, 0, 0, c * self.degree - length))  # [B, N*c, H/N, d]
        return self._heads_to_seq(out)  # [B, c, H, d]

    def _seq_to_heads(self, x):
        """Ulysses' first all-to-all: [B, c, H, d] on each rank -> [B, N*c, H/N, d] (head group = rank)."""
        B, c, H, d = x.shape
        N = self.degree
        x = x.reshape(B, c, N, H // N, d).permute(2, 0, 1, 3, 4).contiguous()  # [N dest, B, c, H/N, d]
        x = fc.all_to_all_single_autograd(x, None, None, self.group)  # [N source, B, c, H/N, d]
        return x.permute(1, 0, 2, 3, 4).reshape(B, N * c, H // N, d)  # [B, N*c, H/N, d]

    def _heads_to_seq(self, x):
        """The inverse all-to-all: [B, N*c, H/N, d] -> [B, c, H, d]."""
        B, Lp, h, d = x.shape
        N = self.degree
        x = x.reshape(B, N, Lp // N, h, d).transpose(0, 1).contiguous()  # [N dest, B, c, H/N, d]
        x = fc.all_to_all_single_autograd(x, None, None, self.group)  # [N source = head group, B, c, H/N, d]
        return x.permute(1, 2, 0, 3, 4).reshape(B, Lp // N, N * h, d)  # [B, c, H, d]

    # --------------------------------------------------------------------------------------- ring P2P

    def ring_start(self, *tensors: torch.Tensor):
        """Start sending each tensor to the next rank of the ring and receiving the previous rank's (one batched
        P2P); `ring_wait` of the result gives the received tensors. Compute may run in between (the overlap)."""
        nxt, prv = self.ranks[(self.rank + 1) % self.degree], self.ranks[(self.rank - 1) % self.degree]
        received = [torch.empty_like(t) for t in tensors]
        ops = [op for t, r in zip(tensors, received)
               for op in (dist.P2POp(dist.isend, t.contiguous(), nxt, self.group),
                          dist.P2POp(dist.irecv, r, prv, self.group))]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def ring_wait(pending) -> list[torch.Tensor]:
        received, works = pending
        for work in works:
            work.wait()
        return received

    def ring_shift(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """`ring_start` and wait: each tensor to the next rank, the previous rank's back."""
        return self.ring_wait(self.ring_start(*tensors))

    def key_mask(self, source: int, c: int, length: int, device) -> torch.Tensor | None:
        """[c] bool, True for the real tokens of rank `source`'s chunk; None when all are real."""
        if (source + 1) * c <= length:
            return None
        return torch.arange(source * c, (source + 1) * c, device=device) < length


def _block(q, k, v, scale, mask):
    """One (query chunk, key chunk) block in fp32: q [B, H, c, d], k/v [B, H, c, d], mask [c] or None ->
    (scores [B, H, c, c] with masked keys at -inf, lse [B, H, c])."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, c, c]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, torch.logsumexp(s, dim=-1)


def _bias(q, mask):
    """The additive key mask [B, 1, c, c] of torch's fused CPU kernels (0 or -inf), or None."""
    if mask is None:
        return None
    zero = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
    return zero.masked_fill(~mask, float("-inf")).expand(q.shape[0], 1, q.shape[2], -1).contiguous()


def _block_forward(q, k, v, scale, mask, fused=None):
    """softmax(q k^T * scale) v of one block and its log-sum-exp: ([B, H, c, d], [B, H, c]), fp32. On the CPU
    torch's fused flash-attention kernel (it returns the lse), elsewhere (or fused=False) plain matmuls."""
    if q.device.type == "cpu" if fused is None else fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                               attn_mask=_bias(q, mask), scale=scale)
        return out, lse
    s, lse = _block(q, k, v, scale, mask)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _block_backward(do, q, k, v, out, lse, scale, mask, fused=None):
    """(dq, dk, dv) of one block given the FINAL output and lse of the merged softmax (the FlashAttention backward:
    P = exp(S - lse), dS = P (dP - rowsum(dO O))), fp32; fused on the CPU, plain matmuls elsewhere (or fused=False)."""
    if q.device.type == "cpu" if fused is None else fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, False, attn_mask=_bias(q, mask), scale=scale)[:3]
    s, _ = _block(q, k, v, scale, mask)
    p = torch.exp(s - lse[..., None])  # [B, H, c, c] the final softmax's probabilities
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * out).sum(-1, keepdim=True))  # [B, H, c, c]
    dq, dk = torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, torch.matmul(p.transpose(-1, -2), do)


class _RingAttention(torch.autograd.Function):
    """Ring attention with a recomputing backward: saves q, k, v, out and lse of this rank only."""

    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, length: int):
        # q, k, v [B, c, H, d] -> [B, c, H, d]; fp32 inside (scores, softmax statistics and sums)
        N, r, c = cp.degree, cp.rank, q.shape[1]
        scale = q.shape[-1] ** -0.5
        qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, c, d]
        out = torch.zeros_like(qf)  # [B, H, c, d]
        lse = torch.full(qf.shape[:-1], float("-inf"), device=q.device)  # [B, H, c]
        kv = torch.stack([kf, vf])  # [2, B, H, c, d]: travels the ring
        for i in range(N):
            source = (r - i) % N  # the rank whose keys kv holds now
            pending = cp.ring_start(kv) if i < N - 1 else None  # the next chunk travels while this one is used
            if source * c < length:  # a chunk of padding only is skipped
                out_j, lse_j = _block_forward(qf, kv[0], kv[1], scale, cp.key_mask(source, c, length, q.device))
                lse_new = torch.logaddexp(lse, lse_j)  # online softmax merge
                out = out * torch.exp(lse - lse_new)[..., None] + out_j * torch.exp(lse_j - lse_new)[..., None]
                lse = lse_new
            if pending is not None:
                (kv,) = cp.ring_wait(pending)
        ctx.cp, ctx.length = cp, length
        ctx.save_for_backward(q, k, v, out, lse)
        return out.transpose(1, 2).to(q.dtype)  # [B, c, H, d]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp, length = ctx.cp, ctx.length
        N, r, c = cp.degree, cp.rank, q.shape[1]
        scale = q.shape[-1] ** -0.5
        qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, c, d]
        do = dout.transpose(1, 2).float()  # [B, H, c, d]
        dq = torch.zeros_like(qf)
        kv, dkv = torch.stack([kf, vf]), torch.zeros(2, *kf.shape, device=q.device)  # dkv travels with its chunk
        for i in range(N):
            source = (r - i) % N
            pending = cp.ring_start(kv) if i < N - 1 else None  # K/V move on while this block computes
            if source * c < length:
                dq_j, dk_j, dv_j = _block_backward(do, qf, kv[0], kv[1], out, lse, scale,
                                                   cp.key_mask(source, c, length, q.device))
                dq = dq + dq_j
                dkv = dkv + torch.stack([dk_j, dv_j])
            (dkv,) = cp.ring_shift(dkv)  # with its chunk; after N hops dK/dV are back at their owner
            if pending is not None:
                (kv,) = cp.ring_wait(pending)
        back = lambda t, like: t.transpose(1, 2).to(like.dtype)  # noqa: E731  [B, c, H, d]
        return back(dq, q), back(dkv[0], k), back(dkv[1], v), None, None


# ------------------------------------------------------------------------------------------- models


def enable_context_parallel(model, cp: ContextParallel | None):
    """Turn context parallelism on (a ContextParallel) or off (None), in place, for every WanModel / DiT in
    `model` (which may wrap one: a DiffusionModule, the pipeline's integer-timestep wrapper).

    Every self-attention layer gets `cp`; the mode each will use is checked now against its heads and pattern, so
    an impossible choice is one error before any work."""
    if cp is not None:
        for module in model.modules():
            for child in module.children():
                if isinstance(child, SelfAttention):
                    cp.mode_for(child.heads, getattr(module, "pattern", "full"))
    found = [m for m in model.modules() if isinstance(m, SelfAttention) or "context_parallel" in vars(m)]
    if not any("context_parallel" in vars(m) for m in found):
        raise ContextParallelError(f"{type(model).__name__} has no WanModel or DiT inside: context parallelism "
                                   "shards those backbones only")
    for m in found:
        m.context_parallel = cp
    return model


def context_parallel_group(degree: int, mesh_dim: str = "cp"):
    """The CP process group of this rank for a degree N: ranks [k*N, (k+1)*N) share a sequence (a DP x CP
    DeviceMesh, CP the inner, fastest-varying axis). Returns (mesh, group); a one-line error when it cannot be."""
    if degree < 1:
        raise ContextParallelError(f"context_parallel={degree}: give a degree >= 1")
    if not (dist.is_available() and dist.is_initialized()):
        raise ContextParallelError(f"context_parallel={degree} needs a process group: launch with torchrun "
                                   f"--nproc_per_node {degree} (or a multiple of it)")
    world = dist.get_world_size()
    if world % degree:
        raise ContextParallelError(f"context_parallel={degree} does not divide the world size {world}; use a degree "
                                   f"that divides {world} (data parallel x context parallel = world size)")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // degree, degree), mesh_dim_names=("dp", mesh_dim))
    return mesh, mesh[mesh_dim].get_group()
