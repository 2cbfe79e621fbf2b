"""bench/bench_prefill.py: its FLOP count, its paged copy of the cache (bench/prefill_peers.py), and a smoke run on
the CPU (tiny shapes, the XLA rows: the script's inputs, the split-and-merge form of the cuDNN row, its JSON lines
and table)."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import bench_prefill, prefill_peers


@pytest.mark.parametrize("name", list(bench_prefill.CASES))
def test_flops_count_the_causal_mask(name):
    case = bench_prefill.CASES[name]._replace(heads=(2, 1, 8))
    pos = case.cached + np.arange(case.new)
    keys = (np.arange(case.cached + case.new)[None, :] <= pos[:, None]).sum()  # attended (query, key) pairs
    assert bench_prefill.flops(case) == 4 * 8 * 2 * case.batch * keys


def test_paged_sets_hold_the_cache_under_a_permuted_table():
    case = bench_prefill.Case(2, 16, 8, 48, (4, 2, 8))
    sets, _ = bench_prefill.case_sets(case, seed=0, rotate_bytes=0)
    ((_, k_pool, v_pool, table, *_),) = prefill_peers.paged_sets(sets, seed=3)
    k, v = sets[0][1], sets[0][2]
    assert table.shape == (2, 48 // prefill_peers.PAGE_SIZE)
    assert sorted(np.asarray(table).ravel()) != list(np.asarray(table).ravel())  # permuted
    for pool, cache in ((k_pool, k), (v_pool, v)):
        gathered = pool[table]  # [B, pages, K, page, D]
        back = jnp.swapaxes(gathered, 1, 2).reshape(cache.shape)
        np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(cache, np.float32))


def test_smoke_run(tmp_path, capsys):
    bench_prefill.main(["--smoke", "--cases", "chunk-2k", "--out", str(tmp_path)])
    (line,) = (tmp_path / "bench_prefill.jsonl").read_text().splitlines()
    report = json.loads(line)
    assert report["case"] == "chunk-2k" and report["meta"]["smoke"]
    for row in ("xla", "xla_ref"):
        assert report["results"][row]["time_s"] > 0, report["results"][row]
    assert report["results"]["xla"]["rel_err"] < 2e-2  # prefix and new keys merged by their log-sum-exps
    assert report["results"]["xla_ref"]["rel_err"] == 0.0
    assert "chunk-2k" in capsys.readouterr().out.splitlines()[-1]  # the table comes last
