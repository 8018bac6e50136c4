"""`dfm serve` with image-to-video models (tiny random Wan I2V / FLF2V diffusers folders, built as in
tests/test_wan_family_pipeline.py), through the Worker API: the model says which images it takes, an upload (a
data URL, as the page sends it) is saved beside the video and passed to generate, the recorded `dfm generate --image`
command makes the same video, and a missing or unreadable image is one line, never a job."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")

from PIL import Image  # noqa: E402
from test_serve import one_line_error as error, png_data_url, wait  # noqa: E402
from test_wan_family_pipeline import FRAMES, SIZE, build, parts  # noqa: E402,F401  (parts: the fixture)

from dfm.cli import main  # noqa: E402
from dfm.serve import Models, Worker  # noqa: E402
from dfm.video import decode_frames  # noqa: E402


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return Worker(Models(), tmp_path_factory.mktemp("serve_images"))




def test_i2v_upload_is_saved_and_the_command_reproduces_it(parts, worker, tmp_path, monkeypatch):
    folder = str(build(parts, "i2v", "unipc"))
    described = worker.models.describe(folder)
    assert (described["image"], described["last_image"]) == ("needed", None)
    request = {"prompt": "a red square", "model": folder, "frames": str(FRAMES), "height": str(SIZE),
               "width": str(SIZE), "steps": "2", "seed": "4"}
    queued = len(worker.jobs)
    assert "Wan I2V folder: it needs an image" in error(worker, request)
    assert "Image (first frame): cannot read the uploaded file as an image" in error(
        worker, {**request, "image": "data:image/png;base64,bm90IGEgcGljdHVyZQ=="})
    assert "expected an uploaded file" in error(worker, {**request, "image": "/etc/passwd"})
    assert "last_image needs a first-last-frame" in error(worker, {**request, "image": png_data_url(),
                                                                   "last_image": png_data_url(seed=1)})
    assert len(worker.jobs) == queued

    upload = png_data_url(size=(40, 48), seed=2)
    first = wait(worker, worker.submit({**request, "image": upload}).id)
    again = wait(worker, worker.submit({**request, "image": png_data_url(size=(40, 48), seed=3)}).id)
    assert first["state"] == again["state"] == "done", (first, again)
    a, b = first["result"], again["result"]
    out = worker.out_dir
    for r in (a, b):
        assert r["image"] == r["video"].replace(".mp4", "_image.png")
    assert a["image"] != b["image"]  # never overwritten
    sent = np.asarray(Image.open(__import__("io").BytesIO(__import__("base64").b64decode(upload.split(",")[1]))))
    assert np.array_equal(np.asarray(Image.open(out / a["image"])), sent)  # the upload, losslessly
    assert json.loads((out / a["json"]).read_text())["image"] == a["image"]
    argv = shlex.split(a["command"])
    assert argv[argv.index("--image") + 1] == str((out / a["image"]).resolve())
    assert not np.array_equal(decode_frames(out / a["video"]), decode_frames(out / b["video"]))  # the image acts
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:] + ["--no-progress"]) == 0
    assert np.array_equal(decode_frames(tmp_path / argv[argv.index("--out") + 1]), decode_frames(out / a["video"]))


def test_flf2v_says_it_needs_both(parts, worker):
    folder = str(build(parts, "flf2v", "unipc"))
    described = worker.models.describe(folder)
    assert (described["image"], described["last_image"]) == ("needed", "needed")
    request = {"prompt": "a red square", "model": folder, "frames": str(FRAMES), "height": str(SIZE),
               "width": str(SIZE), "steps": "1", "image": png_data_url()}
    assert "it needs last_image too" in error(worker, request)
