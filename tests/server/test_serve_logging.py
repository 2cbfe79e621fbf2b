"""``make_server(configure_logging=False)`` leaves the process's logging alone: uvicorn's dictConfig would close
every handler already installed (a test runner's log capture, an application's log file)."""

import logging

import pytest

pytest.importorskip("uvicorn")
from fastapi import FastAPI

from jkv.server import make_server


def test_existing_log_handlers_survive_an_embedded_server(tmp_path):
    """(With ``configure_logging=True`` the handler's stream is closed: not run here, it would close this test
    process's own log capture too.)"""
    app = FastAPI()
    app.state.worker = None
    handler = logging.FileHandler(tmp_path / "app.log")
    logging.getLogger().addHandler(handler)
    try:
        make_server(app, port=0, configure_logging=False)
        assert handler.stream is not None and not handler.stream.closed
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
