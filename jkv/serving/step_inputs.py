"""The inputs of the engine's mixed step after ``(params, cache)``: the host's arrays of each step (tokens, where
each row's token comes from, the slots' token counts, verify flags and slot resets) moved to the device in one
copy (``jkv.serving.mixed.pack``; each slot's token index for its random key only where some slot samples), and the
slots' sampling rows, kept on the device until a slot changes hands. ``draw`` tells the engine which sampling
program (``jkv.serving.mixed.sample_step``) a step's logits go to, if any."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jkv.serving.mixed import pack
from jkv.serving.sampling import SamplingParams, sampling_rows

SlotParams = Callable[[], list[SamplingParams | None]]
SAMPLING_INPUTS = slice(2, None)  # the step inputs sample_step takes too: key_data, index, temperature, top_k, top_p


class StepInputs:
    """The step inputs of an engine of ``num_slots`` slots. ``no_tokens``: the device's token ids of a step that
    ran none (the previous tokens of the first step), placed as the engine's steps return them. The methods that
    build inputs take ``slot_params()``, each slot's ``SamplingParams`` (None for a free slot), called only after
    :meth:`slots_changed` (a callable, not kept: an engine holding this object stays free of reference cycles)."""

    def __init__(self, num_slots: int, no_tokens):
        self.num_slots = num_slots
        self.no_tokens = no_tokens
        self.resets = np.zeros(num_slots, bool)  # slots to empty at the start of the next step
        self.draw = None  # some slot samples: "truncate" (top-k / top-p) or "all" tokens; None: none (with _rows)
        self._rows = None  # device copies of the slots' sampling parameters, until a slot changes
        self._no_index = None  # the index of a step where no slot samples (not read): zeros, copied once
        self._greedy = None  # the sampling rows of idle slots, copied once: what a step where none samples takes

    def slots_changed(self) -> None:
        """A slot took or let go of a request: its sampling row is rebuilt with the next step's inputs."""
        self._rows = None

    def build(self, slot_params: SlotParams, tokens, src, prev, counts=None, verify=None, index=None) -> tuple:
        """The mixed step's inputs after ``(params, cache)``, as device arrays: ``tokens`` and ``src`` ``[T]``,
        then per slot ``counts``, ``verify`` and the resets, packed into one array; ``prev`` (the previous step's
        token ids on the device); the sampling rows with ``index`` (zeros where None)."""
        b = self.num_slots
        counts = np.zeros(b, np.int32) if counts is None else counts
        verify = np.zeros(b, bool) if verify is None else verify
        key_data, temperature, top_k, top_p = self._sampling_rows(slot_params)
        packed = jnp.asarray(pack(tokens, src, counts, verify, self.resets))  # (a copy: resets are cleared later)
        if self.draw is None:  # no slot samples: the index is not read
            if self._no_index is None:
                self._no_index = jnp.zeros(b, jnp.int32)
            index = self._no_index
        else:
            index = jnp.asarray(np.zeros(b, np.int32) if index is None else index)
        return packed, prev, key_data, index, temperature, top_k, top_p

    def empty(self, slot_params: SlotParams, bucket: int) -> tuple:
        """The inputs of a step of ``bucket`` rows carrying no token (it compiles that bucket's step and changes
        nothing in the cache)."""
        return self.build(slot_params, np.zeros(bucket, np.int32), np.full(bucket, -1, np.int32), self.no_tokens)

    def _sampling_rows(self, slot_params: SlotParams):
        if self._rows is None:
            params = slot_params()
            if not any(p is not None and p.temperature > 0 for p in params):  # greedy: the rows are not read
                self.draw = None
                if self._greedy is None:
                    key_data, _, *rest = sampling_rows([None] * self.num_slots, [0] * self.num_slots)
                    self._greedy = tuple(jnp.asarray(x) for x in (key_data, *rest))
                self._rows = self._greedy
                return self._rows
            key_data, _, temperature, top_k, top_p = sampling_rows(params, [0] * self.num_slots)
            self._rows = tuple(jnp.asarray(x) for x in (key_data, temperature, top_k, top_p))
            hot = temperature > 0  # some slot samples: its steps' tokens are drawn (sorted for top-k / top-p)
            truncated = (hot & ((top_k > 0) | (top_p < 1))).any()
            self.draw = "truncate" if truncated else "all"
        return self._rows
