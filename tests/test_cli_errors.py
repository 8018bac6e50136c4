"""The command line's error boundary (issue 13): what a user can fix is one line on stderr and exit code 2, checked
before the work it would waste; real bugs stay tracebacks. Also: warnings are one line, only safetensors load, and
the default thread count does not oversubscribe a busy machine."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfm import cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wan_flow_digits"
PROMPT = "the digit 7 moves up"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def one_line(capsys, command: str) -> str:
    """The one stderr line of a failed command (asserting it is one line, prefixed, with no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dfm {command}: error: "), err
    return err[0]


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    return folder


# ------------------------------------------------------------------------------------------- disks and paths


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the disk is read-only"),
                                       (errno.EACCES, "check its permissions")])
def test_a_failing_write_is_one_line_naming_the_path(model, tmp_path, capsys, monkeypatch, code, fix):
    """A full, read-only or forbidden disk found while writing (after the up-front checks passed)."""
    from dfm.pipeline import commands

    def write_fails(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(commands, "write_video", write_fails)
    out = tmp_path / "v.mp4"
    assert cli.main(["generate", PROMPT, "--model", str(model), "--steps", "1", "--out", str(out),
                     "--no-progress"]) == 2
    line = one_line(capsys, "generate")
    assert f"{out}: {os.strerror(code)}; {fix}" in line


def test_a_replace_onto_a_folder_names_the_target(tmp_path, capsys, monkeypatch):
    """os.replace(tmp, target) fails with both names; the line names the user's path, the target."""
    def replace_fails(args):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path / ".x.tmp"), None, str(tmp_path / "x.png"))

    monkeypatch.setattr(cli, "build_parser", _parser_with("eval", replace_fails))
    assert cli.main(["eval", "--reference"]) == 2
    assert f"{tmp_path / 'x.png'}: Is a directory; it is a folder: give a file name" in one_line(capsys, "eval")


def _parser_with(command: str, func):
    """build_parser, with `command` running `func` instead (to raise chosen errors through main)."""
    original = cli.build_parser

    def build():
        parser = original()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.choices[command].set_defaults(func=func)
        return parser
    return build


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), ValueError("a bug"),
                                   OSError(errno.EBADF, "Bad file descriptor", "/some/file")])
def test_bugs_stay_tracebacks(monkeypatch, error):
    """An OSError without a path or of a kind no user fixes, or any other exception: not caught."""
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "build_parser", _parser_with("info", fails))
    with pytest.raises(type(error)):
        cli.main(["info", "x"])


def test_a_decoding_error_that_no_file_read_raised_is_a_bug(monkeypatch):
    def decodes(args):
        return b"\xff".decode("utf-8")

    monkeypatch.setattr(cli, "build_parser", _parser_with("info", decodes))
    with pytest.raises(UnicodeDecodeError):
        cli.main(["info", "x"])


def test_eval_sheet_and_json_and_preprocess_out_are_checked_first(tmp_path, capsys, monkeypatch):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("dfm.evaluate.evaluate", lambda *a, **k: pytest.fail("generated before checking"))
    assert cli.main(["eval", "--reference", "--num", "2", "--sheet", str(tmp_path / "dir")]) == 2
    assert f"--sheet {tmp_path / 'dir'} is a folder; give a file name, e.g. {tmp_path / 'dir' / 'out.png'}" in \
        one_line(capsys, "eval")
    assert cli.main(["eval", "--reference", "--num", "2", "--json", str(tmp_path / "file" / "r.json")]) == 2
    assert "is a file, not a folder" in one_line(capsys, "eval")
    monkeypatch.setattr("dfm.preprocess.build_dataset", lambda cfg: pytest.fail("read data before checking"))
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert cli.main(["preprocess", "--data", "dataset=digits", "length=4", "--text-encoder", "none",
                         "--out", str(out)]) == 2
        assert f"--out {out}: {tmp_path / 'file'} is a file, not a folder" in one_line(capsys, "preprocess")


@NO_CUDA
def test_device_cuda_without_cuda_is_one_line(model, tmp_path, capsys):
    assert cli.main(["generate", PROMPT, "--model", str(model), "--device", "cuda"]) == 2
    assert "--device cuda but" in one_line(capsys, "generate")
    assert cli.main(["eval", "--model", str(model), "--device", "cuda"]) == 2
    assert "--device cuda but" in one_line(capsys, "eval")
    for device in ("cuda", "cuda:1"):
        assert cli.main(["preprocess", "--data", "dataset=digits", "length=4", "--text-encoder", "none", "--out",
                         str(tmp_path / "lat"), "--device", device]) == 2
        assert f"--device {device} but CUDA is not available" in one_line(capsys, "preprocess")
    assert cli.main(["preprocess", "--data", "dataset=digits", "--text-encoder", "none", "--out",
                     str(tmp_path / "lat"), "--device", "tpu"]) == 2
    assert "--device tpu is not a device" in one_line(capsys, "preprocess")
    assert not (tmp_path / "lat").exists()


# ------------------------------------------------------------------------------------------- model folders


@pytest.mark.parametrize("name", ["config.yaml", "model_index.json", "text_encoder/config.json",
                                  "transformer/config.json", "vae/config.json"])
def test_a_model_file_that_is_not_utf8_is_one_line_naming_it(model, capsys, name):
    (model / name).write_bytes(b"\xff\xfe\x00 not text")
    for command in (["generate", PROMPT, "--model", str(model), "--steps", "1", "--no-progress"],
                    ["info", str(model)]):
        if command[0] == "info" and name == "config.yaml":
            continue  # info does not read the recipe
        assert cli.main(command) == 2
        line = one_line(capsys, command[0])
        assert name.split("/")[-1] in line and ("UTF-8" in line or "utf-8" in line or "JSON" in line), line


def test_info_on_truncated_weights_names_the_file(model, capsys):
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert cli.main(["info", str(model)]) == 2
    line = one_line(capsys, "info")
    assert f"could not read {weights}" in line and "corrupt or truncated" in line
    assert cli.main(["generate", PROMPT, "--model", str(model)]) == 2  # as generate says it
    assert "corrupt or truncated" in one_line(capsys, "generate")


def test_pickled_transformer_weights_are_refused_by_name(model, capsys):
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert cli.main(["generate", PROMPT, "--model", str(model)]) == 2
    line = one_line(capsys, "generate")
    assert "holds pickled weights only (diffusion_pytorch_model.bin); dfm loads only safetensors" in line
    assert "weights_only=True" in line  # how to convert


# ------------------------------------------------------------------------------------------- warnings, threads


def test_warnings_are_one_line_on_the_command_line(tmp_path):
    """A real process (pytest records warnings itself): the unknown-words warning is one prefixed line (the shipped
    encoder knows "a" from its paraphrased captions, not "cat" or "surfing")."""
    run = subprocess.run([sys.executable, "-m", "dfm", "generate", "a cat surfing", "--model", str(SHIPPED),
                          "--steps", "1", "--out", str(tmp_path / "cat.mp4"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [line for line in warned if line.startswith("dfm generate: warning: the text encoder does "
                                                                 "not know 'cat', 'surfing'")]
    assert len(warned) == 1 and "UnknownWordsWarning" not in run.stderr and "warn(" not in run.stderr


def test_the_default_threads_leave_busy_cores_alone(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for load, expected in ((0.2, 4), (1.0, 3), (3.6, 1), (9.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
            assert cli._free_cores() == expected
        seen = []
        monkeypatch.setattr(cli, "build_parser", _parser_with("info", lambda args: seen.append(
            torch.get_num_threads()) or 0))
        monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
        assert cli.main(["info", "x"]) == 0 and cli.main(["info", "x", "--threads", "3"]) == 0
        assert seen == [2, 4] and torch.get_num_threads() == 4  # --threads is the command's; restored after
    finally:
        torch.set_num_threads(before)


def test_every_command_but_training_has_threads():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    lacking = [name for name, p in sub.choices.items() if not any("--threads" in a.option_strings for a in p._actions)]
    assert sorted(lacking) == ["export", "train", "train-vae"]  # train: train.threads=N; export only copies files
