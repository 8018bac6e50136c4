"""Start a training run from a dfm model folder's weights, the small text encoder's vocabulary grown by word.

    python -m dfm.training.warm_start models/wan_flow_digits --config configs/wan_flow_i2v_digits.yaml [key=value ...]

The run is an ordinary `dfm train` run (its checkpoints resume with `dfm train --resume RUN`); only its step-0
weights come from FOLDER: the backbone whole (an image-conditioned recipe with the same channels: conditioning.mode
frame), the text encoder row by row of its word table — a word both vocabularies have keeps its row, a new word (a
paraphrase's "seven", "upward") keeps its fresh initialisation. The EMA restarts from the loaded weights.
(A stop-gap for the fine-tune of issue 21; `model.init_from` of the LoRA work is the general form.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dfm.config import load_config
from dfm.model import backbone_class
from dfm.text import SmallTextEncoder
from dfm.training.config import TrainConfig
from dfm.training.optim import EMA
from dfm.training.trainer import Trainer


@torch.no_grad()
def load_into(module, folder: Path, arch: str) -> dict:
    """Copy FOLDER's transformer and text encoder weights into a DiffusionModule: {"new_words": [...]}."""
    net = backbone_class(arch).from_pretrained(folder / "transformer")
    module.net.load_state_dict(net.state_dict())
    old = SmallTextEncoder.from_pretrained(folder / "text_encoder")
    text = module.text
    rows = text.embed.weight
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("embed.")}
    text.load_state_dict({**text.state_dict(), **state})
    new = []
    for word, i in text.tokenizer.index.items():
        j = old.tokenizer.index.get(word)
        if j is None:
            new.append(word)
        else:
            rows[i] = old.embed.weight[j]
    return {"new_words": new}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    trainer = Trainer(cfg)
    found = load_into(trainer.module, args.folder, cfg.model.arch)
    trainer.ema = EMA(trainer.module, cfg.optim.ema_decay, cfg.optim.ema_warmup)
    trainer.log.notice(f"warm start from {args.folder}: {len(found['new_words'])} new words "
                       f"({' '.join(found['new_words'][:12])} ...)")
    result = trainer.run()
    print(f"done at step {result['step']}; checkpoint {result.get('checkpoint')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
