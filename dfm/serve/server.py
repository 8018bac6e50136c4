"""`dfm serve`: the HTTP side. The standard library's ThreadingHTTPServer answers the page, a small JSON API and the
generated files; one Worker (dfm.serve.jobs) runs the generations in order.

    GET  /                    the page
    GET  /api/model?name=M    M's defaults, samplers, the frame counts and size step it takes (or {"error"})
    POST /api/generate        the form as JSON -> {"id"} (queued), or 400 {"error": one line}
    GET  /api/jobs/ID         {"state": queued | running | done | error, "ahead", "step", "steps", "result", ...}
    GET  /files/NAME          a file of the output folder (Range requests answered, for <video>)
"""

from __future__ import annotations

import errno
import json
import mimetypes
import re
import signal
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from dfm.errors import UserError, first_line
from dfm.pipeline.commands import resolve_device, set_threads
from dfm.pipeline.folders import DEFAULT_MODEL
from dfm.serve.jobs import Models, ServeError, Worker, shipped_models
from dfm.serve.page import render

FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+\.(mp4|png|json)$")
MAX_BODY = 64 << 20  # the form, and its images as data URLs


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the polling would fill the log: only what is not a 2xx/3xx/206
        if len(args) > 1 and str(args[1])[:1] in "45":
            sys.stderr.write(f"dfm serve: {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        url = urlsplit(self.path)
        try:
            if url.path == "/":
                page = render(self.server.models_list, self.server.model)
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if url.path == "/api/model":
                name = parse_qs(url.query).get("name", [DEFAULT_MODEL])[0]
                return self._json(200, self.server.worker.models.describe(name))
            if url.path.startswith("/api/jobs/"):
                status = self.server.worker.status(url.path.rsplit("/", 1)[1])
                return self._json(200, status) if status else self._json(404, {"error": "no such job"})
            if url.path.startswith("/files/"):
                return self._file(unquote(url.path[len("/files/"):]))
            self._json(404, {"error": f"no page {url.path}"})
        except UserError as e:
            self._json(400, {"error": first_line(e)})

    do_HEAD = do_GET

    def do_POST(self):
        if urlsplit(self.path).path != "/api/generate":
            return self._json(404, {"error": f"no page {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._json(413, {"error": f"the request is over {MAX_BODY >> 20} MiB; choose a smaller image"})
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
            job = self.server.worker.submit(data)
        except json.JSONDecodeError as e:
            return self._json(400, {"error": f"the request is not JSON ({e})"})
        except UserError as e:
            return self._json(400, {"error": first_line(e)})
        self._json(200, {"id": job.id})

    def _file(self, name: str) -> None:
        path = self.server.worker.out_dir / name
        if not FILE_NAME.match(name) or not path.is_file():
            return self._json(404, {"error": f"no file {name}"})
        data = path.read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        ranged = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
        if ranged and (ranged[1] or ranged[2]):  # what <video> asks for: one byte range
            start = int(ranged[1]) if ranged[1] else max(0, len(data) - int(ranged[2]))
            end = min(len(data) - 1, int(ranged[2])) if ranged[1] and ranged[2] else len(data) - 1
            if start > end:
                return self._send(416, b"", kind, {"Content-Range": f"bytes */{len(data)}"})
            return self._send(206, data[start:end + 1], kind,
                              {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"})
        self._send(200, data, kind, {"Accept-Ranges": "bytes"})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, worker: Worker, model: str):
        super().__init__(address, Handler)
        self.worker, self.model, self.models_list = worker, model, shipped_models()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # the browser went away (a <video> dropping a range)
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(host: str = "127.0.0.1", port: int = 7860, model: str = DEFAULT_MODEL, out_dir="outputs/serve",
                device: str = "cpu", dtype: str = "fp32", auto_threads: bool = True) -> Server:
    """A server with its worker; `model` is loaded first (a bad one is a ServeError before anything listens)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    worker = Worker(Models(device, torch_dtype), Path(out_dir), device, dtype, auto_threads=auto_threads)
    worker.models.describe(model)
    try:
        return Server((host, port), worker, model)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is in use; pass --port N (0: any free port)") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --host or --port") \
                from None
        raise


def cmd_serve(args) -> int:
    set_threads(args.threads)
    server = make_server(args.host, args.port, args.model, args.out_dir, resolve_device(args.device), args.dtype,
                         auto_threads=not args.threads)
    print(f"dfm serve: {server.url} (files in {args.out_dir}; Ctrl-C stops)", flush=True)
    previous = signal.signal(signal.SIGTERM, _stop)  # `kill`, a service manager: a clean stop, as Ctrl-C
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("dfm serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="a web page for generating videos",
                       description="Serve a local web page for generating videos: prompt, negative prompt, sampler, "
                                   "steps, guidance, seed, frames and size, the model, a LoRA file and scale, and the "
                                   "first / last image where the model takes them; one queue, videos one after "
                                   "the other. Each video goes to --out-dir with its contact sheet and a JSON of its "
                                   "settings (and the equivalent dfm generate command); nothing there is "
                                   "overwritten.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model picked first (default {DEFAULT_MODEL}); the "
                   "page offers the shipped models and any folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port, printed)")
    p.add_argument("--out-dir", default="outputs/serve", help="where the videos go (default outputs/serve)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="transformer precision")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic, as dfm generate)")
    p.set_defaults(func=cmd_serve)
