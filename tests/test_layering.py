"""dfm's import layering, checked statically with `ast` (nothing of dfm is imported or run).

Three rules, each a test on the real tree, plus tests on tiny fake trees that prove the checker can fail:
  * no import cycle among dfm modules (an import inside a function counts: it is a cycle only postponed);
  * an import goes to the same or a lower layer of LAYERS; within a layer only as SAME_LAYER_ALLOWED says;
    an entry of ONLY imports nothing beyond its list; every module has an entry;
  * no file in dfm/ is over MAX_LINES lines.
Edges: `import dfm.a.b` and `from dfm.a.b import X` go to dfm.a.b, or to dfm.a.b.X where that is a module file.
Importing a submodule also runs its packages' __init__s, but that implicit edge is left out (else every
__init__ that re-exports its submodules would be a cycle); an explicit `from dfm.pkg import X` is an edge to
dfm.pkg like any other, so a real cycle through an __init__ is caught.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path

DFM = Path(__file__).resolve().parents[1] / "dfm"
MAX_LINES = 600

# The layer of each entry, top (5) to bottom (1). An entry covers its module and, for a package, all its
# submodules; the root `dfm` (a docstring and __version__) covers only itself.
LAYERS = {
    "dfm.cli": 5, "dfm.__main__": 5,                                                 # the command line
    "dfm.serve": 5,                                                                 # `dfm serve`, the web page
    "dfm.training": 4, "dfm.pipeline": 4, "dfm.evaluate": 4, "dfm.preprocess": 4,    # applications
    "dfm.evaluate_lora": 4, "dfm.evaluate_image": 4,
    "dfm.model": 3, "dfm.conditioning": 3,                                           # backbone + objective
    "dfm.models": 2, "dfm.vae": 2, "dfm.text": 2, "dfm.diffusion": 2, "dfm.data": 2,  # components
    "dfm": 1, "dfm.checkpoint": 1, "dfm.config": 1, "dfm.io": 1, "dfm.errors": 1,    # foundations
    "dfm.distributed": 1, "dfm.video": 1,
}
# Layers whose entries may import each other freely (cycles are still caught).
OPEN_LAYERS = {5, 1}
# In the other layers an entry imports its own entry (dfm.pipeline.a -> dfm.pipeline.b) and, of the same layer,
# only these; so dfm.pipeline imports none of training / evaluate / preprocess, and layer 2 nothing of layer 2.
SAME_LAYER_ALLOWED = {
    ("dfm.training", "dfm.pipeline"),    # validation samples through the Pipeline
    ("dfm.evaluate", "dfm.pipeline"),
    ("dfm.evaluate_lora", "dfm.evaluate"), ("dfm.evaluate_lora", "dfm.pipeline"),  # eval + ink, with LoRAs
    ("dfm.evaluate_image", "dfm.evaluate"), ("dfm.evaluate_image", "dfm.pipeline"),  # dfm eval --image
    ("dfm.preprocess", "dfm.training"),  # its config and dataset builders
    ("dfm.model", "dfm.conditioning"),   # image conditioning of the loss and the backbone call
}
# An entry here imports only these entries, whatever their layer.
ONLY = {"dfm.diffusion": ("dfm.diffusion", "dfm.errors")}  # the diffusion math knows no prompts, data or files


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file for every .py under root, the package directory (.../dfm)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(root: Path) -> list[tuple[str, str, str]]:
    """(importer, imported module, "dfm/x.py:line") for every import of a dfm module, function-level ones too."""
    mods, edges = modules(root), []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        where = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: level 1 is this package, 2 its parent, ...
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + [node.module] if node.module else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == root.name or target.startswith(root.name + "."):
                    edges.append((node.lineno, where, name, target))
    return [(src, dst, f"{where}:{line}") for line, where, src, dst in sorted(edges, key=lambda e: (e[1], e[0]))]


def find_cycles(root: Path) -> list[str]:
    """One message per distinct shortest cycle through each module that is on a cycle."""
    mods, graph = modules(root), {}
    for src, dst, where in imports(root):
        if dst in mods and dst != src:
            graph.setdefault(src, {}).setdefault(dst, where)
    cycles = {}
    for start in sorted(graph):
        prev, queue = {}, deque([start])
        while queue and start not in prev:  # breadth-first, back to start
            node = queue.popleft()
            for nxt in sorted(graph.get(node, ())):
                if nxt not in prev:
                    prev[nxt] = node
                    queue.append(nxt)
        if start not in prev:
            continue
        back, node = [], prev[start]
        while node != start:
            back.append(node)
            node = prev[node]
        cycle = [start] + back[::-1]
        i = cycle.index(min(cycle))
        cycle = cycle[i:] + cycle[:i]
        cycles[tuple(cycle)] = cycle + cycle[:1]
    return [
        "import cycle " + " -> ".join(c)
        + "".join(f"\n    {graph[a][b]}: {a} -> {b}" for a, b in zip(c, c[1:]))
        for c in cycles.values()
    ]


def entry(module: str, layers: dict[str, int]) -> str | None:
    """The layer-table entry that covers module (the longest match), or None."""
    hits = [k for k in layers if module == k or ("." in k and module.startswith(k + "."))]
    return max(hits, key=len) if hits else None


def layer_violations(root: Path, layers=LAYERS, open_layers=OPEN_LAYERS, same_layer=SAME_LAYER_ALLOWED,
                     only=ONLY) -> list[str]:
    """One message per import that breaks the layering, and per module missing from the layer table."""
    problems, unknown = [], {}
    for name, path in modules(root).items():
        if entry(name, layers) is None:
            unknown.setdefault(name, path.relative_to(root.parent).as_posix())
    for src, dst, where in imports(root):
        s, d = entry(src, layers), entry(dst, layers)
        if d is None:
            unknown.setdefault(dst, where)
        if s is None or d is None:
            continue
        edge = f"{where}: {src} -> {dst}"
        if s in only and d not in only[s]:
            problems.append(f"{edge}: {s} may import only {', '.join(only[s])}")
        elif layers[d] > layers[s]:
            problems.append(f"{edge}: imports upward, layer {layers[s]} -> layer {layers[d]}")
        elif layers[d] == layers[s] and s != d and layers[s] not in open_layers and (s, d) not in same_layer:
            problems.append(f"{edge}: same-layer import {s} -> {d} (layer {layers[s]}) not in SAME_LAYER_ALLOWED")
    problems += [f"{where}: add {name} to the layer table (LAYERS in tests/test_layering.py)"
                 for name, where in unknown.items()]
    return problems


def long_files(root: Path, limit: int = MAX_LINES) -> list[str]:
    lengths = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(root.rglob("*.py"))}
    return [f"{p.relative_to(root.parent).as_posix()} has {n} lines (limit {limit}): split it"
            for p, n in lengths.items() if n > limit]


# --- the real tree ---

def test_no_import_cycles():
    cycles = find_cycles(DFM)
    assert not cycles, "\n".join(cycles)


def test_layering():
    problems = layer_violations(DFM)
    assert not problems, "\n".join(problems)


def test_file_size():
    problems = long_files(DFM)
    assert not problems, "\n".join(problems)


# --- fake trees: the checker can fail ---

def fake(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"dfm/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    return tmp_path / "dfm"


def test_cycle_through_function_level_import(tmp_path):
    root = fake(tmp_path, {"dfm/config.py": "import dfm.video\n",
                           "dfm/video.py": "def f():\n    from dfm.config import load\n"})
    (cycle,) = find_cycles(root)
    assert cycle.startswith("import cycle dfm.config -> dfm.video -> dfm.config")
    assert "dfm/config.py:1: dfm.config -> dfm.video" in cycle and "dfm/video.py:2: dfm.video -> dfm.config" in cycle


def test_relative_import_cycle(tmp_path):
    root = fake(tmp_path, {"dfm/data/__init__.py": "from .a import A\n",
                           "dfm/data/a.py": "from . import b\nA = 1\n",
                           "dfm/data/sub/__init__.py": "",
                           "dfm/data/sub/c.py": "from ..b import B\n",
                           "dfm/data/b.py": "import os\n\ndef g():\n    from .sub.c import C\n"})
    (cycle,) = find_cycles(root)
    assert cycle.startswith("import cycle dfm.data.b -> dfm.data.sub.c -> dfm.data.b"), cycle
    assert "dfm/data/b.py:4" in cycle and "dfm/data/sub/c.py:1" in cycle


def test_cycle_through_package_init(tmp_path):
    root = fake(tmp_path, {"dfm/pipeline/__init__.py": "from dfm.pipeline.gen import run\n",
                           "dfm/pipeline/gen.py": "def run():\n    from dfm.pipeline import DEFAULT\n"})
    assert find_cycles(root) == ["import cycle dfm.pipeline -> dfm.pipeline.gen -> dfm.pipeline"
                                 "\n    dfm/pipeline/__init__.py:1: dfm.pipeline -> dfm.pipeline.gen"
                                 "\n    dfm/pipeline/gen.py:2: dfm.pipeline.gen -> dfm.pipeline"]


def test_reexporting_init_is_no_cycle(tmp_path):
    root = fake(tmp_path, {"dfm/models/__init__.py": "from .dit import DiT\nfrom dfm.models import wan\n",
                           "dfm/models/dit.py": "from dfm.models.wan import Block\nfrom dfm.models import wan\n",
                           "dfm/models/wan.py": "import dfm.errors\n", "dfm/errors.py": ""})
    assert find_cycles(root) == []
    assert layer_violations(root) == []


def test_pipeline_importing_training(tmp_path):
    root = fake(tmp_path, {"dfm/pipeline/__init__.py": "", "dfm/training/__init__.py": "",
                           "dfm/pipeline/x.py": "import torch\n\ndef f():\n    from dfm.training import TrainConfig\n",
                           "dfm/training/loop.py": "from dfm.pipeline import x\n"})  # allowed: training -> pipeline
    assert layer_violations(root) == ["dfm/pipeline/x.py:4: dfm.pipeline.x -> dfm.training: same-layer import "
                                      "dfm.pipeline -> dfm.training (layer 4) not in SAME_LAYER_ALLOWED"]


def test_diffusion_importing_text_and_upward_import(tmp_path):
    root = fake(tmp_path, {"dfm/diffusion/__init__.py": "", "dfm/text.py": "import dfm.model\n", "dfm/model.py": "",
                           "dfm/errors.py": "",
                           "dfm/diffusion/y.py": "from dfm.errors import E\nfrom dfm.text import words\n"})
    assert layer_violations(root) == [
        "dfm/diffusion/y.py:2: dfm.diffusion.y -> dfm.text: dfm.diffusion may import only dfm.diffusion, dfm.errors",
        "dfm/text.py:1: dfm.text -> dfm.model: imports upward, layer 2 -> layer 3"]


def test_module_missing_from_table(tmp_path):
    root = fake(tmp_path, {"dfm/helpers.py": "", "dfm/cli.py": "from dfm import helpers\nimport dfm.ghost\n"})
    hint = "to the layer table (LAYERS in tests/test_layering.py)"
    assert layer_violations(root) == [f"dfm/helpers.py: add dfm.helpers {hint}", f"dfm/cli.py:2: add dfm.ghost {hint}"]


def test_long_file(tmp_path):
    root = fake(tmp_path, {"dfm/big.py": "x = 1\n" * (MAX_LINES + 1), "dfm/ok.py": "x = 1\n" * MAX_LINES})
    assert long_files(root) == [f"dfm/big.py has {MAX_LINES + 1} lines (limit {MAX_LINES}): split it"]


# --- the public contract: what users' code and scripts rely on stays where it was ---------------------------------

# every command and flag of `dfm` before the layering move (read off its parser then)
CLI_BEFORE = {
    "train": ["--config", "--dry-run", "--help", "--resume", "-h"],
    "generate": ["--device", "--dtype", "--frames", "--guidance", "--height", "--help", "--model", "--negative", "--no-progress", "--out", "--sampler", "--scale", "--seed", "--shift", "--steps", "--threads", "--width", "-h"],
    "info": ["--help", "-h"],
    "export": ["--force", "--fps", "--frames", "--guidance", "--height", "--help", "--no-ema", "--sampler", "--shift", "--steps", "--width", "-h"],
    "eval": ["--batch-size", "--colors", "--device", "--frames", "--guidance", "--help", "--json", "--model", "--num", "--reference", "--sampler", "--seed", "--sheet", "--size", "--steps", "--sweep-guidance", "--sweep-steps", "--threads", "-h"],
    "preprocess": ["--batch-size", "--data", "--device", "--help", "--max-length", "--out", "--shard-size", "--text-dtype", "--text-encoder", "--tokenizer", "--vae", "-h"],
    "train-vae": ["--config", "--dry-run", "--help", "--resume", "-h"],
    "eval-vae": ["--batch-size", "--chunk", "--clips", "--frames", "--help", "--model", "--num-digits", "--output", "--overlap", "--seed", "--size", "--threads", "--tile", "-h"],
}


def test_public_names_stay_importable():
    from dfm.data.digits import MovingDigits  # noqa: F401
    from dfm.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS, sample, sample_flow
    from dfm.models import WanModel  # noqa: F401
    from dfm.pipeline import Pipeline, load_pipeline
    from dfm.vae import load_vae  # noqa: F401

    assert callable(sample) and callable(sample_flow) and callable(Pipeline.generate) and callable(load_pipeline)
    assert {"euler", "heun", "dpmpp_2m", "unipc"} <= set(SAMPLERS) and {"euler", "unipc", "dopri5"} <= set(FLOW_SAMPLERS)


def test_every_cli_command_and_flag_is_still_there():
    import argparse

    from dfm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in CLI_BEFORE.items():
        assert command in sub.choices, command
        have = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert set(flags) <= have, (command, sorted(set(flags) - have))
