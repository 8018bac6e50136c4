"""Run under torchrun by tests/test_context_parallel_generate.py: argv[1] is a JSON list of cases
{"name", "model", "mode", "args": generate keywords}; argv[2] the output folder. Every rank generates each case
with `load_pipeline(model, context_parallel=world size)`; rank 0 saves the videos (safetensors) and the
`dfm generate --context-parallel` command line writes one mp4 (rank 0 alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from dfm.cli import main as cli
from dfm.pipeline import load_pipeline


def main(cases_json, out):
    out = Path(out)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    for case in json.loads(cases_json):
        pipe = load_pipeline(case["model"], context_parallel=world, context_parallel_mode=case["mode"])
        video = pipe.generate(case["prompt"], progress=False, **case["args"]).videos
        if dist.get_rank() == 0:
            save_file({"videos": video.contiguous()}, str(out / f"{case['name']}.safetensors"))
    first = json.loads(cases_json)[0]
    target = out / f"cli_rank{dist.get_rank()}.mp4"  # a different name per rank: only rank 0's may appear
    rc = cli(["generate", first["prompt"], "--model", first["model"], "--seed", str(first["args"]["seed"]),
              "--steps", str(first["args"]["steps"]), "--out", str(target), "--no-progress",
              "--context-parallel", str(world), "--threads", "1"])
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(rc)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
