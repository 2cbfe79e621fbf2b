"""Prefix cache (longest-prefix lookup, LRU by bytes) and prompt-lookup drafts."""

import pytest

from jkv.serving.prefix import PrefixCache
from jkv.serving.speculative import prompt_lookup_draft


def test_lookup_picks_longest_cached_prefix_and_counts():
    pc = PrefixCache(max_bytes=100)
    pc.insert([1, 2], "ab", 10)
    pc.insert([1, 2, 3, 4], "abcd", 10)
    pc.insert([9], "z", 10)
    assert pc.lookup([1, 2, 3, 4, 5]) == (4, "abcd")
    assert pc.lookup([1, 2, 3]) == (3, "abcd")  # the longest common prefix: 3 of "abcd"'s 4 tokens
    assert pc.lookup([1, 2, 8, 9]) == (2, "abcd")  # a tie between [1, 2] and [1, 2, 3, 4]: most recent wins
    pc.lookup([1, 2])  # exact key: both share 2; [1, 2, 3, 4] was used last
    assert pc.lookup([1, 2, 3, 4]) == (4, "abcd")
    assert pc.lookup([7, 1, 2]) == (0, None)
    assert (pc.hits, pc.misses) == (5, 1)
    assert [1, 2] in pc and [1] not in pc and len(pc) == 3
    assert not pc.insert([1, 2], "again", 10)  # already there: not stored, the caller keeps its snapshot
    assert pc.lookup([1, 2]) == (2, "ab") and pc.bytes == 30


def test_min_tokens_and_eviction_callback():
    evicted = []
    pc = PrefixCache(max_bytes=20, min_tokens=3, on_evict=evicted.append)
    assert not pc.insert([1, 2], "short", 5)  # under min_tokens: refused
    pc.insert([1, 2, 3, 4], "a", 10)
    assert pc.lookup([1, 2, 9, 9]) == (0, None)  # shares 2 < min_tokens
    assert pc.lookup([1, 2, 3, 9]) == (3, "a")
    pc.insert([5, 6, 7], "b", 10)
    pc.insert([8, 8, 8], "c", 10)  # evicts "a"
    assert evicted == ["a"]
    pc.clear()
    assert sorted(evicted) == ["a", "b", "c"] and pc.bytes == 0


def test_lru_eviction_respects_byte_budget():
    pc = PrefixCache(max_bytes=30)
    for i in range(3):
        assert pc.insert([i], i, 10)
    pc.lookup([0])  # 0 becomes most recent; 1 is now least recent
    assert pc.insert([5], 5, 15)  # needs 15: evicts 1, then 2
    assert [0] in pc and [5] in pc and [1] not in pc and [2] not in pc
    assert pc.bytes == 25 and pc.evictions == 2
    assert not pc.insert([6], 6, 31)  # larger than the whole budget: refused, nothing evicted
    assert pc.bytes == 25
    pc.clear()
    assert len(pc) == 0 and pc.bytes == 0


@pytest.mark.parametrize(
    "tokens, k, expect",
    [
        ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # trigram match
        ([5, 6, 7, 5, 6, 8, 5, 6], 3, [8, 5, 6]),  # latest earlier match of "5 6" wins
        ([1, 2, 3, 4], 3, []),  # no repeat
        ([4, 4], 5, [4]),  # unigram, draft runs to the end of the history
        ([], 2, []),
    ],
    ids=["trigram", "latest-match", "none", "unigram", "empty"],
)
def test_prompt_lookup_draft(tokens, k, expect):
    assert prompt_lookup_draft(tokens, k) == expect


def test_errors():
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int, got -1"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="min_tokens must be a positive int, got 0"):
        PrefixCache(10, min_tokens=0)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        prompt_lookup_draft([1], 0)
    with pytest.raises(ValueError, match="min_ngram=3, max_ngram=2"):
        prompt_lookup_draft([1], 1, max_ngram=2, min_ngram=3)
