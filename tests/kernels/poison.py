"""NaN-poisoned kernel outputs for the kernel tests: elements a kernel fails to write stay NaN.

:func:`poisoned_outputs` wraps ``pallas_kernels.backend.pallas_call`` (through which every ``pallas_call`` kernel
launches) so that each floating output not already aliased to an input starts as a NaN-filled buffer aliased to
it; the kernel body never sees the extra inputs. It clears JAX's caches on entry, so kernels traced before (without
the poison) are traced again. Interpret mode on a CPU also starts outputs as NaN; this makes the GPU lowering do
the same.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import backend


def _poisoning(pallas_call):
    def call(kernel, *, out_shape, in_specs, out_specs, input_output_aliases=None, **kwargs):
        single = not isinstance(out_shape, (list, tuple))
        outs = [out_shape] if single else list(out_shape)
        specs = [out_specs] if single else list(out_specs)
        aliases = dict(input_output_aliases or {})
        taken = set(aliases.values())
        fresh = [i for i, o in enumerate(outs) if i not in taken and jnp.issubdtype(o.dtype, jnp.floating)]
        num_in = len(in_specs)

        def body(*refs):  # drop the poison inputs: the kernel sees its own inputs and outputs
            return kernel(*refs[:num_in], *refs[num_in + len(fresh) :])

        launch = pallas_call(
            body,
            out_shape=out_shape,
            in_specs=[*in_specs, *(specs[i] for i in fresh)],
            out_specs=out_specs,
            input_output_aliases=aliases | {num_in + n: i for n, i in enumerate(fresh)},
            **kwargs,
        )
        return lambda *inputs: launch(*inputs, *(jnp.full(outs[i].shape, jnp.nan, outs[i].dtype) for i in fresh))

    return call


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block, ``pallas_call`` kernels write into NaN-filled output buffers."""
    original = backend.pallas_call
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "pallas_call", _poisoning(original))
        try:
            yield
        finally:
            jax.clear_caches()
