"""Windowed families on per-layer cache plans (full layers keep every position, windowed layers a ring) against HF
transformers (float32, CPU, random weights; the helpers of test_families): logits after a ragged prefill and
over 32 decode steps, greedy tokens, a speculative-style rollback after the rings have wrapped, with contiguous
and paged plans (tests/serving/test_families_engine.py runs the engine on plans: concurrencies 1, 2 and 4, prefix
hits and drafts)."""

import re

import jax
import numpy as np
import pytest
from conftest import rel_err
from helpers_families import (
    flat_columns,
    flat_forced,
    forced_logits,
    loaded_family,
    padded_prompts,
    teacher_forced,
)
from test_families import STEPS, WINDOW

import jkv
from jkv.models import llama

SLACK = 12  # the padded prefill writes max(PROMPTS) = 11 tokens per sequence in one step
PAGE = 4  # small pages: a ring of window - 1 + slack = 19 positions is 6 pages, reused every few steps
XLA = llama.LlamaOptions(impl="xla")


@pytest.fixture(scope="module", params=["mistral", "gemma2", "gemma3"])
def family(request, tmp_path_factory):
    return loaded_family(request.param, tmp_path_factory)


def plan_cache(kind, config, batch, max_len=64):
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_len)
    return jkv.make_cache(kind, spec, batch, windows=config.windows, slack=SLACK, page_size=PAGE)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_matches_hf(family, kind):
    """Ragged prefill, decode steps fed HF's greedy tokens (one compiled scan), and at step 20 (rings wrapped) a
    3-token step whose last token is wrong, rolled back by one across the wrap: logits and argmax against HF's.
    Contiguous: ``llama.prefill``, ``decode_step`` and ``forward``; paged: the serving step's form (flat steps of
    32 rows, the prefill and every step one compiled program)."""
    name, loaded, prompts, refs = family
    if (name, kind) in (("gemma2", "paged"), ("gemma3", "f32")):
        pytest.skip("both layouts on Mistral; one each on Gemma 2 and 3 (CI time)")
    c = loaded.config
    padded, lengths = padded_prompts(prompts)
    cache = plan_cache(kind, c, len(prompts))
    assert isinstance(cache, jkv.caches.PlannedCache) and [w for w, _ in cache.plan.groups] == sorted(
        set(c.windows), key=lambda w: -1 if w is None else w
    )
    tokens = np.array([t for t, _ in refs])  # (B, STEPS)
    if kind == "paged":
        columns = flat_columns(prompts, tokens[:, :-1], wrong_at=20)
        logits, cache = flat_forced(loaded.params, cache, *columns, config=c, options=XLA, rollback=True)
        logits, steps = forced_logits(logits, wrong_at=20)
    else:
        logits, steps, cache = teacher_forced(
            loaded.params, cache, padded, lengths, tokens[:, :-1], config=c, options=XLA, wrong_at=20
        )
        logits, steps = np.asarray(logits), np.asarray(steps)
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(logits, want) < 1e-5
    assert (logits.argmax(-1) == tokens[:, 0]).all()
    for j in range(STEPS - 1):  # columns 20 and 21: the 3-token step's first two rows
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(steps[:, j], want) < 1e-5, j
        assert (steps[:, j].argmax(-1) == tokens[:, j + 1]).all(), j
    np.testing.assert_array_equal(cache.lengths, lengths + STEPS - 1)
    cache.check()
    assert int(cache.lengths.min()) > WINDOW - 1 + SLACK  # every ring wrapped


def test_padded_decode_on_the_pallas_decode_kernels(family):
    """Gemma 2 (window and soft cap) on a contiguous plan, Pallas path (interpret mode): each padded T = 1 step
    runs the decode kernels (the full layers' contiguous one with the write fused, the rings' paged one) with the
    window and the cap, never the multi-token kernel; logits and greedy tokens against HF's over 20 steps, past
    the rings' wrap."""
    name, loaded, prompts, refs = family
    if name != "gemma2":
        pytest.skip("one family with windows and a soft cap runs the decode kernels in interpret mode")
    c, options = loaded.config, llama.LlamaOptions(impl="pallas")
    padded, lengths = padded_prompts(prompts)
    cache = plan_cache("f32", c, len(prompts))
    tokens = np.array([t for t, _ in refs])[:, :21]  # (B, 21): 20 decode steps, and the token each should pick
    jaxpr = jax.make_jaxpr(lambda cache, t: llama.decode_step(loaded.params, cache, t, config=c, options=options))
    names = set(re.findall(r"name=(jkv_\w+)", str(jaxpr(cache, tokens[:, 0]))))
    assert {"jkv_decode_attention_append", "jkv_paged_attention"} <= names  # full layers: write fused into attention
    assert not any("multi_token" in n for n in names), names
    _, steps, cache = teacher_forced(loaded.params, cache, padded, lengths, tokens[:, :-1], config=c, options=options)
    steps = np.asarray(steps)
    for j in range(steps.shape[1]):
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(steps[:, j], want) < 1e-5, j
        assert (steps[:, j].argmax(-1) == tokens[:, j + 1]).all(), j
    assert int(cache.lengths.min()) > WINDOW - 1 + SLACK  # every ring wrapped
