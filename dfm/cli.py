"""The `dfm` command line (grows with the pipeline).

    dfm train --config configs/wan_flow_digits.yaml [--dry-run] [--resume [PATH]] [key=value ...]
    python -m dfm train ...                                   (the same)
    torchrun --nproc_per_node 2 -m dfm train ...              (one process per device; gloo on CPU, nccl on GPU)

Errors (a bad key or value, a missing file, a corrupt checkpoint, a non-finite loss) are one line on stderr and
exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from dfm.checkpoint import run_config
from dfm.config import config_yaml, load_config
from dfm.errors import UserError, first_line
from dfm.training import TrainConfig, check_config, train


# modules that define `add_commands(subparsers)`; one module per command family keeps this file small
COMMAND_MODULES = ("dfm.pipeline", "dfm.evaluate", "dfm.preprocess", "dfm.training.vae_trainer")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_train)
    for name in COMMAND_MODULES:  # each adds its subcommands: add_commands(sub) -> parsers with func=...
        if importlib.util.find_spec(name) is not None and hasattr(module := importlib.import_module(name), "add_commands"):
            module.add_commands(sub)
    return parser


def cmd_train(args) -> int:
    config_path = args.config
    if config_path is None:
        config_path = run_config(args.resume) if args.resume not in (None, "latest") else None
        if config_path is None:
            raise _UsageError("dfm train needs --config YAML (or --resume PATH to a checkpoint with its config.yaml)")
    cfg = load_config(TrainConfig, config_path, args.overrides)
    if args.dry_run:
        check_config(cfg)
        sys.stdout.write(config_yaml(cfg))
        return 0
    result = train(cfg, resume=args.resume)
    if result.get("checkpoint"):
        print(f"dfm: done at step {result['step']}; checkpoint {result['checkpoint']}", file=sys.stderr)
    return 0


class _UsageError(UserError):
    pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    expected = (UserError, FileNotFoundError)
    try:
        return args.func(args)
    except expected as e:
        print(f"dfm {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`dfm info ... | head`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"dfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
