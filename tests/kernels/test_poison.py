"""The kernel tests' NaN-poisoned outputs (tests/kernels/poison.py): a kernel that skips part of its output leaves
NaN there, one that writes everything is unaffected, and outputs aliased to inputs are left alone."""

import jax
import jax.numpy as jnp
import numpy as np
from poison import poisoned_outputs

from pallas_kernels import backend, common


def _launch(x, *, write_all: bool, alias: bool = False):
    def kernel(x_ref, *refs):  # refs: o (or y, o, y_out with the alias)
        o_ref = refs[1] if alias else refs[0]
        half = x_ref.shape[0] // 2
        o_ref[:half] = x_ref[:half] * 2
        if write_all:
            o_ref[half:] = x_ref[half:] * 2
        if alias:  # the output aliased to y: its first row only
            refs[2][0:1] = x_ref[0:1]

    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] * (2 if alias else 1)
    inputs = [x, x + 1] if alias else [x]
    return backend.pallas_call(
        kernel,
        interpret=True,
        num_warps=1,
        num_stages=1,
        grid=(1,),
        in_specs=[common.whole(a.shape) for a in inputs],
        out_specs=[common.whole(o.shape) for o in out_shape],
        out_shape=out_shape,
        input_output_aliases={1: 1} if alias else {},
    )(*inputs)


def test_unwritten_output_is_nan():
    x = jnp.arange(16, dtype=jnp.float32).reshape(8, 2)
    with poisoned_outputs():
        (partial,) = _launch(x, write_all=False)
        (full,) = _launch(x, write_all=True)
        jaxpr = str(jax.make_jaxpr(lambda a: _launch(a, write_all=True))(x))
    assert np.isnan(np.asarray(partial[4:])).all() and (np.asarray(partial[:4]) == np.asarray(x[:4]) * 2).all()
    np.testing.assert_array_equal(np.asarray(full), np.asarray(x) * 2)
    assert "nan" in jaxpr  # the poisoned buffer is an input of the launch (the GPU lowering keeps it)


def test_aliased_outputs_keep_their_input():
    x = jnp.arange(16, dtype=jnp.float32).reshape(8, 2)
    with poisoned_outputs():
        out, aliased = _launch(x, write_all=True, alias=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
    want = np.asarray(x) + 1
    want[0] = np.asarray(x[0])
    np.testing.assert_array_equal(np.asarray(aliased), want)
