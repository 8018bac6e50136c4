"""Step caching (dfm/models/cache.py, dfm/pipeline/caching.py): the promises of each method, counted on the real
blocks with forward hooks, on the shipped WAN and DiT folders and on a diffusers Wan 2.1 folder.

  * threshold 0 is exactly the uncached video (bit for bit), with CFG, a negative prompt and multistep samplers;
  * the first call and the last step always run the whole stack; skipped calls run no block (fbcache: one);
  * cond and uncond are one batched forward, so one decision serves both;
  * calibration: first use calibrates into the user store and says so; `dfm calibrate-cache` writes the model
    folder's cache.json and never overwrites it unasked; the stored statistics carry over to other step counts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dfm import cli
from dfm.models import DiT
from dfm.models.cache import (METHODS, ChangeCurve, FBCache, Forecast, MagCache, NormCurve, Recorder, TeaCache,
                             log_sigma)
from dfm.pipeline import load_pipeline
from dfm.pipeline.caching import (CACHE_FILE, MAGCACHE_MAX_SKIPS, CacheError, backbone, calibrate, change_curve,
                                  default_cache, user_file)

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"wan": ROOT / "models" / "wan_flow_digits", "dit": ROOT / "models" / "dit_edm_digits"}
PROMPTS = ["the digit 3 moves up", "the digit 8 moves to the left"]
HUGE = 1e9  # a threshold that would skip every call it may


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    """The user calibration store of these tests (never the real ~/.cache)."""
    path = tmp_path_factory.mktemp("dfm_cache_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFM_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    return {name: load_pipeline(path) for name, path in MODELS.items()}


class BlockCounter:
    """Forward hooks on every block of a backbone: calls per block, and the batch size the first block saw."""

    def __init__(self, net):
        self.calls = [0] * len(net.blocks)
        self.batches = []
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(net.blocks)]

    def _hook(self, i):
        def hook(module, args, out):
            self.calls[i] += 1
            if i == 0:
                self.batches.append(args[0].shape[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def run(pipe, **kw):
    kw = {"seeds": [0, 1], "progress": False, **kw}
    return pipe.generate(kw.pop("prompts", PROMPTS), **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,sampler", [("wan", "flow:euler"), ("wan", "flow:unipc"), ("dit", "edm:dpmpp_2m"),
                                          ("dit", "edm:heun")])
def test_threshold_zero_is_the_uncached_video(pipes, name, sampler, method):
    pipe = pipes[name]
    kw = dict(sampler=sampler, steps=8, guidance_scale=4.0, negative_prompt="the digit 0 moves down")
    plain = run(pipe, **kw)
    cached = run(pipe, cache=method, cache_threshold=0, **kw)
    assert torch.equal(cached.videos, plain.videos)
    assert cached.stack_evals == plain.stack_evals == plain.nfe
    assert cached.settings["cache"]["skipped"] == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["wan", "dit"])
def test_skipped_steps_run_no_block_and_the_first_and_last_steps_compute(pipes, name, method):
    pipe = pipes[name]
    net = backbone(pipe)
    n = len(net.blocks)
    counter = BlockCounter(net)
    tail = []  # per forward: did the last block run (= the whole stack)
    first = net.register_forward_pre_hook(lambda *a: tail.append(False))
    last = net.blocks[-1].register_forward_hook(lambda *a: tail.__setitem__(-1, True))
    try:
        out = run(pipe, steps=12, cache=method, cache_threshold=HUGE)
    finally:
        counter.remove(), first.remove(), last.remove()
    c = out.settings["cache"]
    assert c["calls"] == out.nfe == len(tail) == 12 and c["skipped"] > 0
    assert out.stack_evals == c["computed"] == sum(tail) == counter.calls[-1] < out.nfe
    assert tail[0] and tail[-1]  # the first call and the last step (flow:euler / dpmpp_2m: one call per step)
    expected = c["computed"] * n + (c["skipped"] if method == "fbcache" else 0)  # fbcache probes with block 0
    assert sum(counter.calls) == c["blocks_run"] == expected
    if method == "magcache":  # at most MAGCACHE_MAX_SKIPS skips in a row
        assert ", ".join(["False"] * (MAGCACHE_MAX_SKIPS + 1)) not in str(tail)


def test_last_step_of_a_two_evaluation_sampler_computes(pipes):
    """Heun: the last step's evaluation (at the last non-zero sigma) always runs the stack."""
    pipe = pipes["dit"]
    net = backbone(pipe)
    sigmas = []
    ran = []
    hook = net.register_forward_pre_hook(lambda m, args: sigmas.append(float(args[1].flatten()[0])))
    tail = net.blocks[-1].register_forward_hook(lambda *a: ran.append(len(sigmas) - 1))
    try:
        out = run(pipe, sampler="edm:heun", steps=6, cache="magcache", cache_threshold=HUGE)
    finally:
        hook.remove(), tail.remove()
    assert out.nfe == 2 * 6 - 1 and 0 < out.stack_evals < out.nfe
    last = min(sigmas)  # c_noise at the last non-zero level
    assert all(i in ran for i, s in enumerate(sigmas) if s == last) and 0 in ran


def test_one_batched_forward_serves_cond_and_uncond(pipes):
    pipe = pipes["wan"]
    counter = BlockCounter(backbone(pipe))
    try:
        out = run(pipe, steps=10, guidance_scale=4.0, negative_prompt="the digit 1 moves up", cache="teacache")
        solo = run(pipe, steps=10, guidance_scale=1.0, cache="teacache")
    finally:
        counter.remove()
    guided = counter.batches[:out.settings["cache"]["computed"]]
    assert set(guided) == {4}  # 2 prompts x (cond + uncond) in one forward
    assert set(counter.batches[len(guided):]) == {2}
    assert out.settings["cache"]["calls"] == out.nfe == 10 and solo.nfe == 10


def test_a_guidance_interval_changes_the_batch_and_forces_a_step(pipes):
    """Inside the interval the forward has cond + uncond, outside cond alone: a cached residual of the other batch
    is never reused."""
    pipe = pipes["wan"]
    counter = BlockCounter(backbone(pipe))
    try:
        out = run(pipe, steps=12, guidance_scale=4.0, guidance_interval=(0.3, 0.8), cache="fbcache",
                  cache_threshold=HUGE)
    finally:
        counter.remove()
    sizes = counter.batches  # the first block runs at every call (fbcache's probe)
    assert set(sizes) == {2, 4} and len(sizes) == out.nfe
    forced = {0, len(sizes) - 1} | {i + 1 for i, (a, b) in enumerate(zip(sizes, sizes[1:])) if a != b}
    assert len(forced) >= 3 and out.stack_evals >= len(forced)  # the first call, each change of batch, the last
    assert torch.isfinite(out.videos).all()


def test_shipped_wan_at_20_steps_halves_the_stack_evaluations(pipes):
    """The README's aim at the default thresholds: >= 2x fewer block-stack evaluations; the video stays close."""
    pipe = pipes["wan"]
    plain = run(pipe, steps=20)
    for method in ("magcache", "teacache"):
        out = run(pipe, steps=20, cache=method)
        assert out.stack_evals * 2 <= plain.stack_evals == 20
        psnr = 10 * torch.log10(4 / (out.videos - plain.videos).pow(2).mean())
        assert psnr > 25, (method, float(psnr))


def test_diffusers_wan_folder(wan_folders):
    pipe = load_pipeline(wan_folders["unipc"])
    kw = dict(prompts=["a red car at night"], seeds=[3], num_frames=5, height=32, width=32, steps=6, guidance_scale=5.0)
    plain = run(pipe, **kw)
    for method in METHODS:
        assert torch.equal(run(pipe, cache=method, cache_threshold=0, **kw).videos, plain.videos)
        skipped = run(pipe, cache=method, cache_threshold=HUGE, **kw)
        assert 0 < skipped.stack_evals < plain.stack_evals == plain.nfe == 6
        assert torch.isfinite(skipped.videos).all()


from test_wan_pipeline import wan_folders  # noqa: E402,F401  (the fixture: a tiny random diffusers Wan folder)


# ------------------------------------------------------------------------------------------- calibration


def copy_model(tmp_path, name="wan") -> Path:
    folder = tmp_path / f"{name}_copy"
    shutil.copytree(MODELS[name], folder)
    (folder / CACHE_FILE).unlink(missing_ok=True)
    return folder


def test_first_use_calibrates_into_the_user_store_and_says_so(tmp_path, capsys, store):
    folder = copy_model(tmp_path)
    pipe = load_pipeline(folder)
    run(pipe, steps=6, cache="magcache")
    err = capsys.readouterr().err
    assert "no step-cache calibration for this model: calibrating now" in err
    assert not (folder / CACHE_FILE).exists()  # a model folder is never written unasked
    stored = user_file(pipe)
    assert stored.parent.parent == store and stored.is_file()
    run(pipe, steps=9, cache="teacache")  # the same calibration serves both methods and any step count
    assert "calibrat" not in capsys.readouterr().err


def test_calibrate_cache_command_writes_the_folder_and_never_overwrites(tmp_path, capsys):
    folder = copy_model(tmp_path, "dit")
    args = ["calibrate-cache", "--model", str(folder), "--steps", "6,12"]
    assert cli.main(args) == 0
    data = json.loads((folder / CACHE_FILE).read_text())
    assert data["settings"]["steps"] == [6, 12] and len(data["magcache"]["levels"]) == 12
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{folder / CACHE_FILE} exists; pass --overwrite to replace it")
    assert cli.main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    pipe = load_pipeline(folder)
    run(pipe, steps=5, cache="magcache")  # the folder's file is used: no calibration now
    assert "calibrat" not in capsys.readouterr().err
    for bad in ("{", json.dumps({"format": 99})):  # a damaged file is one line, never replaced silently
        (folder / CACHE_FILE).write_text(bad)
        with pytest.raises(CacheError, match="cache.json is not a"):
            run(pipe, steps=5, cache="magcache")


def test_a_calibration_for_other_weights_is_not_used(tmp_path, capsys):
    folder = copy_model(tmp_path)
    assert cli.main(["calibrate-cache", "--model", str(folder), "--steps", "5"]) == 0
    data = json.loads((folder / CACHE_FILE).read_text())
    (folder / CACHE_FILE).write_text(json.dumps({**data, "fingerprint": "0" * 16}))
    capsys.readouterr()
    run(load_pipeline(folder), steps=5, cache="teacache")
    err = capsys.readouterr().err
    assert "was calibrated for other weights; not used" in err and "calibrating now" in err


@pytest.mark.parametrize("name", ["wan", "dit"])
def test_the_magnitude_curve_carries_over_to_other_step_counts(pipes, name):
    """magcache's |r|(u) from a 40-step run predicts the residual magnitudes of a 13-step run of another
    sampler (interpolated in the noise level), and teacache's polynomial is fitted to what the run measured."""
    pipe = pipes[name]
    data = calibrate(pipe, steps=(40,), prompts=PROMPTS[:1])
    curve = NormCurve(data["magcache"]["levels"], data["magcache"]["norms"])
    other = Recorder()
    sampler = "flow:dpmpp_2m" if name == "wan" else "edm:euler"
    pipe.generate(PROMPTS[:1], seed=0, steps=13, sampler=sampler, progress=False, cache=other)
    predicted = torch.tensor([curve(r["level"]) for r in other.records])
    measured = torch.tensor([r["norm"] for r in other.records])
    assert ((predicted - measured).abs() / measured).max() < 0.1
    pairs = [(r["input_change"], r["residual_change"]) for r in data["runs"][0]["records"] if r["input_change"]]
    x, y = torch.tensor(pairs).T.double()
    fit = torch.tensor([float(__import__("numpy").polyval(data["teacache"]["coefficients"], v)) for v in x])
    assert (fit - y).pow(2).mean() < y.var()  # the fit explains the run better than its mean


# ----------------------------------------------------------------------------------------------- errors


def test_bad_names_and_thresholds_are_one_line_errors_before_any_work(pipes, capsys):
    pipe = pipes["wan"]
    for cache, threshold, match in (("deepcache", None, "unknown cache 'deepcache'; use one of magcache"),
                                    ("fbcache", -0.1, "finite number >= 0"), ("teacache", float("nan"), "finite"),
                                    ("magcache", "lots", "must be a number >= 0")):
        with pytest.raises(CacheError, match=match):
            pipe.generate("the digit 1 moves up", steps=2, cache=cache, cache_threshold=threshold, progress=False)
    for argv, match in ((["--cache", "deepcache"], "invalid choice: 'deepcache'"),
                        (["--cache", "fbcache", "--cache-threshold", "-1"], "finite number >= 0"),
                        (["--cache-threshold", "0.1"], "--cache-threshold needs --cache NAME")):
        for command in (["generate", "the digit 1 moves up", "--steps", "1"], ["eval", "--model", str(MODELS["wan"])]):
            try:
                rc = cli.main([*command, *argv])
            except SystemExit as e:  # argparse's own errors (one line too)
                rc = e.code
            lines = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and match in lines[0], lines


def test_an_hourglass_dit_says_it_cannot_be_cached(pipes):
    pipe = pipes["dit"]
    flat = pipe.module.net
    try:
        pipe.module.net = DiT("hourglass-tiny")
        with pytest.raises(CacheError, match="needs a flat block stack"):
            pipe.generate("the digit 1 moves up", steps=2, cache="fbcache", progress=False)
    finally:
        pipe.module.net = flat


def test_default_cache_applies_inside_and_reports_its_caches(pipes):
    pipe = pipes["wan"]
    with default_cache("fbcache", 0.2) as used:
        out = run(pipe, steps=10)
        off = run(pipe, steps=10, cache="none")
    assert len(used) == 1 and out.settings["cache"]["name"] == "fbcache" and off.settings["cache"] is None
    assert run(pipe, steps=10).settings["cache"] is None  # outside: off


def test_magcache_rule_by_hand():
    """gamma = 0.9 per call: the error after k skips is sum_j |1 - 0.9^j| (0.1, then 0.1 + 0.19), compared with the
    threshold strictly; computing resets it."""
    curve = NormCurve([0.0, 1.0], [0.9**10, 1.0])  # |r|(u) = 0.9^(10 (1 - u)): gamma 0.9 per 0.1 in u
    cache = MagCache(0.29 - 1e-9, curve, max_skips=5)
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([torch.nn.Identity()])
    cache.start(last_level=0.05)
    computed = []
    for u in (1.0, 0.9, 0.8, 0.7, 0.6, 0.05):
        before = cache.computed
        cache.at(u)
        cache.step(net, torch.zeros(1, 2, 3), lambda h, blocks=None: h + 1, None)
        computed.append(cache.computed > before)
    assert computed == [True, False, True, False, True, True]  # the last level computes whatever the error


def _identity_net():
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([torch.nn.Identity()])
    return net


def test_change_curve_by_hand():
    """Consecutive changes 0.1 (u 1 -> 0.5) and 0.3 (0.5 -> 0): between any two levels, the interpolated sum."""
    c = ChangeCurve([1.0, 0.5, 0.0], [None, 0.1, 0.3])
    for (u1, u2), want in (((1.0, 0.0), 0.4), ((1.0, 0.75), 0.05), ((0.5, 0.25), 0.15), ((0.25, 0.75), 0.2)):
        assert abs(c(u1, u2) - want) < 1e-12


def test_magcache_with_the_measured_change_by_hand():
    """With a ChangeCurve the error of the k-th skip is the change since the cached level (0.1 per 0.1 in u here:
    0.1, then 0.1 + 0.2), not the magnitude's (gamma 1: no magnitude error at all), strictly below the threshold."""
    flat = NormCurve([0.0, 1.0], [1.0, 1.0])
    change = ChangeCurve([1.0, 0.0], [None, 1.0])  # rel change 1.0 per unit of u
    cache = MagCache(0.3 - 1e-9, flat, max_skips=5, change=change)
    net = _identity_net()
    cache.start(last_level=0.05)
    computed = []
    for u in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.05):
        before = cache.computed
        cache.at(u)
        cache.step(net, torch.zeros(1, 2, 3), lambda h, blocks=None: h + 1, None)
        computed.append(cache.computed > before)
    assert computed == [True, False, True, False, True, False, True]
    magnitude_only = MagCache(0.3, flat, max_skips=5)  # MagCache's own error: 0 here, so only K limits it
    magnitude_only.start(last_level=0.05)
    for u in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.05):
        magnitude_only.at(u)
        magnitude_only.step(net, torch.zeros(1, 2, 3), lambda h, blocks=None: h + 1, None)
    assert magnitude_only.computed == 2  # the first call and the last level


def test_the_calibrated_change_matches_a_fresh_run(pipes):
    """magcache's ChangeCurve from a 40-step run predicts the residual change of a 10-step run (each pair of
    consecutive calls) within 35 %, and it is not the magnitude ratio (the residual turns: more change)."""
    pipe = pipes["wan"]
    data = calibrate(pipe, steps=(40,), prompts=PROMPTS[:1])
    change = change_curve(data)
    other = Recorder()
    pipe.generate(PROMPTS[:1], seed=0, steps=10, progress=False, cache=other)
    pairs = list(zip(other.records, other.records[1:]))
    predicted = torch.tensor([change(a["level"], b["level"]) for a, b in pairs])
    measured = torch.tensor([b["residual_change"] for a, b in pairs])
    assert ((predicted - measured).abs() / measured).max() < 0.35
    magnitude = torch.tensor([abs(1 - b["norm"] / a["norm"]) for a, b in pairs])
    assert (measured > magnitude).all()


def test_fbcache_accumulates_the_error_of_its_skips():
    """Block 0 adds 1.0, 1.1, 1.2, 1.3, 1.6 on successive calls: changes vs the cached 1.0 are 0.1, 0.2; with
    threshold 0.25 the second skip (0.1 + 0.2 = 0.3) computes, where the current change alone (0.2) would skip."""
    net = torch.nn.Module()
    adds = iter([1.0, 1.1, 1.2, 1.3, 1.6])

    class First(torch.nn.Module):
        def forward(self, h):
            return h + next(adds)

    net.blocks = torch.nn.ModuleList([First(), torch.nn.Identity()])

    def run(h, blocks=net.blocks):
        for b in blocks:
            h = b(h)
        return h

    cache = FBCache(0.25)
    cache.start(last_level=0.05)
    computed = []
    for u in (1.0, 0.9, 0.8, 0.7, 0.6):
        before = cache.computed
        cache.at(u)
        cache.step(net, torch.zeros(1, 2, 3), run, None)
        computed.append(cache.computed > before)
    assert computed == [True, False, True, False, True]  # 0.1 skips; 0.3 computes; 1/12 skips; 5/12 computes
    assert cache.blocks_run == 3 * 2 + 2  # 3 full stacks + block 0 of the 2 skipped calls


def test_magcache_retains_the_first_steps_of_the_grid():
    """retention 0.2 of a 10-step grid: the first int(0.2 * 10 + 0.5) = 2 steps compute whatever the threshold,
    then the rule may skip (K = 1 here: every other call), and the last level computes."""
    levels = [1.0 - 0.1 * i for i in range(10)]  # 1.0 .. 0.1, descending
    flat = NormCurve([0.0, 1.0], [1.0, 1.0])
    cache = MagCache(HUGE, flat, max_skips=1, retention=0.2)
    net = _identity_net()
    cache.start(last_level=levels[-1], levels=levels)
    computed = []
    for u in levels:
        before = cache.computed
        cache.at(u)
        cache.step(net, torch.zeros(1, 2, 3), lambda h, blocks=None: h + 1, None)
        computed.append(cache.computed > before)
    assert computed == [True, True, False, True, False, True, False, True, False, True]
    cache.start(last_level=levels[-1])  # no grid told: no retention
    assert cache.retained_above == float("inf")


def test_forecast_by_hand():
    """Forecast: one point is reused; two extrapolate along their tangent in lambda; a point at sigma = inf (lambda
    = inf) or a new batch shape gives no tangent."""
    f = Forecast()
    a, b = torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 3.0)
    f.push(0.0, a)
    assert torch.equal(f(5.0), a)
    f.push(1.0, b)  # slope 2 per unit of lambda
    assert torch.allclose(f(2.5), torch.full((1, 2, 3), 6.0)) and torch.allclose(f(0.5), torch.full((1, 2, 3), 2.0))
    g = Forecast()
    g.push(math.inf, a)
    g.push(1.0, b)
    assert torch.equal(g(0.0), b)
    g.push(0.0, torch.zeros(2, 2, 3))  # another batch: no history
    assert len(g.points) == 1
    assert log_sigma(0.5) == 0.0 and log_sigma(1.0) == math.inf and abs(log_sigma(0.8) - math.log(4.0)) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_a_skipped_step_forecasts_a_residual_linear_in_log_sigma_exactly(method):
    """A toy two-block stack whose residual is c0 + c1 * lambda(u) (each block half of it): every rule, at a
    threshold that skips about every other call, returns the uncached output on each skipped call that has two
    computed steps behind it, to rounding (the tangent through them is the function); reusing the cached residual
    (forecast = False) misses it on the same calls."""
    c0 = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    c1 = 0.3
    levels = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    state = {}

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.modulation, self.norm1 = torch.nn.Parameter(torch.zeros(1, 6, 8)), torch.nn.Identity()  # TeaCache's probe

        def forward(self, h):
            return h + 0.5 * (c0 + c1 * log_sigma(state["u"]))

    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([Half(), Half()])

    def run(h, blocks=net.blocks):
        for blk in blocks:
            h = blk(h)
        return h

    def make():
        if method == "magcache":
            return MagCache(HUGE, NormCurve([0.0, 1.0], [1.0, 1.0]), max_skips=1)
        if method == "teacache":
            return TeaCache(1.0, [0.0, 0.6])  # 0.6 per call whatever the input: skip, then compute
        return FBCache(0.5)

    errors = {}
    for forecast in (True, False):
        cache = make()
        cache.forecast = forecast
        cache.start(last_level=levels[-1], levels=levels)
        h, errors[forecast] = torch.zeros(1, 4, 8), []
        for u in levels:
            state["u"] = u
            cache.at(u)
            before, memory = cache.computed, cache.tails if method == "fbcache" else cache.memory
            two = len(memory.points) == 2
            with torch.no_grad():
                out = cache.step(net, h, run, torch.zeros(1, 6, 8))
                if cache.computed == before and two:
                    errors[forecast].append(float((out - run(h)).abs().max()))
    assert len(errors[True]) >= 2 and len(errors[True]) == len(errors[False]), errors
    assert max(errors[True]) < 1e-5 and min(errors[False]) > 1e-2, errors


def test_flow_models_forecast_and_edm_models_reuse(pipes):
    """FORECAST: the shipped WAN's caches forecast a skipped step's residual, the shipped DiT's reuse it."""
    from dfm.pipeline.caching import build_cache

    for method in METHODS:
        assert build_cache(pipes["wan"], method, None).forecast is True
        assert build_cache(pipes["dit"], method, None).forecast is False


def test_magcache_retains_three_of_twenty_flow_steps_and_skips_at_most_four_in_a_row(pipes):
    """Flow models: the first 3 of 20 steps always compute (retention 0.15), then at most 4 skips in a row (a huge
    threshold); EDM models retain none. Counted on the shipped WAN's 20-step Euler grid."""
    from dfm.pipeline.caching import build_cache

    seen = []
    cache = build_cache(pipes["wan"], "magcache", 1e9)
    original = cache.compute
    cache.compute = lambda model, h, run: (seen.append(cache.calls - 1), original(model, h, run))[1]
    pipes["wan"].generate(["the digit 3 moves up"], seeds=[0], steps=20, progress=False, cache=cache)
    assert seen == [0, 1, 2, 7, 12, 17, 19], seen  # 3 retained, 4 skipped, ..., the last step forced
    assert build_cache(pipes["dit"], "magcache", None).retention == 0.0
