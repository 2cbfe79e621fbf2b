"""pallas_kernels.backend: the device facts the launch rules read, and their fallbacks off a GPU."""

import types

import jax
import pytest

from pallas_kernels import backend, common, decode_mgpu


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the default device is a CUDA GPU with the given attributes (the cached facts are re-read)."""

    def make(**attributes):
        monkeypatch.setattr(backend, "on_gpu", lambda: True)
        monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(**attributes)])
        backend.num_multiprocessors.cache_clear()
        backend.shared_memory_per_block.cache_clear()

    yield make
    backend.num_multiprocessors.cache_clear()
    backend.shared_memory_per_block.cache_clear()


@pytest.mark.skipif(backend.on_gpu(), reason="checks the fallback off a GPU")
def test_off_gpu_the_rules_see_the_measured_gpu():
    """Interpret mode launches as the H100/H200 the rules were measured on: the budgets of the code before the
    device was read (200 KiB of Triton K/V buffers, 220 KiB of Mosaic GPU ring)."""
    assert backend.num_multiprocessors() == 132
    assert backend.shared_memory_per_block() == 227 * 1024
    assert common.smem_budget() == 200 * 1024
    assert decode_mgpu.smem_budget() == 220 * 1024


def test_device_attributes_come_first(fake_gpu):
    fake_gpu(core_count=78, shared_memory_per_block_optin=101376, compute_capability="8.9")
    assert backend.num_multiprocessors() == 78
    assert backend.shared_memory_per_block() == 101376


@pytest.mark.parametrize(
    "capability,want", [("9.0", 227 * 1024), ("8.0", 163 * 1024), ("8.6", 99 * 1024), ("6.1", 227 * 1024)]
)
def test_shared_memory_by_compute_capability(fake_gpu, capability, want):
    """Without the device's figure, the CUDA guide's per-capability table; an unknown capability falls back."""
    fake_gpu(core_count=0, compute_capability=capability)
    assert backend.shared_memory_per_block() == want
    assert backend.num_multiprocessors() == backend.OFF_GPU_MULTIPROCESSORS  # a core count of 0 says nothing
