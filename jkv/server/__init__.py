"""``jkv serve``: an OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn + prometheus-client).

app.py         create_app / ServerOptions: the routes, error bodies, prompt and budget checks
generation.py  one request on the event loop: tokens to text, response bodies and server-sent events
worker.py      the engine's one thread: submissions, cancellations, token delivery to the event loops
text.py        streaming detokenization (whole characters) and stop strings
schemas.py     request bodies and OpenAI-style errors
metrics.py     the Prometheus metrics (a registry per app)
serve.py       uvicorn with a drain on SIGINT / SIGTERM; warm-up compiles

Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from jkv.server.app import ServerOptions, create_app
from jkv.server.serve import DrainingServer, make_server, warm_up
from jkv.server.worker import QueueFull, Worker, cancel_request

__all__ = [
    "DrainingServer",
    "QueueFull",
    "ServerOptions",
    "Worker",
    "cancel_request",
    "create_app",
    "make_server",
    "warm_up",
]
