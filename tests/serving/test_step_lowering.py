"""The serving step of each family's options lowers for CUDA on a CPU, with the kernels a Hopper GPU's dispatch
picks (Mosaic GPU where it can run, Triton elsewhere): a kernel that cannot take a family's head_dim, window, soft
cap or group would fail here, not first on a GPU (Gemma's head_dim 256 once did)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from test_step_memory import FAMILIES

from jkv.models import llama
from jkv.serving import Engine
from pallas_kernels import backend

# Each family's attention options at small widths (lowering does not depend on them), two layers where the
# pattern allows.
SHAPES = {name: dataclasses.replace(c, hidden_size=256, intermediate_size=256) for name, c in FAMILIES.items()}
SHAPES["phi3"] = llama.LlamaConfig(512, 192, 256, 2, 2, 1, 96, windows=(96, 96))


@pytest.fixture
def hopper_dispatch(monkeypatch):
    monkeypatch.setattr(backend, "gpu_backend", lambda: backend.TRITON)
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)


CASES = [("llama", "paged"), ("mistral", "paged"), ("gemma2", "default"), ("gemma2", "paged")]
CASES += [("gemma2", "q8-paged"), ("gemma3", "default"), ("phi3", "default"), ("phi3", "q8-paged")]


@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_mixed_step_lowers_for_cuda(hopper_dispatch, family, kind):
    config = SHAPES[family]
    params = llama.init_params(config, jax.random.key(0), jnp.bfloat16, scale=0.05)
    engine = Engine(
        params, config, num_slots=2, max_len=512, cache=kind, buckets=(256,), max_batch_tokens=256,
        model=llama.LlamaOptions(impl="pallas"), verbose=False,
    )  # fmt: skip
    traced = engine.steps.mixed_traced(engine.params, engine.cache, *engine.empty_step_inputs(256))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text or "xla.gpu.triton" in text
