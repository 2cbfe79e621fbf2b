"""Rings: the pages a windowed layer group keeps (``PagedKVCache(..., ring=Ring(window, slack))``).

A layer that attends to its last ``window`` positions needs nothing older, so its group releases the pages that
fall out of reach at each ``begin`` and reuses them: a ring buffer whose cells are pages. The rule, per sequence
at ``lengths = L`` beginning a step of ``c`` tokens:

* the group keeps every position from ``keep_from(L, c) = min(L, L + c - slack) - window + 1`` on (whole pages;
  the pages wholly before it go back to the pool before the step's pages are taken), that is the step's reads
  (each query sees ``window`` positions) and ``slack`` positions behind the step's end for rollbacks;
* so a rollback of at most ``slack`` positions below ``lengths + counts`` always succeeds; a deeper one is
  refused (``ERR_WINDOW``, nothing touched) unless it goes to 0 or every position it needs is still held;
* ``bounded`` (a contiguous plan's ring: a fixed pool of ``pages_per_sequence`` pages per slot): a step of more
  than ``slack`` tokens is refused (count 0, ``ERR_WINDOW``), so a sequence never holds more than
  ``cdiv(window - 1 + slack, page_size) + 1`` pages and the pool never runs out. Unbounded (a paged plan) a longer
  step (a prompt chunk) holds ``window - 1 + count`` positions for that step, from the shared pool.

In ring terms: capacity ``window - 1 + slack`` positions (rounded to pages), ``slack`` covering the most tokens one
step writes and the deepest rollback.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jkv.caches import pool


class Ring(NamedTuple):
    """Static: the window of the group's layers, the slack (most tokens per step and deepest rollback) and whether
    longer steps are refused (``bounded``)."""

    window: int
    slack: int
    bounded: bool = True

    def check(self) -> Ring:
        for name in ("window", "slack"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Ring.{name} must be a positive int, got {value!r}")
        return self

    @property
    def capacity(self) -> int:
        """Positions a sequence keeps between steps (the ring's length before rounding to pages)."""
        return self.window - 1 + self.slack

    def pages_per_sequence(self, page_size: int, count: int | None = None) -> int:
        """Most pages one sequence holds during a step of at most ``count`` tokens (default ``slack``)."""
        count = self.slack if count is None else max(count, self.slack)
        return pool.cdiv(self.window - 1 + count, page_size) + 1

    def keep_from(self, lengths, counts):
        """First position each sequence keeps for a step of ``counts`` at ``lengths`` (may be negative: all)."""
        return jnp.minimum(lengths, lengths + counts - self.slack) - self.window + 1

    def first_page(self, lengths, counts, page_size: int):
        """First logical page kept (``keep_from`` rounded down to a page)."""
        return jnp.maximum(self.keep_from(lengths, counts), 0) // page_size

    def can_roll_back(self, new, tables, page_size: int):
        """``[B]``: rolling back to ``new`` leaves every position a query at ``new`` reads in a held page
        (``new == 0``: nothing to read)."""
        held = tables >= 0
        first = jnp.where(jnp.any(held, axis=1), jnp.argmax(held, axis=1) * page_size, 0)
        return (new == 0) | (jnp.maximum(new - self.window + 1, 0) >= first)

    def read_page(self, lengths, page_size: int):
        """First logical page a step at ``lengths`` reads (what an attached prefix must hold)."""
        return jnp.maximum(lengths - self.window + 1, 0) // page_size
