"""Prompt-lookup drafts: guess the next tokens by finding the latest n-gram earlier in the sequence itself.

Speculative decoding without a draft model: when the text repeats its own context (code edits, summaries that
copy, extraction), the tokens that followed an earlier occurrence of the last ``n`` tokens are a cheap guess that
the target model then verifies in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence


def prompt_lookup_draft(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` draft tokens: what followed the most recent earlier match of the longest trailing n-gram.

    Tries n-gram sizes from ``max_ngram`` down to ``min_ngram``; returns ``[]`` when nothing matches.
    """
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram=}, {max_ngram=}")
    tokens = list(tokens)
    n_tok = len(tokens)
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        tail = tokens[n_tok - n :]
        # Latest earlier occurrence first: recent context is the better predictor.
        for start in range(n_tok - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []
