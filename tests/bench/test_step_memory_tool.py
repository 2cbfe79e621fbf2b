"""bench/step_memory.py: the buffer-assignment parser, and a CPU run over a two-layer SmolLM2-shaped engine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the bench package

from bench import step_memory

DUMP = """BufferAssignment:
allocation 0: size 2147483648, parameter 3, shape |bf16[2,8]| at ShapeIndex {}, maybe-live-out:
 value: <10 cache_pages_0_.1 @0> (size=2147483648,offset=0): bf16[32,21541,8,16,128]{4,3,2,1,0}
 value: <11 input_scatter_fusion.3 @0> (size=2147483648,offset=0): bf16[32,21541,8,16,128]{4,3,2,1,0}
allocation 1: size 4096, output shape is |s32[64]|, maybe-live-out:
 value: <12 fusion.1 @0> (size=256,offset=0): s32[64]{0}
allocation 2: size 3221225472, preallocated-temp:
 value: <13 copy.7 @0> (size=3221225472,offset=0): bf16[32,21541,8,16,128]{4,3,2,1,0}
 value: <14 fusion.9 @0> (size=1024,offset=0): f32[256]{0}
"""


def test_allocations_keeps_the_large_ones_and_their_large_values():
    found = step_memory.allocations(DUMP)
    assert [size for size, _, _ in found] == [2 << 30, 3 << 30]
    assert found[0][1].startswith("parameter 3") and len(found[0][2]) == 2
    assert found[1][1] == "preallocated-temp" and found[1][2] == [DUMP.splitlines()[-2].strip()]


def test_cpu_run_reports_each_bucket_with_the_cache_aliased(capsys):
    rows = step_memory.main(["--model", "smollm2-135m", "--layers", "2", "--slots", "4", "--max-len", "256",
                             "--buckets", "16", "32"])  # fmt: skip
    assert [r["bucket"] for r in rows] == [16, 32]
    for r in rows:
        assert r["aliased_gib"] > 0 and r["aliased_gib"] <= r["outputs_gib"] and r["scratch_gib"] > 0
    out = capsys.readouterr().out
    assert "paged cache of" in out and out.rstrip().splitlines()[-1].split()[0] == "32"


def test_weight_sized_counts_copies_of_a_weight_outside_the_parameters():
    import numpy as np

    text = """BufferAssignment:
allocation 0: size 8388608, parameter 1, shape |f32[1024,2048]| at ShapeIndex {}:
 value: <1 params_wo.1 @0> (size=8388608,offset=0): f32[1024,2048]{1,0}
allocation 1: size 16777216, preallocated-temp:
 value: <2 copy.3 @0> (size=8388608,offset=0): f32[2048,1024]{1,0}
 value: <3 fusion.4 @0> (size=8388608,offset=8388608): f32[1024,2,1024]{2,1,0}
 value: <4 fusion.5 @0> (size=4194304,offset=0): bf16[1024,2048]{1,0}
 value: <5 fusion.6 @0> (size=4096,offset=0): f32[1024]{0}
"""
    weights = [np.zeros((1024, 2048), np.float32), np.zeros((4, 4), np.float32)]
    assert step_memory.weight_sized(text, weights) == (2, 2 * 8388608)  # not the parameter, the bf16 or the vector
