"""`dfm serve`: a local web page for generating videos, over the standard library's HTTP server.

    dfm serve [--model PATH] [--host 127.0.0.1] [--port 7860] [--out-dir outputs/serve]

The package: `jobs.py` (the form's fields, parsing and checking a request, the model cache, the one queue and its
worker, the files written), `page.py` (the page, drawn from the fields) and `server.py` (HTTP and the command).
Imports run server -> page -> jobs -> dfm.pipeline.
"""

from dfm.serve.jobs import FIELDS, Field, Models, ServeError, Worker, parse_request, shipped_models
from dfm.serve.server import add_commands, make_server  # dfm.cli registers `dfm serve` through add_commands

__all__ = ["FIELDS", "Field", "Models", "ServeError", "Worker", "add_commands", "make_server", "parse_request",
           "shipped_models"]
