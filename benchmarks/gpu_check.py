"""The CUDA path, checked in one command (issue 20): the CUDA tests, then WAN 1.3B in bf16 against diffusers, a
training step and the pipeline's seconds per video, written to one JSON and one markdown table.

    .venv/bin/python benchmarks/gpu_check.py --out outputs/gpu          # one GPU, a few minutes
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/smoke   # toy sizes on the CPU, well under a minute
    .venv/bin/python benchmarks/gpu_check.py --out outputs/gpu --sections backbone,trainer   # a rerun of some

Sections, in order (each is recorded in gpu_check.json before the next starts; a section that raises is recorded
with its error and the script goes on, then exits 1; the JSON's "ok" is False):

  cuda_tests  `pytest -m cuda` (tests/test_cuda.py and any other test marked cuda). On a GPU a skip is a failure.
  backbone    WAN 1.3B (dfm.models.WAN_CONFIGS["1.3B"]: dim 1536, 30 layers, 12 heads, ffn 8960, text_dim 4096)
              at 81x480x832 video (latents 21x60x104: Wan's VAE is 4x temporal, 8x spatial) and a 17-frame clip
              (latents 5x60x104), batch 1, 512 text tokens; dfm's WanModel against diffusers'
              WanTransformer3DModel with the same weights (dfm loads diffusers' state dict). Forward (no_grad) and
              forward+backward of a mean-square loss, bf16 weights with diffusers' own fp32 modules kept fp32 on
              its side (its `_keep_in_fp32_modules`, as `from_pretrained(torch_dtype=bf16)` does) and dfm's
              (`WanModel.cast`). Median time of a few CUDA-synchronised runs that alternate the two models, peak
              memory above the weights (torch.cuda.max_memory_allocated), TFLOP/s from the FLOP formula in
              `wan_forward_flops`, MFU against the device's bf16 dense peak (`PEAK_TFLOPS`), and the agreement of
              the outputs (relative RMS; fp32 bound 1e-4, bf16 5%) and of all gradients (twice those bounds).
              The bf16 bounds are first guesses, to be replaced by what the first GPU run measures. The 81-frame fwd+bwd runs with activation checkpointing in both models (without it the
              activations need ~150 GB); the short clip runs without.
  trainer     one optimiser step on the same 1.3B model as dfm's trainer runs it: fp32 weights under bf16
              autocast, activation checkpointing (dfm.model.set_activation_checkpointing), dfm's flow loss, grad
              clipping, AdamW (dfm.training.build_optimizer), EMA (dfm.training.EMA), on random latents of the
              81-frame clip; median step time, peak memory, TFLOP/s and MFU (model FLOPs: the recomputation of
              checkpointing is not counted, as MFU is defined).
  pipeline    dfm's pipeline (`load_pipeline` on a diffusers Wan 2.1 folder) at Wan's 480p defaults: 81 frames
              480x832, 50 UniPC steps (flow shift 3, as the released 1.3B folder), guidance 5 with Wan's negative
              prompt (cond and uncond in one batch), decoded by the VAE. The folder is built on the spot with random
              weights: the 1.3B transformer, the real Wan 2.1 VAE config (AutoencoderKLWan()'s defaults), and a
              tiny UMT5 text encoder (1 layer, d_model 4096) with a sentencepiece tokenizer trained here. The
              encoder keeps d_model = 4096 because the transformer's text_dim is 4096: a small text_dim would
              change the 1.3B model (its text embedder) and so its FLOPs; one layer because UMT5-XXL's cost (two
              512-token prompts, ~0.05 PFLOP, well under a second) is not what this measures. Seconds per video
              = one timed generation after a 2-step warm-up.

--smoke runs the same code on the CPU in fp32 (bf16 matmuls are ~500x slower there) at toy sizes: a 2-layer WAN
of width 32, clips of 9x32x48 and 5x32x48 pixels, 8 text tokens, a tiny VAE and 2 sampling steps. Its numbers
check that the script works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import flops as counted_flops  # noqa: E402  (benchmarks/models.py)
from models import peak_bytes, sync, save_wan_folder, time_alternating, tiny_t5_tokenizer  # noqa: E402

from dfm import distributed as D  # noqa: E402
from dfm.diffusion.flow import flow_loss  # noqa: E402
from dfm.model import set_activation_checkpointing  # noqa: E402
from dfm.models import WAN_CONFIGS, WanConfig, WanModel  # noqa: E402
from dfm.training import EMA, OptimConfig, build_optimizer  # noqa: E402

SECTIONS = ("cuda_tests", "backbone", "trainer", "pipeline")

# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in this order
# against torch.cuda.get_device_name(); an unknown device gets no MFU (said so in the JSON and the table)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]

SMOKE_WAN = WanConfig(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                      num_layers=2)  # 16 latent channels, as the Wan VAE gives


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(config=SMOKE_WAN, config_name="smoke (2 layers, dim 32)", text_tokens=8,
                    clips={"9x32x48": (9, 32, 48), "5x32x48": (5, 32, 48)}, checkpointing={"9x32x48": True},
                    repeats=3, trainer_steps=3, video=(5, 32, 32), steps=2, guidance=5.0)
    return dict(config=WAN_CONFIGS["1.3B"], config_name="1.3B", text_tokens=512,
                clips={"81x480x832": (81, 480, 832), "17x480x832": (17, 480, 832)},
                checkpointing={"81x480x832": True}, repeats=3, trainer_steps=3, video=(81, 480, 832), steps=50,
                guidance=5.0)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan VAE: 1 + (F - 1) / 4 latent frames, H / 8 x W / 8."""
    return 1 + (frames - 1) // 4, height // 8, width // 8


def wan_forward_flops(cfg: WanConfig, latent: tuple[int, int, int], text_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one WAN forward (a multiply-add is 2 FLOPs; norms, RoPE, softmax, activations not counted).

    L = F*H*W / (pt*ph*pw) video tokens, Lc text tokens, d = dim, f = ffn_dim, p = pt*ph*pw. Per block:
        self-attention   q, k, v, o projections          4 * 2*L*d*d
                         Q K^T and P V                   2 * 2*L*L*d      (the 4*L^2*d of attention)
        cross-attention  q, o on the video tokens        2 * 2*L*d*d
                         k, v on the text tokens         2 * 2*Lc*d*d
                         Q K^T and P V                   2 * 2*L*Lc*d
        FFN              d -> f -> d                     2 * 2*L*d*f
    Once: patch embedding 2*L*(C_in*p)*d, text embedder 2*Lc*(text_dim*d + d*d), head 2*L*d*(C_out*p), time
    embedding and projection 2*(freq*d + d*d + d*6d) per sample. That is 2 * (matmul parameters) * tokens
    plus attention's L^2 and L*Lc terms. Forward+backward = 3x this (the backward's two matmuls per forward one);
    recomputation under activation checkpointing is not counted (model FLOPs, as MFU is defined)."""
    F_, H, W = latent
    pt, ph, pw = cfg.patch_size
    p = pt * ph * pw
    L, Lc, d, f = (F_ // pt) * (H // ph) * (W // pw), text_tokens, cfg.dim, cfg.ffn_dim
    block = (8 * L * d * d + 4 * L * L * d                   # self-attention
             + 4 * L * d * d + 4 * Lc * d * d + 4 * L * Lc * d  # cross-attention
             + 4 * L * d * f)                                 # FFN
    once = (2 * L * cfg.in_channels * p * d + 2 * Lc * (cfg.text_dim * d + d * d) + 2 * L * d * cfg.out_channels * p
            + 2 * (cfg.freq_dim * d + d * d + 6 * d * d))  # the time path; the head's modulation is elementwise
    return batch * (cfg.num_layers * block + once)


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "CPU: no bf16 peak, MFU omitted"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak, f"{name}: bf16 dense peak {peak:g} TFLOP/s ({key})"
    return None, f"{name}: unknown device, MFU omitted (add its bf16 dense peak to PEAK_TFLOPS)"


# ------------------------------------------------------------------------------------------------ the record


class Record:
    """The JSON and the markdown table, rewritten after every section (partial results survive a crash)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {"meta": meta, "sections": {}, "ok": None}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _mib(v) -> str:
    return "not tracked on the CPU" if v is None else f"{v:.1f} MiB"


def markdown(data: dict) -> str:
    m, s = data["meta"], data["sections"]
    lines = [f"GPU check ({'CPU smoke sizes, not performance' if m['smoke'] else 'full sizes'}): {m['device_name']}, "
             f"torch {m['torch']}, diffusers {m['diffusers']}, {m['date']}; {m['peak_note']}", ""]
    t = s.get("cuda_tests")
    if t:
        lines += [f"CUDA tests: {'ok' if t.get('ok') else 'FAILED'}: {t.get('passed')} passed, {t.get('failed')} "
                  f"failed, {t.get('skipped')} skipped ({_fmt(t.get('seconds'), '.1f')} s)", ""]
    b = s.get("backbone")
    if b:
        lines += [f"WAN {b.get('config_name')} backbone, batch 1, {b.get('text_tokens')} text tokens, {b.get('dtype')}"
                  + ("" if b.get("ok") else f" -- FAILED: {b.get('error')}"), "",
                  "| clip (frames x H x W) | latents | model | pass | ms (median) | peak MiB | TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in b.get("rows", []):
            lines.append(f"| {r['clip']} | {r['latent']} | {r['impl']} | {r['mode']}{' (ckpt)' if r['checkpointing'] else ''} "
                         f"| {_fmt(r['ms'], '.1f')} | {_fmt(r['peak_mib'], '.1f')} | {_fmt(r['tflop_per_s'], '.3g')} "
                         f"| {_fmt(r['mfu'], '.1%')} |")
        lines.append("")
        for clip, a in b.get("agreement", {}).items():
            grads = ("" if "grad_rel" not in a else f"; gradients relative {a['grad_rel']:.3g} (bound "
                     f"{2 * a['bound']:g}): {'ok' if a['grad_ok'] else 'FAILED'}")
            lines.append(f"agreement {clip}: output max |dfm - diffusers| {a['max_abs_diff']:.3g} (max |diffusers| "
                         f"{a['max_abs_ref']:.3g}), relative RMS {a['rel_rms']:.3g} (bound {a['bound']:g}): "
                         f"{'ok' if a['ok'] else 'FAILED'}{grads}  ")
        lines.append("")
    tr = s.get("trainer")
    if tr:
        lines += [f"Trainer step ({tr.get('what')}): " + (
            f"{_fmt(tr.get('ms'), '.1f')} ms (median of {tr.get('steps')}), peak {_mib(tr.get('peak_mib'))}, "
            f"{_fmt(tr.get('tflop_per_s'), '.3g')} TFLOP/s, MFU {_fmt(tr.get('mfu'), '.1%') or 'omitted'}, "
            f"losses {tr.get('losses')}" if tr.get("ok") else f"FAILED: {tr.get('error')}"), ""]
    p = s.get("pipeline")
    if p:
        lines += [f"Pipeline ({p.get('what')}): " + (
            f"{_fmt(p.get('seconds_per_video'), '.2f')} s per video, peak {_mib(p.get('peak_mib'))}"
            if p.get("ok") else f"FAILED: {p.get('error')}"), ""]
    lines.append(f"overall: {'ok' if data.get('ok') else 'FAILED' if data.get('ok') is False else 'running'}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ sections


def run_cuda_tests(args, device) -> dict:
    """`pytest -m cuda` in a subprocess; counts from its junit XML. On a GPU, skipped tests fail the section."""
    xml = args.out / "cuda_tests.xml"
    target = args.tests or ("tests/test_cuda.py" if args.smoke else "tests")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", target,
           f"--junitxml={xml}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout)
    seconds = time.perf_counter() - t0
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "passed": passed, "failed": failed,
              "skipped": counts["skipped"], "seconds": seconds, "tail": (proc.stdout + proc.stderr)[-3000:]}
    ok = proc.returncode == 0 and counts["tests"] > 0 and failed == 0
    if device.type == "cuda" and counts["skipped"]:
        ok = False  # on a GPU nothing marked cuda may skip
    result["ok"] = ok
    if not ok:
        raise SectionError(f"pytest -m cuda: rc {proc.returncode}, {passed} passed, {failed} failed, "
                           f"{counts['skipped']} skipped", result)
    return result


class SectionError(RuntimeError):
    """A section failed after measuring something: `partial` is recorded with the error."""

    def __init__(self, msg: str, partial: dict):
        super().__init__(msg)
        self.partial = partial


def diffusers_cast(ref, dtype):
    """Cast a diffusers model as `from_pretrained(torch_dtype=dtype)` does: its `_keep_in_fp32_modules` stay fp32."""
    keep = tuple(getattr(ref, "_keep_in_fp32_modules", None) or ())
    ref.to(dtype)
    if dtype != torch.float32:
        for name, module in ref.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
    return ref


def build_pair(cfg: WanConfig, device, dtype, seed: int = 0):
    """(diffusers WanTransformer3DModel, dfm WanModel) with the same random weights, on `device` in `dtype`."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device(device):  # initialised where they run: 1.4B parameters initialise in seconds on a GPU
        ref = WanTransformer3DModel(**kwargs).eval()
        ours = WanModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())  # diffusers' layout; q/k/v fused on load
    with torch.no_grad():  # diffusers zero-initialises the output layer; a live one makes the agreement check mean something
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        w = torch.randn(ref.proj_out.weight.shape, generator=g) * 0.02
        ref.proj_out.weight.copy_(w)
        ours.proj_out.weight.copy_(w)
    diffusers_cast(ref, dtype)
    if dtype != torch.float32:
        ours.cast(dtype)
    return ref, ours


def grad_rel(ref, ours) -> float:
    """||g_dfm - g_diffusers|| / ||g_diffusers|| over all parameters (dfm's gradients in diffusers' layout)."""
    from dfm.models.wan import to_diffusers_layout

    want = {k: p.grad for k, p in ref.named_parameters()}
    got = to_diffusers_layout({k: p.grad for k, p in ours.named_parameters()})
    if want.keys() != got.keys() or any(v is None for v in (*want.values(), *got.values())):
        raise RuntimeError("the two models' gradients do not line up (missing or extra parameters)")
    num = sum(float((got[k].float() - want[k].float()).pow(2).sum()) for k in want)
    den = sum(float(want[k].float().pow(2).sum()) for k in want)
    return math.sqrt(num / den)


def run_backbone(args, device, dtype, peak) -> dict:
    S = sizes(args.smoke)
    cfg = S["config"]
    result = {"config_name": S["config_name"], "config": cfg.to_diffusers(), "text_tokens": S["text_tokens"],
              "dtype": str(dtype).replace("torch.", ""), "rows": [], "agreement": {}, "ok": False}
    ref, ours = build_pair(cfg, device, dtype)
    result["parameters"] = sum(p.numel() for p in ours.parameters())
    bound = 1e-4 if dtype == torch.float32 else 0.05  # relative RMS; the bf16 bound is a first guess (no GPU run yet)
    failures = []
    for clip, video in S["clips"].items():
        latent = latent_shape(*video)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, cfg.in_channels, *latent, generator=g).to(device, dtype)
        t = torch.tensor([700.0], device=device)
        ctx = torch.randn(1, S["text_tokens"], cfg.text_dim, generator=g).to(device, dtype)
        with torch.no_grad():
            a = ref(x, t, ctx, return_dict=False)[0].float()
            b = ours(x, t, ctx).float()
            diff = a - b
            agree = {"max_abs_diff": diff.abs().max().item(), "max_abs_ref": a.abs().max().item(),
                     "rel_rms": (diff.pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item(), "bound": bound}
            agree["ok"] = bool(math.isfinite(agree["rel_rms"]) and agree["rel_rms"] <= bound)
            del a, b, diff
        result["agreement"][clip] = agree
        if not agree["ok"]:
            failures.append(f"{clip}: dfm and diffusers disagree (relative RMS {agree['rel_rms']:.3g} > {bound})")
        ckpt = S["checkpointing"].get(clip, False)
        fwd_flops = wan_forward_flops(cfg, latent, S["text_tokens"])
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            use = ckpt and backward
            ref.enable_gradient_checkpointing() if use else ref.disable_gradient_checkpointing()
            ours.gradient_checkpointing = use

            def make(model, is_ref):
                def run():
                    out = model(x, t, ctx, return_dict=False)[0] if is_ref else model(x, t, ctx)
                    if backward:
                        out.float().square().mean().backward()
                return run

            runs = {"diffusers": make(ref, True), "dfm": make(ours, False)}
            zero = lambda k: (ref.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True))  # noqa: E731
            with torch.enable_grad() if backward else torch.no_grad():
                counted = counted_flops(runs["dfm"]) if mode == "fwd" else None
                zero(None)
                mem = {k: peak_bytes(r, device) for k, r in runs.items()}  # also the warm-up
                zero(None)
                wall, _ = time_alternating(runs, S["repeats"], device, zero)
                if backward:  # the gradients of one more pass each, compared over all parameters
                    zero(None)
                    runs["diffusers"]()
                    runs["dfm"]()
                    agree["grad_rel"] = grad_rel(ref, ours)
                    agree["grad_ok"] = bool(math.isfinite(agree["grad_rel"]) and agree["grad_rel"] <= 2 * bound)
                    if not agree["grad_ok"]:
                        failures.append(f"{clip}: dfm and diffusers gradients disagree (relative "
                                        f"{agree['grad_rel']:.3g} > {2 * bound})")
            zero(None)
            n = fwd_flops * (3 if backward else 1)
            for impl in runs:
                ms = 1e3 * statistics.median(wall[impl])
                tps = n / (ms / 1e3) / 1e12
                result["rows"].append({"clip": clip, "latent": "x".join(map(str, latent)), "impl": impl, "mode": mode,
                                       "checkpointing": ckpt and backward, "ms": ms,
                                       "ms_all": [1e3 * w for w in wall[impl]], "peak_mib": mem[impl] / 2**20,
                                       "flops": n, "tflop_per_s": tps, "mfu": tps / peak if peak else None,
                                       **({"flops_counted": counted} if counted and impl == "dfm" else {})})
            speed = statistics.median(wall["diffusers"]) / statistics.median(wall["dfm"])
            result.setdefault("speedup_diffusers_over_dfm", {})[f"{clip} {mode}"] = speed
        del x, ctx
    del ref, ours
    result["ok"] = not failures
    if failures:
        raise SectionError("; ".join(failures), result)
    return result


def run_trainer(args, device, dtype, peak) -> dict:
    """One training step as dfm's trainer takes it (dfm/training/trainer.py Trainer.train_step), on random latents."""
    S = sizes(args.smoke)
    cfg = S["config"]
    clip = next(iter(S["clips"]))
    latent = latent_shape(*S["clips"][clip])
    result = {"what": f"WAN {S['config_name']}, {clip} clip (latents {'x'.join(map(str, latent))}), batch 1, fp32 "
                      f"weights, {'bf16 autocast' if dtype != torch.float32 else 'fp32'}, activation checkpointing, "
                      "AdamW + EMA + grad clip 1.0", "ok": False}
    torch.manual_seed(0)
    with torch.device(device):
        net = WanModel(cfg)
    set_activation_checkpointing(net)
    optimizer = build_optimizer(net, OptimConfig(lr=1e-4))
    ema = EMA(net, 0.999)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, cfg.in_channels, *latent, generator=g).to(device)
    ctx = torch.randn(1, S["text_tokens"], cfg.text_dim, generator=g).to(device)
    losses, times = [], []

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_loss(net, x0, generator=D.sample_generators(0, [i], 0), timestep_scale=1000.0,
                             context=ctx).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(i)
        return loss.detach()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(1 + S["trainer_steps"]):  # the first step (optimizer state allocation, kernels) is not timed
        sync(device)
        t0 = time.perf_counter()
        loss = step(i)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    ms = 1e3 * statistics.median(times)
    n = 3 * wan_forward_flops(cfg, latent, S["text_tokens"])
    tps = n / (ms / 1e3) / 1e12
    result.update(steps=len(times), ms=ms, ms_all=[1e3 * t for t in times], losses=[round(v, 5) for v in losses],
                  flops=n, tflop_per_s=tps, mfu=tps / peak if peak else None)
    del net, optimizer, ema
    if not all(math.isfinite(v) for v in losses):
        raise SectionError(f"non-finite training loss {losses}", result)
    result["ok"] = True
    return result


PROMPT = "a cat and a dog bake a cake together in a kitchen"


def build_wan_folder(root: Path, cfg: WanConfig, smoke: bool, device) -> Path:
    """A random diffusers Wan 2.1 folder (as tests/test_wan_pipeline.py builds it, the transformer at `cfg`)."""
    import diffusers
    import transformers

    from dfm.pipeline import WAN_NEGATIVE_PROMPT

    sentences = [PROMPT, "the digit 7 moves to the left", "a red car drives along a wet street at night",
                 WAN_NEGATIVE_PROMPT]
    torch.manual_seed(0)
    tok = tiny_t5_tokenizer(root, sentences)
    # one layer, but UMT5's output width is the transformer's text_dim (4096 at 1.3B)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tok), d_model=cfg.text_dim, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    with torch.device(device):
        transformer = diffusers.WanTransformer3DModel(
            **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0, 0.02)
    transformer.to("cpu", torch.bfloat16 if not smoke else torch.float32)  # bf16 on disk: half the bytes to write
    vae = (diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]) if smoke
           else diffusers.AutoencoderKLWan()).eval()  # the defaults are Wan 2.1's VAE config
    return save_wan_folder(root, tok, text, vae, transformer)


def run_pipeline(args, device, dtype, peak) -> dict:
    from dfm.pipeline import load_pipeline

    S = sizes(args.smoke)
    frames, height, width = S["video"]
    result = {"what": f"WAN {S['config_name']} random weights, {frames} frames {height}x{width}, {S['steps']} UniPC "
                      f"steps, guidance {S['guidance']:g}, Wan's negative prompt, "
                      f"{'bf16' if dtype != torch.float32 else 'fp32'} transformer, "
                      f"{'tiny' if args.smoke else 'Wan 2.1'} VAE, 1-layer UMT5 (d_model {S['config'].text_dim})",
              "ok": False}
    with tempfile.TemporaryDirectory(prefix="gpu_check_wan_") as tmp:
        t0 = time.perf_counter()
        folder = build_wan_folder(Path(tmp), S["config"], args.smoke, device)
        pipe = load_pipeline(folder, device=device, dtype=dtype)
        result["build_and_load_seconds"] = time.perf_counter() - t0
    kw = dict(num_frames=frames, height=height, width=width, guidance_scale=S["guidance"], seed=0, progress=False)
    pipe.generate(PROMPT, steps=2, **kw)  # warm-up: kernels, allocator, the VAE's caches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = pipe.generate(PROMPT, steps=S["steps"], **kw)
    sync(device)
    seconds = time.perf_counter() - t0
    result.update(seconds_per_video=seconds, nfe=out.nfe, video_shape=list(out.videos.shape),
                  settings={k: str(v) for k, v in out.settings.items()},
                  peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)
    if not torch.isfinite(out.videos).all():
        raise SectionError("the pipeline's video is not finite", result)
    del pipe
    result["ok"] = True
    return result


RUNNERS = {"cuda_tests": lambda a, d, dt, p: run_cuda_tests(a, d), "backbone": run_backbone, "trainer": run_trainer,
           "pipeline": run_pipeline}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU in fp32 (checks the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu", help="folder for gpu_check.json/.md")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tests", default=None, help="what pytest -m cuda collects (default: tests/; smoke: tests/test_cuda.py)")
    ap.add_argument("--tests-timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # as benchmarks/models.py: threads that wait on a shared CPU swing timings 5-10x
    else:
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available; run with --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.cuda.set_device(device)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its warning on .to(bf16): diffusers_cast keeps its fp32 modules
    peak, note = peak_tflops(device)
    meta = {"smoke": args.smoke, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
            "peak_tflops_bf16": peak, "peak_note": note, "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv]) if argv is None else f"main({argv})",
            "threads": torch.get_num_threads()}
    record = Record(args.out, meta)
    failed = []
    t_start = time.perf_counter()
    for name in SECTIONS:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = RUNNERS[name](args, device, dtype, peak)
        except Exception as e:  # recorded, then the next section; the exit status says it failed
            partial = e.partial if isinstance(e, SectionError) else {}
            result = {**partial, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-4000:]}
            failed.append(name)
            print(f"gpu_check: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        result["section_seconds"] = time.perf_counter() - t0
        record.section(name, result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.data["ok"] = not failed
    record.data["meta"]["total_seconds"] = time.perf_counter() - t_start
    record.write()
    print((args.out / "gpu_check.md").read_text())
    if failed:
        print(f"gpu_check: FAILED sections: {', '.join(failed)} (details in {args.out / 'gpu_check.json'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
