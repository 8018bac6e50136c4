"""LoRA: low-rank adapters on the linear layers of a WAN or DiT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", eq. 3):

    h = W x + (alpha / r) * B A dropout(x)          A [r, in] (Kaiming-uniform init), B [out, r] (zero init)

An adapter is held outside the network (`LoRA`, an nn.Module of `LoRALayer`s) and added to each target
`nn.Linear` by a forward hook, so the network's own state_dict (diffusers' layout for WAN) never changes, and
several adapters stack: h = W x + sum_k s_k * delta_k(x), s_k the scale each was added with.

Fused projections. dfm's WAN and DiT fuse q/k/v (and cross-attention k/v) into one Linear whose output is the
concatenation of n = 3 (or 2) projections. A `LoRALayer` on such a layer keeps one adapter per projection, on its
slice of the output: A = cat(A_1..A_n) [n*r, in], B [n, out/n, r], so that

    delta(x) = cat_i( B_i A_i x )        (= block-diagonal(B_1..B_n) @ A x)

which is exactly what the per-projection adapters of diffusers / ComfyUI compute, and exports back to them exactly
(`LoRALayer.projection(i)`). A LoRA trained on a whole fused layer (n = 1) is the same math with one slice.

Targets are fnmatch patterns over the network's module names (`net.named_modules()`); the default
`DEFAULT_TARGETS` is every attention projection and FFN layer of every block, as the ecosystem does:
WAN `blocks.N.{self_attn.qkv, self_attn.out, cross_attn.q, cross_attn.kv, cross_attn.out, ffn.fc1, ffn.fc2}`,
DiT `blocks.N.{attn.qkv, attn.out, cross_attn.*, mlp.fc1, mlp.fc2}` (the hourglass DiT's `down.L.N.`, `mid.N.`,
`up.L.N.` blocks alike). `lora.targets=['blocks.*.self_attn.*']`
picks others; `lora_target_names(net, targets)` lists what a pattern selects.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfm.errors import UserError

DEFAULT_TARGETS = ("*attn.qkv", "*attn.q", "*attn.kv", "*attn.out", "*ffn.fc1", "*ffn.fc2", "*mlp.fc1", "*mlp.fc2")
# the last name component of a fused projection -> how many projections its output concatenates
FUSED_SLICES = {"qkv": 3, "kv": 2}


class LoRAError(UserError, ValueError):
    """A LoRA that does not fit the model, or bad LoRA settings; one line naming the problem and the fix."""


def lora_target_names(net: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """The names of the nn.Linear layers of `net` that the fnmatch patterns `targets` select (in module order),
    or a LoRAError naming a pattern that selects nothing."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        targets = [targets]
    names = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    if not names:
        raise LoRAError(f"lora.targets {list(targets)} select no linear layer of this {type(net).__name__}; its "
                        f"linear layers are named like {', '.join(linears[:4])} (fnmatch patterns, e.g. "
                        f"'blocks.*.self_attn.*')")
    return names


def fused_slices(name: str) -> int:
    """How many projections the output of layer `name` concatenates (3 for qkv, 2 for kv, else 1)."""
    return FUSED_SLICES.get(name.rsplit(".", 1)[-1], 1)


class LoRALayer(nn.Module):
    """The adapter of one Linear(in, out): n slices of the output, each with its own rank r_i <= r (rows beyond
    r_i are zero, so smaller ranks are exact) and scale alpha_i / r_i.

    A [n*r, in], B [n, out/n, r]; delta(x) = cat_i(scale_i * B_i A_i dropout(x))."""

    def __init__(self, in_features: int, out_features: int, rank: int, slices: int = 1, alpha: float | None = None,
                 dropout: float = 0.0, init: bool = True):
        super().__init__()
        if out_features % slices:
            raise LoRAError(f"a layer of {out_features} outputs cannot be cut into {slices} projections")
        self.rank, self.slices = int(rank), int(slices)
        self.A = nn.Parameter(torch.zeros(slices * rank, in_features))  # [n*r, in]
        self.B = nn.Parameter(torch.zeros(slices, out_features // slices, rank))  # [n, out/n, r]
        alpha = float(rank if alpha is None else alpha)
        self.ranks = [self.rank] * slices  # the true rank of each slice (a file may give smaller ones)
        self.alphas = [alpha] * slices
        self.present = [True] * slices  # slices the adapter covers (a file may adapt q but not k, v)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init:  # PEFT's default: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero: delta = 0 at start
            for i in range(slices):
                nn.init.kaiming_uniform_(self.A.data[i * rank:(i + 1) * rank], a=math.sqrt(5))

    def scales(self) -> torch.Tensor:
        """[n] alpha_i / r_i (0 for an absent slice)."""
        return torch.tensor([a / r if p else 0.0 for a, r, p in zip(self.alphas, self.ranks, self.present)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> delta [..., out] in the adapter's dtype."""
        h = F.linear(self.dropout(x.to(self.A.dtype)), self.A)  # [..., n*r]
        h = h.unflatten(-1, (self.slices, self.rank))  # [..., n, r]
        out = torch.einsum("...nr,nor->...no", h, self.B)  # [..., n, out/n]
        out = out * self.scales().to(out)[:, None]  # scale_i per slice
        return out.flatten(-2)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        """The dense update this adapter adds to W: [out, in] = cat_i(scale_i * B_i A_i)."""
        A = self.A.unflatten(0, (self.slices, self.rank))  # [n, r, in]
        dw = torch.einsum("nor,nri->noi", self.B, A) * self.scales().to(A)[:, None, None]  # [n, out/n, in]
        return dw.flatten(0, 1)  # [out, in]

    def projection(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """Slice i as a plain adapter: (A_i [r_i, in], B_i [out/n, r_i], alpha_i, r_i)."""
        r = self.ranks[i]
        return self.A[i * self.rank:i * self.rank + r], self.B[i, :, :r], self.alphas[i], r

    def set_projection(self, i: int, A: torch.Tensor, B: torch.Tensor, alpha: float | None) -> None:
        """Load slice i from a plain adapter A [r_i, in], B [out/n, r_i] (r_i <= rank; zero-padded)."""
        r = A.shape[0]
        if r > self.rank or B.shape != (self.B.shape[1], r) or A.shape[1] != self.A.shape[1]:
            raise LoRAError(f"an adapter of A {tuple(A.shape)} and B {tuple(B.shape)} does not fit a projection "
                            f"of {self.B.shape[1]} outputs and {self.A.shape[1]} inputs: the LoRA is for a model of "
                            f"another width")
        with torch.no_grad():
            self.A[i * self.rank:(i + 1) * self.rank].zero_()
            self.B[i].zero_()
            self.A[i * self.rank:i * self.rank + r] = A
            self.B[i, :, :r] = B
        self.ranks[i], self.alphas[i], self.present[i] = r, float(r if alpha is None else alpha), True

    def extra_repr(self) -> str:
        return f"rank={self.rank}, slices={self.slices}, alphas={self.alphas}"


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


class LoRA(nn.Module):
    """One adapter: a `LoRALayer` per target layer of a network, by the layer's module name.

    `LoRA.create(net, rank, alpha, targets, dropout)` makes a fresh, trainable one (delta = 0);
    `state_dict()` keys are `layers.<name with __>.A` / `.B`; `layer(name)` gets one."""

    def __init__(self, layers: dict[str, LoRALayer], rank: int, alpha: float, targets=DEFAULT_TARGETS):
        super().__init__()
        self.layers = nn.ModuleDict({_key(n): m for n, m in layers.items()})
        self.rank, self.alpha, self.targets = int(rank), float(alpha), list(targets)

    @classmethod
    def create(cls, net: nn.Module, rank: int = 16, alpha: float | None = None, targets=DEFAULT_TARGETS,
               dropout: float = 0.0, init: bool = True) -> "LoRA":
        if not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"lora.rank must be a positive integer, got {rank!r}")
        if not 0 <= dropout < 1:
            raise LoRAError(f"lora.dropout must be in [0, 1), got {dropout!r}")
        alpha = float(rank if alpha is None else alpha)
        mods = dict(net.named_modules())
        layers = {}
        for name in lora_target_names(net, targets):
            lin = mods[name]
            layers[name] = LoRALayer(lin.in_features, lin.out_features, rank, fused_slices(name), alpha, dropout,
                                     init).to(device=lin.weight.device)
        return cls(layers, rank, alpha, targets)

    def names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.layers]

    def layer(self, name: str) -> LoRALayer:
        return self.layers[_key(name)]


# ===================================================================================== attaching to a network


def backbone(net: nn.Module) -> nn.Module:
    """The WAN / DiT inside wrappers that keep it as `.net` (the pipeline's integer-timestep wrapper) or as the
    one expert of a Wan family backbone (`.experts`: TI2V, I2V; two experts have no one backbone)."""
    while not hasattr(net, "blocks"):
        if isinstance(getattr(net, "net", None), nn.Module):
            net = net.net
        elif len(getattr(net, "experts", ())) == 1:
            net = net.experts[0]
        else:
            break
    return net


def _registry(net: nn.Module) -> dict:
    """{adapter name: {"lora", "scale", "handles", "fused"}} kept on the network outside its module tree (so
    the network's state_dict and parameters stay its own)."""
    return net.__dict__.setdefault("_dfm_lora", {})


def adapters(net: nn.Module) -> dict:
    return _registry(backbone(net))


def add_lora(net: nn.Module, lora: LoRA, name: str = "default", scale: float = 1.0) -> None:
    """Add `lora` to `net` with `scale` (a forward hook on each of its layers); adapters stack."""
    net = backbone(net)
    reg = _registry(net)
    if name in reg:
        raise LoRAError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
    if not math.isfinite(scale):
        raise LoRAError(f"LoRA scale must be a finite number, got {scale}")
    mods = dict(net.named_modules())
    missing = [n for n in lora.names() if not isinstance(mods.get(n), nn.Linear)]
    if missing:
        raise LoRAError(f"the LoRA adapts layer {missing[0]!r}, which this {type(net).__name__} does not have; "
                        f"it was made for another model")
    entry = {"lora": lora, "scale": float(scale), "handles": [], "fused": None}
    for n in lora.names():
        lin, layer = mods[n], lora.layer(n)
        if (layer.A.shape[1], layer.B.shape[0] * layer.B.shape[1]) != (lin.in_features, lin.out_features):
            raise LoRAError(f"the LoRA's layer {n} is {layer.A.shape[1]} -> {layer.B.shape[0] * layer.B.shape[1]} "
                            f"but the model's is {lin.in_features} -> {lin.out_features}: the LoRA is for a model of "
                            f"another width")
        lora_layer = layer.to(device=lin.weight.device)

        def hook(module, args, out, layer=lora_layer, entry=entry):
            if entry["fused"] is not None or entry["scale"] == 0:
                return out
            return out + (entry["scale"] * layer(args[0])).to(out.dtype)

        entry["handles"].append(lin.register_forward_hook(hook))
    reg[name] = entry


def set_scale(net: nn.Module, name: str, scale: float) -> None:
    entry = adapters(net)[name]
    if entry["fused"] is not None:
        raise LoRAError(f"adapter {name!r} is fused into the weights; unfuse it before changing its scale")
    entry["scale"] = float(scale)


def remove_lora(net: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (or all with name=None), unfusing it first if fused: the network is as before."""
    reg = adapters(net)
    for n in [name] if name is not None else list(reg):
        if n not in reg:
            raise LoRAError(f"no adapter named {n!r} is loaded (loaded: {', '.join(reg) or 'none'})")
        unfuse_lora(net, n)
        for h in reg[n]["handles"]:
            h.remove()
        del reg[n]


@torch.no_grad()
def fuse_lora(net: nn.Module, name: str | None = None) -> None:
    """Merge adapters into the weights: W <- W + s * delta_W (the hook then adds nothing). The original weights
    are kept (on their device) so that `unfuse_lora` restores them bit for bit."""
    bb = backbone(net)
    mods = dict(bb.named_modules())
    for n, entry in adapters(bb).items():
        if (name is not None and n != name) or entry["fused"] is not None:
            continue
        order = 1 + max((e["fused"][0] for e in adapters(bb).values() if e["fused"] is not None), default=0)
        kept = {}
        for layer_name in entry["lora"].names():
            w = mods[layer_name].weight
            kept[layer_name] = w.detach().clone()
            dw = entry["lora"].layer(layer_name).delta_weight().float() * entry["scale"]
            w.copy_((w.float() + dw.to(w.device)).to(w.dtype))
        entry["fused"] = (order, kept)


@torch.no_grad()
def unfuse_lora(net: nn.Module, name: str | None = None) -> None:
    """Undo `fuse_lora` exactly: the kept original weights are copied back, in reverse order of fusing (a later
    fuse kept weights that held the earlier adapters); adapters fused after `name` are then fused again."""
    bb = backbone(net)
    mods = dict(bb.named_modules())
    fused = sorted(((e["fused"][0], n) for n, e in adapters(bb).items() if e["fused"] is not None), reverse=True)
    if name is not None and name not in [n for _, n in fused]:
        return
    undone = []
    for _, n in fused:
        entry = adapters(bb)[n]
        for layer_name, w in entry["fused"][1].items():
            mods[layer_name].weight.copy_(w)
        entry["fused"] = None
        undone.append(n)
        if n == name:
            break
    for n in reversed(undone):
        if n != name and name is not None:
            fuse_lora(bb, n)


@contextmanager
def lora_disabled(net: nn.Module):
    """Run without the (unfused) adapters inside the block."""
    reg = adapters(net)
    scales = {n: e["scale"] for n, e in reg.items()}
    try:
        for e in reg.values():
            e["scale"] = 0.0
        yield
    finally:
        for n, s in scales.items():
            reg[n]["scale"] = s
