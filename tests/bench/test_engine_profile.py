"""bench/engine_profile.py's reading of a trace: kernel kinds and the idle gaps between activities."""

from __future__ import annotations

import pytest

from bench import engine_profile


def test_kernel_kinds_by_name():
    assert engine_profile.kind_of("jkv_multi_token_attention_mgpu_kernel") == "jkv"
    assert engine_profile.kind_of("nvjet_sm90_tss_96x64") == "matmul"
    assert engine_profile.kind_of("loop_add_fusion_61") == "fusion"
    assert engine_profile.kind_of("Memcpy HtoD") == "copy"
    assert engine_profile.kind_of("something_else") == "other"


def test_idle_gaps_sum_the_waits_between_activities_across_streams():
    us = 1000
    events = [  # two steps; the second stream's copy overlaps the first kernel, so it leaves no gap
        ("gemm_fusion_dot_1", 0, 10 * us),
        ("Memcpy HtoD", 2 * us, 12 * us),
        ("loop_add_fusion", 15 * us, 20 * us),  # 3 us after the copy's end
        ("loop_add_fusion", 20 * us + 500, 30 * us),  # 0.5 us: under the 2 us floor
        ("jkv_attention", 130 * us, 140 * us),  # 100 us: a wait for the host
        ("gemm_fusion_dot_1", 143 * us, 150 * us),  # 3 us after the jkv kernel
    ]
    gaps = engine_profile.idle_gaps(events, steps=2)
    assert gaps["idle_s"] == pytest.approx((3 + 100 + 3) * 1e-6 / 2)
    assert gaps["gaps"] == pytest.approx(1.5)
    top = gaps["top"]
    assert next(iter(top)) == "fusion -> jkv_attention"
    assert top["fusion -> jkv_attention"] == pytest.approx((50e-6, 0.5))
    assert top["copy -> loop_add_fusion"] == pytest.approx((1.5e-6, 0.5))
    assert top["jkv -> gemm_fusion_dot_1"] == pytest.approx((1.5e-6, 0.5))


def test_idle_gaps_of_no_events():
    assert engine_profile.idle_gaps([], steps=1) == {"idle_s": 0.0, "gaps": 0.0, "top": {}}
