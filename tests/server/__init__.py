"""The server tests: a package, so that its conftest is ``server.conftest`` and never shadows tests/conftest.py."""
