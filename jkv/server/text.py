"""Token ids to response text while streaming: whole characters only, special tokens skipped, stop strings cut.

Pieces come from the tokenizer's ``StreamDecoder`` (the one ``jkv generate`` streams with), fed through a view of
the tokenizer that skips special tokens, so a character split across byte tokens comes out whole and a streamed
answer reads like the whole answer decoded at once. Stop strings: text that could still become the start of a
stop string is held back until it cannot; once one appears, the text ends just before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from jkv.loading.tokenizer import StreamDecoder, Tokenizer


class _SkipSpecial:
    """The tokenizer as ``StreamDecoder`` sees it: decoding drops special tokens, as the final text does."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=True)


class TextStream:
    """Turns one request's token ids into text pieces: ``push(id)`` -> new text, ``finish()`` -> the rest.

    ``stopped`` becomes True when a stop string appeared; the text then ends just before it and further tokens add
    nothing. ``text`` is everything handed out so far.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._decoder = StreamDecoder(_SkipSpecial(tokenizer))
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1  # chars that may begin a stop string
        self._pending = ""  # decoded but held back (a stop string may start here)
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._pending + self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        """Text not yet handed out: bytes of an unfinished character at the end (as the whole decode shows them)
        and what stop strings held back."""
        if self.stopped:
            return ""
        whole = self._tokenizer.decode(self._decoder.ids, skip_special=True)
        emitted = self.text + self._pending
        tail = whole[len(emitted) :] if whole.startswith(emitted) else ""
        return self._release(self._pending + tail, final=True)

    def _release(self, text: str, final: bool) -> str:
        """Hand out ``text`` up to the first stop string, keeping back an end that may still begin one."""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._pending, text = True, "", text[:cut]
        elif final or not self._stop:
            self._pending = ""
        else:
            keep = self._hold_back(text)
            text, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        self.text += text
        return text

    def _hold_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
        for n in range(min(self._hold, len(text)), 0, -1):
            end = text[-n:]
            if any(s.startswith(end) for s in self._stop):
                return n
        return 0
