"""LoRA files in and out: the formats people trade, to and from dfm's `LoRA` (dfm/models/lora.py).

Read (the format is recognised from the keys):

    diffusers / PEFT   transformer.blocks.N.attn1.to_q.lora_A.weight, lora_B; rank and alpha in the safetensors
                       metadata "lora_adapter_metadata" (what WanPipeline.save_lora_weights writes) or in
                       `.alpha` tensors; with neither, alpha = rank (scale 1, as diffusers does)
    original Wan /     diffusion_model.blocks.N.self_attn.q.lora_down.weight, lora_up, .alpha (scale alpha/rank);
    ComfyUI            also lora_A / lora_B under diffusion_model.
    kohya / musubi     lora_unet_blocks_0_self_attn_q.lora_down.weight, lora_up, .alpha
    dfm (DiT)          the PEFT layout with dfm's own layer names (a DiT has no diffusers counterpart)

Write: "diffusers" (the keys and metadata WanPipeline.save_lora_weights writes) and "comfyui" (original Wan
names). Each projection is one plain adapter (A [r, in], B [out, r], alpha) named in diffusers' layout
("blocks.0.attn1.to_q"); `to_lora` puts them onto dfm's fused layers as exact slices, `projections` takes a
`LoRA` apart again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from dfm.io import save_safetensors

from .lora import LoRA, LoRAError, LoRALayer, backbone, fused_slices
from .wan import (_DFM_TO_DIFFUSERS_BLOCK, _DFM_TO_DIFFUSERS_TOP, _FUSED, _ORIGINAL_TO_DIFFUSERS_BLOCK,
                  _ORIGINAL_TO_DIFFUSERS_TOP, WanModel, _rename, _swap)

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
EXPERT_KEY = "dfm_expert"  # "high" / "low": the expert of a two-expert Wan 2.2 model dfm's export trained it for
FORMATS = ("diffusers", "comfyui")
UNDERSTOOD = ("diffusers/PEFT (transformer.blocks.N.attn1.to_q.lora_A.weight), original Wan/ComfyUI "
              "(diffusion_model.blocks.N.self_attn.q.lora_down.weight), kohya/musubi "
              "(lora_unet_blocks_0_self_attn_q.lora_down.weight)")
_PEFT = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # PEFT may name the adapter: lora_A.default.weight
_DOWN_UP = re.compile(r"^(.*)\.lora_(down|up)\.weight$")
_ALPHA = re.compile(r"^(.*)\.alpha$")
# kohya flattens module paths with "_": these names hold an underscore of their own
_KOHYA_WORDS = ("self_attn", "cross_attn", "text_embedding", "time_embedding", "time_projection")


@dataclass
class LoRAFile:
    """What a LoRA file holds: plain per-module adapters {module: (A [r, in], B [out, r], alpha or None)},
    module names in diffusers' layout for WAN (dfm's own for DiT)."""

    format: str  # "diffusers", "comfyui", "kohya", "dfm"
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]
    arch: str  # "wan", "dit" or "other"
    metadata: dict = field(default_factory=dict)  # the diffusers adapter metadata, prefix stripped
    first_key: dict = field(default_factory=dict)  # module -> the file's first key for it (for error messages)

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _, _ in self.modules.values()}

    @property
    def alphas(self) -> set[float]:
        return {al if al is not None else float(a.shape[0]) for a, _, al in self.modules.values()}


# ================================================================================================ reading


def _kohya_name(flat: str) -> str:
    """lora_unet_blocks_0_self_attn_q -> blocks.0.self_attn.q (original Wan names)."""
    flat = flat[len("lora_unet_"):]
    for i, word in enumerate(_KOHYA_WORDS):
        flat = flat.replace(word, f"\0{i}\0")
    name = flat.replace("_", ".")
    for i, word in enumerate(_KOHYA_WORDS):
        name = name.replace(f"\0{i}\0", word)
    return name


def _original_to_diffusers(module: str) -> str:
    return _rename(module + ".weight", _ORIGINAL_TO_DIFFUSERS_TOP, _ORIGINAL_TO_DIFFUSERS_BLOCK)[:-len(".weight")]


def _arch_of(modules) -> str:
    names = " ".join(modules)
    if re.search(r"blocks\.\d+\.(attn[12]\.|ffn\.net\.)", names) or "condition_embedder." in names:
        return "wan"
    if re.search(r"blocks\.\d+\.(attn\.(qkv|out)|mlp\.fc|cross_attn\.(q|kv|out)$)", names) or ".mlp.fc" in names:
        return "dit"
    return "other"


def read_lora(path: str | Path) -> LoRAFile:
    """Read a LoRA .safetensors file of any understood format, or a one-line LoRAError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise LoRAError(f"{path}: a LoRA is a .safetensors file (not found or another type); pass the file itself")
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            sd = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"could not read {path}: {e}; the file is corrupt or truncated, download it again") from None
    diffs = [k for k in sd if k.endswith((".diff", ".diff_b", ".lora_B.bias", ".lora_up.bias"))]
    if diffs:
        raise LoRAError(f"{path} holds full weight or bias differences ({diffs[0]}), which dfm does not load; use a "
                        f"LoRA of lora_A/lora_B (or lora_down/lora_up) matrices only")
    down = {}  # module -> {"A", "B", "alpha", "key"}
    fmt = None
    for key, value in sd.items():
        m = _PEFT.match(key) or _DOWN_UP.match(key) or _ALPHA.match(key)
        if m is None:
            raise LoRAError(f"{path}: key {key!r} is not a LoRA key of a format dfm reads ({UNDERSTOOD})")
        module = m.group(1)
        part = "alpha" if m.re is _ALPHA else {"A": "A", "B": "B", "down": "A", "up": "B"}[m.group(2)]
        if module.startswith("lora_unet_"):
            kind, module = "kohya", _original_to_diffusers(_kohya_name(module))
        elif module.startswith(("diffusion_model.", "model.diffusion_model.")):
            kind, module = "comfyui", _original_to_diffusers(module.split("diffusion_model.", 1)[1])
        else:
            kind = "diffusers"
            for prefix in ("base_model.model.", "transformer."):
                module = module.removeprefix(prefix)
        if part != "alpha":
            fmt = fmt or kind
        down.setdefault(module, {"key": key})[part] = value
    modules, first = {}, {}
    for module, d in down.items():
        if "A" not in d or "B" not in d:
            raise LoRAError(f"{path}: {d['key']!r} has no matching {'up/B' if 'A' in d else 'down/A'} matrix; the "
                            f"file is incomplete")
        A, B = d["A"].float(), d["B"].float()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LoRAError(f"{path}: {d['key']!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not a LoRA pair of "
                            f"one rank (convolution LoRAs are not supported)")
        alpha = float(d["alpha"].item()) if "alpha" in d else None
        modules[module], first[module] = (A, B, alpha), d["key"]
    if not modules:
        raise LoRAError(f"{path} holds no LoRA weights; formats understood: {UNDERSTOOD}")
    metadata = _adapter_metadata(meta)
    if metadata:  # PEFT: rank and alpha (and per-module patterns) from the adapter config
        for module, (A, B, alpha) in modules.items():
            if alpha is None:
                modules[module] = (A, B, _pattern_alpha(metadata, module, A.shape[0]))
    arch = _arch_of(modules)
    return LoRAFile("dfm" if fmt == "diffusers" and arch == "dit" else fmt, modules, arch, metadata, first)


def _adapter_metadata(meta: dict) -> dict:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        raise LoRAError(f"the LoRA's {METADATA_KEY} metadata is not valid JSON; the file is damaged") from None
    return {k.removeprefix("transformer."): v for k, v in d.items()}


def _pattern_alpha(meta: dict, module: str, rank: int) -> float:
    """PEFT's alpha for `module`: alpha_pattern (a key that matches the module's name end) else lora_alpha (with r
    and rank_pattern to tell what rank it was meant for, which the matrices already say)."""
    for pattern, alpha in (meta.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return float(meta.get("lora_alpha", rank))


# =============================================================================================== to dfm


def _dfm_layer(module: str) -> tuple[str, int, int]:
    """A diffusers-layout module name -> (dfm layer, slice index, number of slices)."""
    m = re.match(r"^(blocks\.\d+\.)(.*)$", module)
    if m:
        for fused, names in _FUSED.items():
            for i, n in enumerate(names):
                if m.group(2) == n[:-1]:
                    return m.group(1) + fused[:-1], i, len(names)
    name = _rename(module + ".weight", _swap(_DFM_TO_DIFFUSERS_TOP), _swap(_DFM_TO_DIFFUSERS_BLOCK))
    return name[:-len(".weight")], 0, 1


def _model_kind(net: nn.Module) -> str:
    return "wan" if isinstance(net, WanModel) else "dit"


def to_lora(net: nn.Module, lf: LoRAFile, source: str = "the LoRA") -> LoRA:
    """The `LoRA` of a read file on `net`: each projection onto its (slice of a) dfm layer, exactly. A module the
    network lacks, another architecture or another width is a one-line LoRAError."""
    net = backbone(net)
    kind = _model_kind(net)
    if lf.arch != kind:
        what = {"wan": "a Wan", "dit": "a DiT", "other": "another architecture"}[lf.arch]
        raise LoRAError(f"{source} is a LoRA for {what} model (keys like {next(iter(lf.first_key.values()))!r}); "
                        f"this model is a {type(net).__name__}")
    mods = dict(net.named_modules())
    groups: dict[str, dict[int, tuple]] = {}
    for module, adapter in lf.modules.items():
        layer, i, n = _dfm_layer(module) if kind == "wan" else (module, 0, 1)
        if not isinstance(mods.get(layer), nn.Linear):
            raise LoRAError(f"{source}: key {lf.first_key[module]!r} matches no layer of this {type(net).__name__} "
                            f"(formats understood: {UNDERSTOOD}); the LoRA was made for another model")
        groups.setdefault(layer, {})[i] = (n, *adapter)
    layers = {}
    for layer, parts in groups.items():
        lin, n = mods[layer], next(iter(parts.values()))[0]
        rank = max(A.shape[0] for _, A, _, _ in parts.values())
        out = lin.out_features // n
        for i, (_, A, B, _) in parts.items():
            if A.shape[1] != lin.in_features or B.shape[0] != out:
                raise LoRAError(f"{source}: {lf.first_key[_module_of(lf, layer, i, kind)]!r} is {A.shape[1]} -> "
                                f"{B.shape[0]} but this model's projection is {lin.in_features} -> {out}: the LoRA "
                                f"is for a model of another width")
        ll = LoRALayer(lin.in_features, lin.out_features, rank, n, init=False).to(lin.weight.device)
        ll.present = [False] * n
        for i, (_, A, B, alpha) in parts.items():
            ll.set_projection(i, A, B, alpha)
        layers[layer] = ll
    alphas, ranks = lf.alphas, lf.ranks
    return LoRA(layers, max(ranks), max(alphas), targets=sorted(layers))


def _module_of(lf: LoRAFile, layer: str, i: int, kind: str) -> str:
    for module in lf.modules:
        if (_dfm_layer(module)[:2] if kind == "wan" else (module, 0)) == (layer, i):
            return module
    raise KeyError(layer)


def load_lora_file(net: nn.Module, path: str | Path) -> LoRA:
    return to_lora(net, read_lora(path), str(path))


# ============================================================================================= from dfm


def projections(net: nn.Module, lora: LoRA) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """`lora` as plain per-projection adapters, named in diffusers' layout (WAN) or dfm's (DiT): each slice of a
    fused layer is its own projection; a whole-layer adapter on a fused WAN layer (n = 1) is split exactly into
    per-projection ones (A shared, B cut by rows)."""
    kind = _model_kind(backbone(net))
    out = {}
    for layer in lora.names():
        ll = lora.layer(layer)
        if kind == "dit":  # slices as one block-diagonal adapter of rank n*r with scale 1: exact
            B = torch.block_diag(*[ll.B[i] * ll.scales()[i] for i in range(ll.slices)])  # [out, n*r]
            out[layer] = (ll.A.detach().clone(), B.detach().clone(), float(ll.slices * ll.rank))
            continue
        n = fused_slices(layer)
        names = [_to_diffusers(layer, i, n) for i in range(n)]
        for i in range(ll.slices):
            if not ll.present[i]:
                continue
            A, B, alpha, _ = ll.projection(i)
            if ll.slices == 1 and n > 1:  # one adapter on the fused output: the same A for each projection
                for j, name in enumerate(names):
                    out[name] = (A.detach().clone(), B.detach()[j * B.shape[0] // n:(j + 1) * B.shape[0] // n].clone(),
                                 alpha)
            else:
                out[names[i]] = (A.detach().clone(), B.detach().clone(), alpha)
    return out


def _to_diffusers(layer: str, i: int, n: int) -> str:
    m = re.match(r"^(blocks\.\d+\.)(.*)$", layer)
    if n > 1 and m and m.group(2) + "." in _FUSED:
        return m.group(1) + _FUSED[m.group(2) + "."][i][:-1]
    return _rename(layer + ".weight", _DFM_TO_DIFFUSERS_TOP, _DFM_TO_DIFFUSERS_BLOCK)[:-len(".weight")]


def diffusers_metadata(proj: dict) -> dict:
    """The PEFT adapter config of plain adapters (what diffusers' LoraConfig.from_dict needs): r and lora_alpha of
    the most common rank/alpha, rank_pattern / alpha_pattern for modules that differ, the target module names."""
    ranks = [A.shape[0] for A, _, _ in proj.values()]
    alphas = [alpha for _, _, alpha in proj.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(proj)}
    rank_pattern = {m: A.shape[0] for m, (A, _, _) in proj.items() if A.shape[0] != r}
    alpha_pattern = {m: a for m, (_, _, a) in proj.items() if a != alpha}
    if rank_pattern:
        meta["rank_pattern"] = rank_pattern
    if alpha_pattern:
        meta["alpha_pattern"] = alpha_pattern
    return meta


def save_lora(net: nn.Module, lora: LoRA, path: str | Path, format: str = "diffusers",
              metadata: dict | None = None) -> Path:
    """Write `lora` as a .safetensors LoRA file in `format` ("diffusers" or "comfyui"; a DiT's LoRA is written in
    the PEFT layout with dfm's layer names), `metadata` added to the file's. Overwrites nothing: the caller checks
    `path`."""
    extra = dict(metadata or {})
    if format not in FORMATS:
        raise LoRAError(f"unknown LoRA format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    proj = projections(net, lora)
    kind = _model_kind(backbone(net))
    if format == "comfyui" and kind != "wan":
        raise LoRAError("the comfyui format holds Wan models' layer names; a DiT's LoRA is written as diffusers")
    if format == "diffusers":
        sd = {}
        for module, (A, B, _) in proj.items():
            sd[f"transformer.{module}.lora_A.weight"] = A.contiguous()
            sd[f"transformer.{module}.lora_B.weight"] = B.contiguous()
        meta = {f"transformer.{k}": v for k, v in diffusers_metadata(proj).items()}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    else:
        sd = {}
        top, block = _swap(_ORIGINAL_TO_DIFFUSERS_TOP), _swap(_ORIGINAL_TO_DIFFUSERS_BLOCK)
        for module, (A, B, alpha) in proj.items():
            name = "diffusion_model." + _rename(module + ".weight", top, block)[:-len(".weight")]
            sd[f"{name}.lora_down.weight"] = A.contiguous()
            sd[f"{name}.lora_up.weight"] = B.contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
        metadata = {"format": "pt"}
    save_safetensors(sd, str(path), metadata={**extra, **metadata})
    return path


def describe_lora(path: str | Path) -> str:
    """`dfm info FILE.safetensors`: format, rank, alpha, targets and the model a LoRA file fits."""
    lf = read_lora(path)
    lines = []
    add = lambda k, v: lines.append(f"{k:<26}{v}")  # noqa: E731
    add("path", f"{path} (LoRA file)")
    add("format", {"diffusers": "diffusers / PEFT", "comfyui": "original Wan / ComfyUI", "kohya": "kohya / musubi",
                   "dfm": "dfm (PEFT layout, dfm layer names)"}[lf.format])
    add("rank", ", ".join(str(r) for r in sorted(lf.ranks)))
    add("alpha", ", ".join(f"{a:g}" for a in sorted(lf.alphas)) +
        ("" if any(al is not None for _, _, al in lf.modules.values()) else " (none stored: alpha = rank)"))
    kinds = sorted({re.sub(r"^blocks\.\d+\.", "blocks.N.", m) for m in lf.modules})
    blocks = {int(m.split(".")[1]) for m in lf.modules if m.startswith("blocks.")}
    add("targets", ", ".join(kinds))
    add("modules", f"{len(lf.modules)} adapted, {sum(a.numel() + b.numel() for a, b, _ in lf.modules.values()):,} "
                   f"parameters")
    width = _width(lf)
    arch = {"wan": "Wan 2.1 (WanModel / diffusers WanTransformer3DModel)", "dit": "dfm DiT", "other": "unknown"}
    add("fits", f"{arch[lf.arch]}, width {width}" + (f", {max(blocks) + 1}+ blocks" if blocks else ""))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        expert = (st.metadata() or {}).get(EXPERT_KEY)
    if expert in ("high", "low"):
        add("expert", {"high": "high noise (a Wan 2.2 A14B transformer)", "low": "low noise (a Wan 2.2 A14B "
                       "transformer_2; diffusers: load_into_transformer_2=True)"}[expert])
    return "\n".join(lines)


def _width(lf: LoRAFile) -> int | None:
    for module, (A, B, _) in lf.modules.items():
        if module.endswith(("attn1.to_out.0", "attn.out", "self_attn.out")):
            return int(B.shape[0])
    return None
