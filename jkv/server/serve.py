"""Running the app under uvicorn, with a drain on SIGINT / SIGTERM.

On the first signal uvicorn stops listening and waits up to ``drain_s`` for open responses (running streams) to
end while the engine keeps stepping; requests still arriving on open connections get 503. Streams still open
after ``drain_s`` are cut, their engine requests cancelled, and the process exits. A second signal exits at once.
"""

from __future__ import annotations

import uvicorn

from jkv.serving import SamplingParams


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that also tells the app's worker to refuse new requests when asked to exit."""

    def __init__(self, config: uvicorn.Config, worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        self.worker.stop_accepting()
        super().handle_exit(sig, frame)


def make_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_s: float = 30.0,
    log_level: str = "info",
    configure_logging: bool = True,
):
    """A ``DrainingServer`` for ``app`` (from ``create_app``); ``await server.serve()`` or ``server.run()``.

    ``configure_logging``: install uvicorn's logging configuration (as ``jkv serve`` does). A process that embeds
    the server and has its own logging passes False: ``logging.config.dictConfig`` closes every handler already
    installed (a test runner's log capture among them); only the levels are set then."""
    log_config = uvicorn.config.LOGGING_CONFIG if configure_logging else None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        timeout_graceful_shutdown=drain_s,
        lifespan="on",
    )
    return DrainingServer(config, app.state.worker)


def warm_up(engine) -> None:
    """Compile the engine's steps before the first client waits on them: a two-token request through the loop."""
    compile_all = getattr(engine, "compile_all", None)
    if compile_all is not None:
        compile_all(progress=False)
    engine.generate([[0]], SamplingParams(max_new_tokens=2), show_progress=False)
