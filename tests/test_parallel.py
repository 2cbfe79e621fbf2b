"""jkv.parallel on 8 host CPU devices (``XLA_FLAGS`` set in tests/conftest.py): the mesh, its errors, the
active-mesh context, and a function run per shard against the same function on the whole arrays (docs/sharding.md's
example runs in tests/test_docs_examples.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jkv import parallel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")


@pytest.mark.parametrize("dp,tp", [(1, 1), (2, 4), (1, 8)], ids=str)
def test_make_mesh_shape_and_device_order(dp, tp):
    mesh = parallel.make_mesh(tp=tp, dp=dp)
    assert mesh.axis_names == (parallel.DP, parallel.TP) and parallel.mesh_sizes(mesh) == (dp, tp)
    # tp devices adjacent: a row of the grid is one tensor-parallel group.
    np.testing.assert_array_equal(mesh.devices.ravel(), jax.devices()[: dp * tp])


def test_make_mesh_takes_numpy_integers():
    """Sizes computed with NumPy (``np.int64``) are ints as the engine's options take them (were refused)."""
    mesh = parallel.make_mesh(tp=np.int64(2), dp=np.int32(2))
    assert parallel.mesh_sizes(mesh) == (2, 2) and all(type(n) is int for n in parallel.mesh_sizes(mesh))


MESH_ERRORS = {
    "too-many-devices": (dict(tp=4, dp=4), r"dp=4 x tp=4 needs 16 devices but only 8"),
    "zero-tp": (dict(tp=0), "tp must be a positive int, got 0"),
    "bool-dp": (dict(dp=True), "dp must be a positive int, got True"),
    "float-tp": (dict(tp=2.0), "tp must be a positive int, got 2.0"),
    "no-devices": (dict(tp=2, devices=[]), r"dp=1 x tp=2 needs 2 devices but only 0 are available"),
}


@pytest.mark.parametrize("name", list(MESH_ERRORS))
def test_make_mesh_errors_name_the_value(name):
    kwargs, message = MESH_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(**kwargs)


def test_use_mesh_nests_and_restores():
    outer, inner = parallel.make_mesh(tp=2), parallel.make_mesh(dp=2, tp=4)
    assert parallel.active_mesh() is None
    with parallel.use_mesh(outer):
        with parallel.use_mesh(inner):
            assert parallel.active_mesh() is inner
        assert parallel.active_mesh() is outer
        with pytest.raises(RuntimeError), parallel.use_mesh(inner):
            raise RuntimeError("the mesh is popped on the way out")
        assert parallel.active_mesh() is outer
    assert parallel.active_mesh() is None


def test_per_shard_matches_whole_arrays():
    """``fn`` run per shard on its local batch and heads gives what it gives on the whole arrays, when it is
    local along both (a per-row, per-head sum against a cache split like a contiguous one)."""
    mesh = parallel.make_mesh(tp=4, dp=2)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 8, 16)), jnp.float32)  # [B, N, D]
    k = jnp.asarray(rng.standard_normal((3, 4, 8, 5, 16)), jnp.float32)  # [L, B, K, S, D] with K = N here
    lengths = jnp.asarray([5, 1, 3, 2], jnp.int32)

    def fn(q, k, lengths, layer):
        mask = jnp.arange(k.shape[3])[None, None, :] < lengths[:, None, None]  # (B, 1, S)
        return q * jnp.sum(jnp.where(mask[..., None], k[layer], 0.0), axis=2)  # (B, N, D)

    want = fn(q, k, lengths, 1)
    got = parallel.per_shard(fn, mesh, (k,), (P(None, parallel.DP, parallel.TP, None, None),), q, lengths, 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert {s.data.shape for s in got.addressable_shards} == {(2, 2, 16)}


@pytest.mark.parametrize("axes", [("x",), ("tp",), ("dp",), ("data", "model")], ids=str)
def test_mesh_without_dp_and_tp_axes_is_refused_by_name(axes):
    """A user's own mesh lacking an axis jkv shards over: a ValueError naming the axes, not a KeyError."""
    devices = np.array(jax.devices()[:2]).reshape((2,) + (1,) * (len(axes) - 1))
    mesh = jax.sharding.Mesh(devices, axes)
    with pytest.raises(ValueError, match=re.escape(f"the mesh's axes {axes} lack")):
        parallel.mesh_sizes(mesh)
    # use_mesh refuses it on entry (kernels then failed inside shard_map: "must refer to an axis marked as manual")
    with pytest.raises(ValueError, match=re.escape(f"the mesh's axes {axes} lack")), parallel.use_mesh(mesh):
        pass
    assert parallel.active_mesh() is None
