"""`dfm serve` without a browser: requests are checked as `dfm generate` checks them (one line each, nothing
queued), files are never overwritten, the command line the page shows makes the same video, and the HTTP side
(the page, the API, byte ranges for <video>, no way out of the output folder). The page in a real browser:
tests/test_serve_browser.py."""

from __future__ import annotations

import json
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dfm.cli import main
from dfm.serve import Models, ServeError, Worker, make_server, parse_request
from dfm.serve.jobs import reserve
from dfm.video import decode_frames, probe_video


def wait(worker: Worker, job_id: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = worker.status(job_id)
        if status["state"] in ("done", "error"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {worker.status(job_id)}")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return Worker(Models(), tmp_path_factory.mktemp("serve"))


def one_line_error(worker: Worker, data: dict) -> str:
    with pytest.raises(ServeError) as e:
        worker.submit(data)
    message = str(e.value)
    assert message and "\n" not in message
    return message


def test_bad_requests_are_one_line_and_never_queued(worker):
    queued = len(worker.jobs)
    assert "Prompt is empty" in one_line_error(worker, {"prompt": "  "})
    assert "Steps must be a whole number" in one_line_error(worker, {"prompt": "a", "steps": "ten"})
    assert "Seed 4294967296 is out of range" in one_line_error(worker, {"prompt": "a", "seed": "4294967296"})
    assert "1 + 2*n frames" in one_line_error(worker, {"prompt": "a", "frames": "4"})  # the VAE's message
    assert "divisible by 4" in one_line_error(worker, {"prompt": "a", "height": "10"})
    assert "unknown sampler 'nope'" in one_line_error(worker, {"prompt": "a", "sampler": "nope"})
    assert "guidance_scale must be in [0, 100]" in one_line_error(worker, {"prompt": "a", "guidance": "1e3"})
    assert "model folder no/such not found" in one_line_error(worker, {"prompt": "a", "model": "no/such"})
    assert "tokens long" in one_line_error(worker, {"prompt": "word " * 40})
    assert len(worker.jobs) == queued


def test_random_seed_is_drawn_and_recorded():
    seeds = {parse_request({"prompt": "a", "seed": "5", "seed_random": True})["seed"] for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
    assert parse_request({"prompt": "a", "seed": "5"})["seed"] == 5


def test_reserve_never_reuses_a_name(tmp_path):
    (tmp_path / "clip_s0.mp4").write_bytes(b"someone else's video")
    (tmp_path / "clip_s0_2.png").write_bytes(b"a sheet")
    assert reserve(tmp_path, "clip_s0").name == "clip_s0_3"
    names, lock = [], threading.Lock()

    def grab():
        stem = reserve(tmp_path, "clip_s0")
        with lock:
            names.append(stem.name)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and "clip_s0_3" not in names
    assert (tmp_path / "clip_s0.mp4").read_bytes() == b"someone else's video"


def test_the_shown_command_makes_the_same_video(worker, tmp_path, monkeypatch):
    """Every setting the page can set, none at its default; then the page's command line through the real CLI."""
    request = {"prompt": "the digit 5 moves down", "negative": "the digit 1", "sampler": "edm:dpmpp_2m",
               "steps": "5", "guidance": "2.5", "seed": "11", "frames": "7", "height": "16", "width": "20"}
    done = wait(worker, worker.submit(request).id)
    assert done["state"] == "done", done
    result = done["result"]
    folder = worker.out_dir
    record = json.loads((folder / result["json"]).read_text())
    assert record == {k: v for k, v in result.items() if k != "json"}
    assert (record["num_frames"], record["height"], record["width"], record["steps"]) == (7, 16, 20, 5)
    assert (record["sampler"], record["guidance_scale"], record["seed"]) == ("edm:dpmpp_2m", 2.5, 11)
    assert record["negative_prompt"] == "the digit 1"
    info = probe_video(folder / result["video"])
    assert (info.num_frames, info.height, info.width) == (7, 16 * 8, 20 * 8)  # written 8x larger, as dfm generate

    monkeypatch.chdir(tmp_path)  # the command writes outputs/NAME.mp4 from where it runs
    argv = shlex.split(result["command"])
    assert argv[:2] == ["dfm", "generate"] and "--out" in argv
    assert main(argv[1:] + ["--no-progress"]) == 0
    out = tmp_path / argv[argv.index("--out") + 1]
    assert np.array_equal(decode_frames(out), decode_frames(folder / result["video"]))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out.with_suffix(".png"))),
                          np.asarray(Image.open(folder / result["sheet"])))


def test_jobs_run_in_order_and_report_their_place(worker):
    first = worker.submit({"prompt": "the digit 1 moves up", "steps": "30", "frames": "5", "seed": "0"})
    second = worker.submit({"prompt": "the digit 2 moves up", "steps": "2", "frames": "5", "seed": "0"})
    assert worker.status(second.id)["ahead"] == 1
    a, b = wait(worker, first.id), wait(worker, second.id)
    assert a["state"] == b["state"] == "done"
    assert a["result"]["finished"] <= b["result"]["started"]
    assert (a["step"], a["steps"]) == (30, 30)


def fetch(url: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = make_server(port=0, out_dir=tmp_path_factory.mktemp("http"))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_page_api_and_files(server):
    assert server.server_address[0] == "127.0.0.1"  # this machine only, unless --host says otherwise
    status, headers, page = fetch(server.url)
    page = page.decode()
    assert status == 200 and '<label for="prompt">Prompt</label>' in page and ">Generate</button>" in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page  # fetches nothing from outside
    status, _, body = fetch(server.url + "api/generate", b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, _, body = fetch(server.url + "api/generate", json.dumps({"prompt": ""}).encode())
    assert status == 400 and json.loads(body) == {"error": "Prompt is empty: write what the video should show"}
    status, _, body = fetch(server.url + "api/generate", json.dumps({"prompt": "the digit 4 moves left",
                                                                     "steps": "3", "seed": "1"}).encode())
    assert status == 200
    job = json.loads(body)["id"]
    done = wait(server.worker, job)
    video = server.worker.out_dir / done["result"]["video"]
    status, headers, body = fetch(server.url + f"files/{video.name}")
    assert status == 200 and headers["Content-Type"] == "video/mp4" and body == video.read_bytes()
    status, headers, body = fetch(server.url + f"files/{video.name}", headers={"Range": "bytes=10-99"})
    assert status == 206 and body == video.read_bytes()[10:100]
    assert headers["Content-Range"] == f"bytes 10-99/{video.stat().st_size}"
    status, _, body = fetch(server.url + f"api/jobs/{job}")
    assert status == 200 and json.loads(body)["state"] == "done"
    for bad in ("..%2F..%2Fetc%2Fpasswd", "nothing.mp4", "x.py"):
        assert fetch(server.url + "files/" + bad)[0] == 404
    status, _, body = fetch(server.url + "api/model?name=models/dit_edm_digits")
    described = json.loads(body)
    assert status == 200 and described["paradigm"] == "edm" and described["samplers"][0].startswith("edm:")


def test_a_client_going_away_is_no_error(server, capsys):
    for error, logged in ((ConnectionResetError, False), (BrokenPipeError, False), (KeyError, True)):
        try:
            raise error("x")
        except Exception:
            server.handle_error(None, ("127.0.0.1", 1))
        assert ("Traceback" in capsys.readouterr().err) == logged


def test_cli_serve_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--model", "no/such", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfm serve: error: Model no/such: model folder no/such not found") and "\n" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dfm serve: error: port {port} on 127.0.0.1 is in use; pass --port N (0: any free port)"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random LoRA (every matrix nonzero, as after training) for the shipped Wan model, saved as dfm saves one."""
    import torch

    from dfm.models.lora import LoRA
    from dfm.models.lora_files import save_lora
    from dfm.pipeline import load_pipeline
    from dfm.pipeline.commands import model_path

    net = load_pipeline(model_path("models/wan_flow_digits")).transformer
    torch.manual_seed(3)
    lora = LoRA.create(net, rank=2, alpha=2.0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.2)
    return save_lora(net, lora, tmp_path_factory.mktemp("lora") / "digits_lora.safetensors")


def run_command(result: dict, cwd: Path, monkeypatch) -> Path:
    """The job's `dfm generate` command through the real CLI (a fresh pipeline) from `cwd`; its video."""
    monkeypatch.chdir(cwd)
    argv = shlex.split(result["command"])
    assert main(argv[1:] + ["--no-progress"]) == 0
    return cwd / argv[argv.index("--out") + 1]


def test_lora_job_then_a_plain_one(worker, lora_file, tmp_path, monkeypatch):
    """A job with a LoRA is `dfm generate --lora PATH:SCALE`; the next job without one gets the plain model's video
    (the cached pipeline's adapter was removed), equal to a fresh `dfm generate`."""
    request = {"prompt": "the digit 7 moves left", "steps": "3", "frames": "5", "seed": "2"}
    with_lora = wait(worker, worker.submit({**request, "lora": str(lora_file), "lora_scale": "0.7"}).id)
    plain = wait(worker, worker.submit(request).id)
    assert with_lora["state"] == plain["state"] == "done", (with_lora, plain)
    a, b = with_lora["result"], plain["result"]
    assert f"--lora {lora_file.resolve()}:0.7" in a["command"] and "--lora" not in b["command"]
    assert (a["lora"], a["lora_scale"]) == (str(lora_file.resolve()), 0.7) and "lora" not in b
    assert json.loads((worker.out_dir / a["json"]).read_text())["lora"] == str(lora_file.resolve())
    folder = worker.out_dir
    assert not np.array_equal(decode_frames(folder / a["video"]), decode_frames(folder / b["video"]))  # it acts
    for result, name in ((a, "lora"), (b, "plain")):
        (tmp_path / name).mkdir()
        out = run_command(result, tmp_path / name, monkeypatch)
        assert np.array_equal(decode_frames(out), decode_frames(folder / result["video"])), name
    assert "lora" not in worker.models.get("models/wan_flow_digits").source


def test_bad_lora_is_one_line(worker, lora_file, tmp_path):
    queued = len(worker.jobs)
    base = {"prompt": "a", "steps": "2"}
    assert "not found or not a .safetensors file" in one_line_error(worker, {**base, "lora": str(tmp_path / "x")})
    from safetensors.torch import save_file
    import torch

    junk = tmp_path / "junk.safetensors"
    save_file({"hello": torch.zeros(1)}, junk)
    assert "not a LoRA key" in one_line_error(worker, {**base, "lora": str(junk)})
    assert "LoRA for a Wan model" in one_line_error(worker, {**base, "model": "models/dit_edm_digits",
                                                             "lora": str(lora_file)})
    assert "LoRA file is empty" in one_line_error(worker, {**base, "lora_scale": "0.5"})
    assert "LoRA scale must be a number" in one_line_error(worker, {**base, "lora": str(lora_file),
                                                                    "lora_scale": "big"})
    assert "takes no image" in one_line_error(worker, {**base, "model": "models/dit_edm_digits",
                                                       "image": png_data_url()})  # a text-to-video model
    assert len(worker.jobs) == queued
    described = worker.models.describe("models/dit_edm_digits")
    assert (described["image"], described["last_image"]) == (None, None)


def png_data_url(size=(12, 10), seed: int = 0) -> str:
    import base64
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
