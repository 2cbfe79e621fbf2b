"""SentencePiece vocabularies from GGUF (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral, Phi-3, Gemma),
encoded as llama.cpp encodes them, behind the few methods of a ``tokenizers.Tokenizer`` that
``jkv.loading.tokenizer.Tokenizer`` calls.

Encoding: control, user-defined and unknown tokens written in the text are cut out first (longest first) and map
to their ids; every other span gets a leading space when ``tokenizer.ggml.add_space_prefix`` (default true) and it
starts the text or follows such a token, spaces become ``▁``, and adjacent symbols (UTF-8 characters at first)
merge while their concatenation is a token, the highest score first (the leftmost of equal scores). A symbol that
is no token becomes its bytes' ``<0xXX>`` tokens. Decoding turns ``▁`` back into spaces and byte tokens into
bytes, drops control tokens and ids past the vocabulary (as ``tokenizers`` does), and with the space prefix strips
one leading space.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from typing import NamedTuple

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


class Encoding(NamedTuple):
    ids: list[int]


class SentencePieceBackend:
    """Pieces, their scores and GGUF token types (``tokens``, ``scores``, ``types`` of equal length)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], add_space_prefix=True):
        self.tokens, self.scores, self.types = list(tokens), [float(s) for s in scores], list(types)
        self.add_space_prefix = bool(add_space_prefix)
        self.ids = {}
        for i, token in enumerate(self.tokens):
            self.ids.setdefault(token, i)
        self.byte_of = {}  # byte token id -> its byte value
        for i, (token, kind) in enumerate(zip(self.tokens, self.types, strict=True)):
            if kind == TOKEN_BYTE:
                if not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                    raise ValueError(f"byte token {i} is {token!r}, not of the form <0xXX>")
                self.byte_of[i] = int(token[3:5], 16)
        self.bytes = {b: i for i, b in self.byte_of.items()}
        special = (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
        self.special = sorted((t for t, k in zip(self.tokens, types, strict=True) if k in special and t), key=len)
        self.special.reverse()  # longest first, as llama.cpp matches them
        self.unk = next((i for i, k in enumerate(types) if k == TOKEN_UNKNOWN), None)

    # -------------------------------------------------------------------- the tokenizers.Tokenizer surface
    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        ids, prev_special = [], True
        for piece, special in self._fragments(text):
            if special:
                ids.append(self.ids[piece])
            else:
                prefix = " " if self.add_space_prefix and prev_special else ""
                ids += self._merge((prefix + piece).replace(" ", SPACE))
            prev_special = special
        return Encoding(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.tokens):  # an id past the vocabulary (embeddings padded beyond it) has no text
                continue
            kind, token = self.types[i], self.tokens[i]
            if kind == TOKEN_BYTE:
                out.append(self.byte_of[i])
            elif kind == TOKEN_CONTROL:
                out += b"" if skip_special_tokens else token.encode()
            else:
                out += token.replace(SPACE, " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text

    # -------------------------------------------------------------------- llama.cpp's algorithm
    def _fragments(self, text: str):
        """``(piece, is_special)`` spans of ``text``, special tokens cut out longest first."""
        spans = [(text, False)] if text else []
        for token in self.special:
            cut = []
            for piece, special in spans:
                if special or token not in piece:
                    cut.append((piece, special))
                    continue
                parts = piece.split(token)
                for j, part in enumerate(parts):
                    if j:
                        cut.append((token, True))
                    if part:
                        cut.append((part, False))
            spans = cut
        return spans

    def _merge(self, text: str) -> list[int]:
        symbols = list(text)  # None: merged into its left neighbour
        left = list(range(-1, len(symbols) - 1))
        right = list(range(1, len(symbols) + 1))
        queue = []

        def push(a: int, b: int) -> None:
            if a < 0 or b >= len(symbols):
                return
            token = self.ids.get(symbols[a] + symbols[b])
            if token is not None:  # max score first, then the leftmost
                heapq.heappush(queue, (-self.scores[token], a, symbols[a], symbols[b]))

        for i in range(1, len(symbols)):
            push(i - 1, i)
        while queue:
            _, a, sa, sb = heapq.heappop(queue)
            b = right[a]
            if symbols[a] != sa or b >= len(symbols) or symbols[b] != sb:
                continue  # a stale pair: one side has merged since
            symbols[a], symbols[b] = sa + sb, None
            right[a] = right[b]
            if right[a] < len(symbols):
                left[right[a]] = a
            push(left[a], a)
            push(a, right[a])
        ids = []
        for symbol in symbols:
            if symbol is None:
                continue
            if symbol in self.ids:
                ids.append(self.ids[symbol])
            else:
                ids += [self.bytes.get(b, self.unk) for b in symbol.encode()]
        return [i for i in ids if i is not None]
