"""`dfm calibrate-cache`, and `--cache NAME [--cache-threshold X]` on `dfm generate` and `dfm eval`.

The two flags are added to those commands' parsers here (dfm.cli registers this module after them): the command
then runs inside `dfm.pipeline.caching.default_cache(NAME, X)`, so each of its `Pipeline.generate` calls uses that
cache. A bad name or threshold is one line (exit 2) before the model is loaded.
"""

from __future__ import annotations

import functools
import sys

from dfm.models.cache import METHODS
from dfm.pipeline.caching import (
    CACHE_FILE,
    CALIBRATION_PROMPTS,
    CALIBRATION_STEPS,
    DEFAULT_THRESHOLDS,
    CacheError,
    calibrate,
    check_cache,
    default_cache,
    folder_file,
    read_calibration,
    user_file,
    write_calibration,
)
from dfm.pipeline.commands import resolve_device, set_threads
from dfm.pipeline.folders import DEFAULT_MODEL, load_pipeline

CACHED_COMMANDS = ("generate", "eval")


def _with_cache(func):
    @functools.wraps(func)
    def run(args) -> int:
        if args.cache_threshold is not None and args.cache in (None, "none"):
            raise CacheError(f"--cache-threshold needs --cache NAME ({', '.join(METHODS)})")
        name, threshold = check_cache(args.cache, args.cache_threshold)  # one line before any work
        with default_cache(name, threshold) as used:
            rc = func(args)
        if used:
            calls, computed = sum(c.calls for c in used), sum(c.computed for c in used)
            print(f"dfm {args.command}: {name} {used[0].threshold:g}: {computed} of {calls} block-stack evaluations "
                  f"({calls / max(computed, 1):.2f}x fewer)", file=sys.stderr)
        return rc
    return run


def cmd_calibrate(args) -> int:
    log = functools.partial(print, "dfm calibrate-cache:", file=sys.stderr)
    set_threads(args.threads)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 2:
        raise CacheError(f"--steps takes step counts >= 2, e.g. 10,20,50; got {args.steps!r}")
    pipe = load_pipeline(args.model, device=resolve_device(args.device))
    target = user_file(pipe) if args.user else folder_file(pipe)
    if target is None:
        raise CacheError(f"{args.model} is not a folder; pass --user to store the calibration for it")
    if target.exists() and not args.overwrite:
        read_calibration(target)  # a broken file says so
        raise CacheError(f"{target} exists; pass --overwrite to replace it")
    if not args.user:  # a read-only folder: say so now, not after the generations
        try:
            probe = target.with_name(f".{CACHE_FILE}.probe")
            probe.touch()
            probe.unlink()
        except OSError:
            raise CacheError(f"cannot write to {target.parent} (read-only); pass --user to keep the calibration in "
                             f"the user's store") from None
    prompts = args.prompt or list(CALIBRATION_PROMPTS)
    data = calibrate(pipe, steps=steps, prompts=prompts, log=log, num_frames=args.frames, height=args.height,
                     width=args.width, guidance_scale=args.guidance)
    write_calibration(data, target, overwrite=args.overwrite)
    print(target)
    return 0


def add_commands(sub) -> None:
    for command in CACHED_COMMANDS:
        p = sub.choices.get(command)
        if p is None:
            continue
        p.add_argument("--cache", choices=(*METHODS, "none"), default=None,
                       help="step caching: reuse the transformer's block-stack residual on steps whose input "
                            "barely changed (default: none)")
        p.add_argument("--cache-threshold", type=float, default=None, metavar="X",
                       help="the cache's threshold, >= 0 (0: never skip; larger: more skipped steps); default "
                            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_THRESHOLDS.items()))
        p.set_defaults(func=_with_cache(p.get_default("func")))
    p = sub.add_parser("calibrate-cache", help="measure a model's step-cache statistics into its folder (cache.json)",
                       description="Run a few uncached generations and store what magcache and teacache need "
                                   f"(residual magnitudes by noise level, teacache's polynomial) in MODEL/{CACHE_FILE}; "
                                   "generate --cache reads it for any step count and sampler.")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH", help=f"the model folder (default {DEFAULT_MODEL})")
    p.add_argument("--steps", default=",".join(map(str, CALIBRATION_STEPS)), metavar="N,N,...",
                   help="one uncached generation per step count (default %(default)s)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a calibration prompt (repeat; default: two fixed prompts)")
    p.add_argument("--frames", type=int, help="frames of the calibration videos (default: the model's)")
    p.add_argument("--height", type=int, help="their height (default: the model's)")
    p.add_argument("--width", type=int, help="their width (default: the model's)")
    p.add_argument("--guidance", type=float, help="their guidance scale (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {CACHE_FILE}")
    p.add_argument("--user", action="store_true",
                   help="store it in the user's calibration store ($DFM_CACHE_DIR, default ~/.cache/dfm) instead of "
                        "the model folder (for read-only or shared folders)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic)")
    p.set_defaults(func=cmd_calibrate)
