"""The benchmarks' bookkeeping (no timing here): interleaved rounds, trace clustering (bench/common.py), and the
Mosaic GPU benchmark's sweep points."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_mgpu, common
from pallas_kernels import decode_mgpu


def test_interleaved_rotates_the_order_and_pairs_ratios_by_round():
    calls, clock = [], iter(range(100))
    drift = {}

    def sampler(name, base):
        def sample():
            calls.append(name)
            t = next(clock)
            drift.setdefault(name, []).append(t)
            return base * (1 + 0.01 * t)  # every sample later in the run is slower (a drifting clock)

        return sample

    samplers = {"a": sampler("a", 1.0), "b": sampler("b", 2.0), "c": sampler("c", 4.0)}
    out = common.interleaved(samplers, rounds=3, baseline="b")
    rounds = [calls[i : i + 3] for i in range(0, 9, 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]  # each variant first once
    for name, base in (("a", 1.0), ("b", 2.0), ("c", 4.0)):
        assert out[name]["samples_s"] == [base * (1 + 0.01 * t) for t in drift[name]]
    ratios = [out["b"]["samples_s"][r] / out["a"]["samples_s"][r] for r in range(3)]
    assert out["a"]["speed_vs_b"]["median"] == pytest.approx(sorted(ratios)[1])
    assert out["b"]["speed_vs_b"] == {"median": 1.0, "min": 1.0, "max": 1.0}


def test_device_spans_split_executions_at_gaps_over_a_millisecond():
    events = [(0, 1_000), (1_500, 3_000), (2_000, 2_500), (5_000_000, 5_004_000), (5_004_100, 5_010_000)]
    assert common.device_spans("/device:GPU", lambda prefix: iter(events)) == pytest.approx([3e-6, 10e-6])


def test_sweep_points():
    default = decode_mgpu.MgpuConfig(64, 16, 2)
    configs = bench_mgpu.sweep_configs(default, 1, 32768, ("64/x2/2", "64/x1/2", "64/x1/3", "64/x0.5/3"))
    assert [(c.block_k, c.num_splits, c.num_stages) for c in configs] == [(64, 32, 2), (64, 16, 3), (64, 8, 3)]
