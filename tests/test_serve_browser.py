"""The `dfm serve` page in a real headless Chromium (Debian's `chromium`, driven by Playwright through
`executable_path`; Playwright's own browser download is not used): type a prompt, press Generate, wait for the
<video> to play, download it and decode it; an empty prompt and an unrepresentable frame count are one-line errors
and the next generation still works; two tabs at once both finish, the second told its place in the queue; the
model picker (a shipped model, a folder path, a missing folder).

The server is the real command (`python -m dfm serve --port 0`) in its own process. Skipped without Chromium or
Playwright (CI=true makes that a failure: tests/conftest.py). DFM_SERVE_SCREENSHOT=docs/serve.png saves the page
with its video (the README's screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfm.video import decode_frames, probe_video

CHROMIUM = os.environ.get("DFM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("needs chromium (Debian: apt-get install -y chromium; or DFM_CHROMIUM=PATH)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 120_000  # a loaded 2-core machine; each video takes well under a second alone


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen([sys.executable, "-m", "dfm", "serve", "--port", "0", "--out-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("dfm serve: http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"dfm serve did not start: {line!r} {proc.stderr.read()}")
    yield line.split()[2], out
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # SIGTERM: a clean stop
    log = proc.stderr.read()
    assert "Traceback" not in log and "dfm serve: stopped" in log, log


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def open_page(context, url: str):
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    loaded(page, "models/wan_flow_digits")
    return page


def loaded(page, model: str) -> None:
    """Waits until the page has put `model`'s settings in the form (filling it before would be overwritten)."""
    expect(page.locator("body")).to_have_attribute("data-model", model, timeout=TIMEOUT_MS)  # a first load: seconds


def fill(page, prompt: str, **fields) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("random").uncheck()
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def finished_video(page) -> dict:
    """Waits until the page's <video> has decoded its first frame (Chromium played the mp4), then its state."""
    page.wait_for_function("() => { const v = document.getElementById('video');"
                           " return v.src && v.readyState >= 2 && v.videoWidth > 0; }", timeout=TIMEOUT_MS)
    return page.evaluate("() => { const v = document.getElementById('video'); const s = document.getElementById("
                         "'sheet'); return {src: v.src, width: v.videoWidth, height: v.videoHeight, duration: "
                         "v.duration, sheet: s.complete && s.naturalWidth, command: document.getElementById("
                         "'command').textContent, settings: document.getElementById('settings').textContent}; }")


def generate(page, prompt: str, **fields) -> dict:
    src = page.evaluate("() => document.getElementById('video').src")
    fill(page, prompt, **fields)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("(old) => document.getElementById('video').src !== old", arg=src, timeout=TIMEOUT_MS)
    return finished_video(page)


def test_prompt_generate_video_download_and_errors(server, browser, tmp_path):
    url, out = server
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 1000})
    page = open_page(context, url)
    shown = generate(page, "the digit 3 moves to the right", frames=5, steps=4, seed=3)
    assert (shown["width"], shown["height"]) == (128, 128)  # 16x16 written 8x larger
    assert 0.5 <= shown["duration"] <= 0.7 and shown["sheet"]  # 5 frames at 8 fps; the contact sheet loaded
    settings = json.loads(shown["settings"])
    assert (settings["num_frames"], settings["steps"], settings["seed"]) == (5, 4, 3)
    assert "--frames 5" in shown["command"] and "--seed 3" in shown["command"]
    if os.environ.get("DFM_SERVE_SCREENSHOT"):
        page.wait_for_timeout(300)
        page.screenshot(path=os.environ["DFM_SERVE_SCREENSHOT"], full_page=True)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.read_bytes() == (out / settings["video"]).read_bytes()
    assert decode_frames(saved).shape == (5, 128, 128, 3) and probe_video(saved).num_frames == 5

    error = page.locator("#error")
    for prompt, frames, message in (("", 5, "Prompt is empty: write what the video should show"),
                                    ("the digit 1 moves up", 4, "this VAE (2x4x4) encodes 1 + 2*n frames")):
        fill(page, prompt, frames=frames)
        page.get_by_role("button", name="Generate").click()
        expect(error).to_contain_text(message)
        assert "\n" not in error.inner_text().strip()
    again = generate(page, "the digit 8 moves down", frames=7, steps=3, seed=4)
    assert again["src"] != shown["src"] and error.inner_text() == ""
    name = json.loads(again["settings"])["video"]
    assert decode_frames(out / name).shape[0] == 7
    context.close()


def test_two_tabs_queue_and_both_finish(server, browser):
    url, out = server
    context = browser.new_context()
    first, second = open_page(context, url), open_page(context, url)
    fill(first, "the digit 6 moves up", frames=5, steps=80, seed=0)  # 2-5 s here: long enough to queue behind
    fill(second, "the digit 9 moves left", frames=5, steps=3, seed=0)
    first.get_by_role("button", name="Generate").click()
    expect(first.locator("#status")).not_to_be_empty()  # the first is in the queue
    second.get_by_role("button", name="Generate").click()
    expect(second.locator("#status")).to_contain_text("In the queue: 1 generation ahead of this one (position 2)")
    expect(first.locator("#status")).to_contain_text("Sampling: step")  # progress while it samples
    a, b = finished_video(first), finished_video(second)
    a, b = json.loads(a["settings"]), json.loads(b["settings"])
    assert a["prompt"] == "the digit 6 moves up" and b["prompt"] == "the digit 9 moves left"
    assert a["finished"] <= b["started"]  # one after the other
    for s in (a, b):
        assert decode_frames(out / s["video"]).shape[0] == 5
    context.close()


def test_model_picker_shipped_and_folder(server, browser):
    """The shipped DiT from the list, then the same folder by its path: its own defaults and samplers arrive."""
    url, out = server
    context = browser.new_context()
    page = open_page(context, url)
    page.select_option("#model", "models/dit_edm_digits")
    loaded(page, "models/dit_edm_digits")
    expect(page.locator("#sampler")).to_have_value("edm:dpmpp_2m")  # the DiT's default, not the Wan model's
    shown = json.loads(generate(page, "the digit 2 moves up", frames=3, steps=3, seed=5)["settings"])
    assert (shown["model"], shown["sampler"], shown["num_frames"]) == ("models/dit_edm_digits", "edm:dpmpp_2m", 3)
    page.select_option("#model", "")  # another folder...
    folder = str(ROOT / "models" / "dit_edm_digits")
    page.get_by_label("Model folder").fill(folder)
    page.get_by_label("Model folder").blur()
    loaded(page, folder)
    first = shown
    shown = json.loads(generate(page, "the digit 2 moves up", frames=3, steps=3, seed=5)["settings"])
    assert shown["model"] == folder
    assert shown["video"] == first["video"].replace(".mp4", "_2.mp4") and (out / first["video"]).is_file()  # kept
    assert decode_frames(out / shown["video"]).shape[0] == 3
    page.get_by_label("Model folder").fill("/no/such/folder")
    page.get_by_label("Model folder").blur()
    loaded(page, "!/no/such/folder")
    expect(page.locator("#error")).to_contain_text("Model /no/such/folder: model folder /no/such/folder not found")
    context.close()


def test_lora_fields_round_trip(server, browser, tmp_path):
    """A LoRA file and scale typed in the page reach the job (the command spells --lora PATH:SCALE, the settings
    hold both); a missing file is one line on the page. The image input is offered as optional for the default (it
    does text- and image-to-video) and hidden for a text-to-video model."""
    import torch

    from dfm.models.lora import LoRA
    from dfm.models.lora_files import save_lora
    from dfm.pipeline import load_pipeline

    net = load_pipeline(ROOT / "models" / "wan_flow_digits").transformer
    torch.manual_seed(0)
    lora = LoRA.create(net, rank=2)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.2)
    path = save_lora(net, lora, tmp_path / "digits_lora.safetensors")
    url, out = server
    context = browser.new_context()
    page = open_page(context, url)
    expect(page.locator("#image")).to_be_visible()
    expect(page.locator("#hint_image")).to_contain_text("optional")
    page.select_option("#model", "models/dit_edm_digits")
    loaded(page, "models/dit_edm_digits")
    expect(page.locator("#image")).to_be_hidden()
    page.select_option("#model", "models/wan_flow_digits")
    loaded(page, "models/wan_flow_digits")
    page.get_by_label("LoRA file").fill(str(tmp_path / "missing.safetensors"))
    fill(page, "the digit 5 moves up", frames=5, steps=3, seed=1)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("missing.safetensors: not found or not a .safetensors file")
    page.get_by_label("LoRA file").fill(str(path))
    page.get_by_label("LoRA scale").fill("0.5")
    shown = generate(page, "the digit 5 moves up", frames=5, steps=3, seed=1)
    settings = json.loads(shown["settings"])
    assert (settings["lora"], settings["lora_scale"]) == (str(path.resolve()), 0.5)
    assert f"--lora {path.resolve()}:0.5" in shown["command"]
    assert decode_frames(out / settings["video"]).shape[0] == 5
    context.close()


def test_image_upload_for_an_i2v_folder(server, browser, tmp_path_factory, tmp_path):
    """A tiny random Wan I2V folder by its path: the image input appears; Generate without one is the model's
    one-line error; a chosen file (read by the page's FileReader) gives a video and the saved image."""
    pytest.importorskip("diffusers")
    pytest.importorskip("ftfy")
    family = pytest.importorskip("test_wan_family_pipeline")
    folder = str(family.build(family.make_parts(tmp_path_factory.mktemp("wan_family")), "i2v", "unipc"))
    url, out = server
    context = browser.new_context()
    page = open_page(context, url)
    page.select_option("#model", "")
    page.get_by_label("Model folder").fill(folder)
    page.get_by_label("Model folder").blur()
    loaded(page, folder)
    expect(page.locator("#image")).to_be_visible()
    expect(page.locator("#hint_image")).to_contain_text("this model needs it")
    fill(page, "a red square", frames=family.FRAMES, steps=2, seed=1, height=family.SIZE, width=family.SIZE)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#error")).to_contain_text("Wan I2V folder: it needs an image")
    picture = tmp_path / "first.png"
    family.image(7).save(picture)
    page.set_input_files("#image", str(picture))
    shown = generate(page, "a red square", frames=family.FRAMES, steps=2, seed=1, height=family.SIZE,
                     width=family.SIZE)
    settings = json.loads(shown["settings"])
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / settings["image"])), np.asarray(Image.open(picture)))
    assert "--image " in shown["command"] and decode_frames(out / settings["video"]).shape[0] == family.FRAMES
    context.close()
