"""The `dfm` command line (grows with the pipeline).

    dfm train --config configs/wan_flow_digits.yaml [--dry-run] [--resume [PATH]] [key=value ...]
    python -m dfm train ...                                   (the same)
    torchrun --nproc_per_node 2 -m dfm train ...              (one process per device; gloo on CPU, nccl on GPU)

Errors (a bad key or value, a missing file, a corrupt checkpoint, a non-finite loss) are one line on stderr and
exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import io
import os
import signal
import sys
import warnings
from pathlib import Path, PurePath

import torch

from dfm.checkpoint import resume_candidates, run_config
from dfm.config import config_yaml, load_config
from dfm.errors import UserError, first_line
from dfm.training import TrainConfig, check_config, train
from dfm.training.runs import run_dir_of


# modules that define `add_commands(subparsers)`; one module per command family keeps this file small
COMMAND_MODULES = ("dfm.pipeline", "dfm.evaluate", "dfm.evaluate_lora", "dfm.evaluate_image", "dfm.preprocess",
                   "dfm.training.vae_trainer", "dfm.serve",
                   "dfm.pipeline.cache_commands")  # the last adds --cache to generate and eval


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _TrainParser(_Parser):
    """`dfm train`'s parser: key=value overrides may come after `--resume PATH` too (argparse alone takes the
    positionals in one run, so `dfm train a=1 --resume RUN b=2` would leave b=2 unrecognized)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        ns.overrides = [*ns.overrides, *late]
        return ns, [a for a in extra if a not in late]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dfm", description="Video diffusion models: EDM and flow matching on one core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train a video diffusion model. Settings come from the dataclass defaults "
                                   "(dfm/training/config.py), then --config, then key=value overrides (e.g. "
                                   "train.max_steps=100 optim.lr=3e-4).")
    p.add_argument("--config", metavar="YAML", help="a recipe such as configs/wan_flow_digits.yaml "
                   "(optional with --resume PATH: the checkpoint's config.yaml is used)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from a checkpoint: the latest under train.output_dir, or PATH (a step_* folder, "
                        "a checkpoints folder or an output directory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (before or after "
                   "--resume PATH)")
    p.__class__ = _TrainParser  # key=value also after `--resume PATH`
    p.set_defaults(func=cmd_train)
    for name in COMMAND_MODULES:  # each adds its subcommands: add_commands(sub) -> parsers with func=...
        if importlib.util.find_spec(name) is not None and hasattr(module := importlib.import_module(name), "add_commands"):
            module.add_commands(sub)
    return parser


def cmd_train(args) -> int:
    """A fresh run (--config), or the continuation of one (--resume [PATH]): the run's own folder and config.yaml,
    with key=value overrides on either side of --resume (the settings that change are named). What would split or
    restart a resumed run (train.output_dir elsewhere, train.overwrite=true) is refused."""
    resume, overrides = args.resume, list(args.overrides)
    if resume not in (None, "latest") and "=" in resume and not Path(resume).exists():
        resume, overrides = "latest", [resume, *overrides]  # `--resume key=value`: the latest, and an override
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    config_path = args.config
    if resume not in (None, "latest"):
        found = resume_candidates(resume)[0][0]  # not found / no checkpoint there: one line saying so
        if "train.overwrite" in given and given["train.overwrite"].strip().lower() in ("true", "yes", "on", "1"):
            raise _UsageError("train.overwrite=true starts a new run (moving the old one aside); it does not "
                              "combine with --resume: leave one of the two out")
        run = run_dir_of(found)
        if "train.output_dir" in given and run is not None and \
                Path(given["train.output_dir"].strip()).resolve() != run.resolve():
            raise _UsageError(f"--resume {resume} continues the run in {run}, where it was read from; "
                              f"train.output_dir={given['train.output_dir'].strip()} would split it: leave it out, or "
                              f"copy the run there first and resume the copy")
        if config_path is None:
            config_path = run_config(resume)
            if config_path is None:
                raise _UsageError(f"--resume {resume}: the checkpoint has no config.yaml beside it; pass --config YAML "
                                  f"(the recipe it was trained with)")
    elif config_path is None:
        raise _UsageError("dfm train needs --config YAML (or --resume PATH to a checkpoint with its config.yaml)")
    cfg = load_config(TrainConfig, config_path, overrides)
    if args.dry_run:
        check_config(cfg)
        sys.stdout.write(config_yaml(cfg))
        return 0
    result = train(cfg, resume=resume)
    say = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    if result.get("signal"):
        if say:
            print(f"dfm train: stopped by {signal.Signals(result['signal']).name} at step {result['step']}; "
                  f"checkpoint {result['checkpoint']} (`dfm train --resume {cfg.train.output_dir}` continues)",
                  file=sys.stderr)
        return 128 + result["signal"]
    if result.get("checkpoint") and say:
        print(f"dfm: done at step {result['step']}; checkpoint {result['checkpoint']}", file=sys.stderr)
    return 0


class _UsageError(UserError):
    pass


# The error boundary: what a user can fix is one line on stderr and exit code 2, everything else a traceback (a bug).
# OSErrors that name a path and are about that path (permissions, a folder where a file goes, a full or read-only
# disk) are the user's; without a path, or of another kind, they are not.
_PATH_ERRORS = {  # errno -> what to do
    errno.EACCES: "check its permissions or choose another path", errno.EPERM: "check its permissions or choose "
    "another path",
    errno.EROFS: "the disk is read-only: choose another path", errno.ENOSPC: "the disk is full: free space or "
    "write elsewhere", errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EFBIG: "the file is too large for this disk: write elsewhere", errno.EISDIR: "it is a folder: give a "
    "file name", errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "it exists and is not a folder: choose another path", errno.ENAMETOOLONG: "use a shorter path",
}
_COMMANDS_WITH_OWN_THREADS = ("train", "train-vae")  # their train.threads; DDP divides the cores itself


def _os_error(e: OSError) -> str | None:
    """One line for a user-fixable OSError (the target path, what went wrong, the fix), else None."""
    if e.errno not in _PATH_ERRORS or not e.filename:
        return None
    target = e.filename2 or e.filename  # os.replace(tmp, target): the target is the user's path
    return f"{target}: {e.strerror}; {_PATH_ERRORS[e.errno]}"


def _decode_error(e: UnicodeDecodeError) -> str | None:
    """One line for a file that is not UTF-8 text, naming it (found in the frames that were reading it), else None:
    a decoding error that no file read raised is a bug."""
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first: the frame reading the file holds it
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.TextIOBase) else None
            if isinstance(value, PurePath) and frame.f_code.co_name in ("read_text", "open"):
                name = str(value)
            if isinstance(name, str):
                byte = e.object[e.start] if isinstance(e.object, (bytes, bytearray)) else None
                at = f"byte 0x{byte:02x} at offset {e.start}" if byte is not None else e.reason
                return f"{name} is not {e.encoding.upper()} text ({at}); save it as UTF-8 or restore the file"
    return None


def _one_line_warning(command: str):
    def format_warning(message, category, filename, lineno, line=None) -> str:
        return f"dfm {command}: warning: {' '.join(str(message).split())}\n"  # no source line, no file:line
    return format_warning


def _free_cores() -> int:
    """CPU threads that do not oversubscribe: torch's default less the cores the load average says are busy (at
    least 1). OpenMP threads spin at every barrier, so a thread on a busy core stalls all the others: measured on
    the shipped model with one core busy, two threads took 8-15x as long as one."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - round(load)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads, format_warning = torch.get_num_threads(), warnings.formatwarning
    warnings.formatwarning = _one_line_warning(args.command)  # a warning is one line, as errors are
    if getattr(args, "threads", 0) == 0 and args.command not in _COMMANDS_WITH_OWN_THREADS:
        torch.set_num_threads(_free_cores())  # the default of every other command; --threads N sets N
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"dfm {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`dfm info ... | head`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except (OSError, UnicodeDecodeError) as e:
        line = _os_error(e) if isinstance(e, OSError) else _decode_error(e)
        if line is None:
            raise
        print(f"dfm {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
