"""jkv.xla_flags: the recommended GPU flags are added to XLA_FLAGS, never over a user's own setting."""

import warnings

import jax.numpy as jnp

from jkv import xla_flags


def test_adds_command_buffers_unless_the_user_set_them():
    env = {}
    assert xla_flags.apply_recommended(env) == [xla_flags.COMMAND_BUFFER]
    assert env["XLA_FLAGS"] == xla_flags.COMMAND_BUFFER
    assert xla_flags.apply_recommended(env) == [] and env["XLA_FLAGS"] == xla_flags.COMMAND_BUFFER  # idempotent
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_flags.apply_recommended(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_flags.COMMAND_BUFFER}"
    env = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}  # the user's choice (off) stands
    assert xla_flags.apply_recommended(env) == [] and env["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer="


def test_too_late_once_jax_has_started(monkeypatch):
    jnp.ones(1).block_until_ready()  # backends are up
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xla_flags.apply_recommended() == []
    assert "already started" in str(caught[0].message)
    assert xla_flags.apply_recommended(warn=False) == []
