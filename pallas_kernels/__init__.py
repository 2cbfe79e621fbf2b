"""Pallas GPU kernels for decode attention, taking and returning plain arrays (no dependency on ``jkv``)."""
