"""Tokenizers from model files, built on the ``tokenizers`` package, plus chat templates and streaming decode.

GGUF files carry a GPT-2 style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as a vocabulary, merges and a
pre-tokenizer name; the name picks how text is split before BPE, as llama.cpp does, and a name jkv does not know
is refused (as llama.cpp refuses it) rather than split as another scheme. SentencePiece vocabularies (``"llama"``:
pieces and scores) are encoded by ``jkv.loading.spm``. HF directories carry a ``tokenizer.json`` that ``tokenizers``
reads as is.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jkv.loading.common import read_json

# How each GGUF ``tokenizer.ggml.pre`` splits text before byte-level BPE. ``None``: GPT-2's own pattern.
_GPT2_SPLIT = None
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False),
    "gpt2": (_GPT2_SPLIT, False),
    "gpt-2": (_GPT2_SPLIT, False),
    # SmolLM: every digit on its own, then GPT-2's pattern.
    "smollm": (_GPT2_SPLIT, True),
    "qwen2": (_QWEN2_SPLIT, False),
    # Names llama.cpp reads as Qwen2's (DeepSeek-R1's Qwen distills; Megrez is a llama model).
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
    "megrez": (_QWEN2_SPLIT, False),
}
# Llama 3's, and the names llama.cpp reads as Llama 3's (Falcon 3 and Devstral are llama models); llama.cpp merges
# whole words found in such a vocabulary before applying merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"}
PRE_TOKENIZERS |= {name: (_LLAMA3_SPLIT, False) for name in sorted(_IGNORE_MERGES)}

# GGUF token types.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in common chat formats; each one present in a vocabulary also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")
END_OF_TURN_TOKENS += ("<end_of_turn>",)  # Gemma's
END_OF_TURN_TOKENS += ("<|eom_id|>",)  # Llama 3.1's end of a message to a tool, an end of generation in llama.cpp


class TokenizerError(ValueError):
    """A tokenizer that cannot be built from the model's metadata, or a chat template that cannot be rendered."""


class Tokenizer:
    """Text ↔ token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        stops = {eos_id} if eos_id is not None else set()
        stops |= {i for i in (backend.token_to_id(t) for t in END_OF_TURN_TOKENS) if i is not None}
        self.stop_ids = tuple(sorted(stops | set(extra_stop_ids)))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) map to their ids.

        ``add_bos`` (default: the model's own setting) prepends BOS unless the text already starts with it;
        ``add_eos`` (likewise) appends EOS unless it already ends with it, as llama.cpp encodes with special tokens.
        A prompt to continue passes ``add_eos=False``: after EOS a model starts a new text, not the answer.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:  # a lone surrogate (undecodable bytes as Python hands them over) is no character
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start : e.end].encode("unicode_escape").decode()
            raise ValueError(f"text holds {bad} at index {e.start}, a lone surrogate, which is not Unicode") from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``) in the model's chat format."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template: pass the prompt as raw text instead")
        bos = self.token(self.bos_id) if self.bos_id is not None else ""
        eos = self.token(self.eos_id) if self.eos_id is not None else ""
        try:
            import jinja2.sandbox
        except ImportError:  # jinja2 is optional: ChatML, the most common format, needs no template engine
            if "<|im_start|>" not in self.chat_template:
                raise TokenizerError("rendering this chat template needs jinja2 (pip install jinja2)") from None
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        # As transformers renders templates: loop controls ({% break %}) and strftime_now (Llama 3.1's date).
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = _tojson
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"cannot render the model's chat template: {e}") from None

    def stream(self, skip_special: bool = False) -> StreamDecoder:
        """A ``StreamDecoder`` over this tokenizer; ``skip_special``: special tokens add no text, as
        ``decode(ids, skip_special=True)`` of the whole answer shows it."""
        return StreamDecoder(self, skip_special)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON as transformers' chat templates write it: text as is, where jinja's own filter escapes ``<>&'`` and
    every non-ASCII character (tool-calling templates write their arguments with it)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back bytes of a character not yet complete.

    Each piece is the text of a short window of recent tokens minus the text of its prefix, so the work per
    token stays constant and multi-token characters (UTF-8 split across byte tokens) come out whole. ``finish``
    hands out what is still held back when the stream ends. ``skip_special``: as ``Tokenizer.decode``'s.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already emitted

    def _decode(self, ids: list[int]) -> str:
        if self.skip_special:
            return self.tokenizer.decode(ids, skip_special=True)
        return self.tokenizer.decode(ids)  # a tokenizer-like object (the server's view) may take ids alone

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def finish(self) -> str:
        """The text still held back at the end: bytes of a character that never completed, as decoding the
        whole answer shows them (U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""


# ---------------------------------------------------------------------------------------------- builders
def from_gguf_metadata(fields: dict, source: str = "GGUF") -> Tokenizer:
    """A tokenizer from GGUF ``tokenizer.*`` metadata (values already decoded to Python objects)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(
            f"unsupported tokenizer model {kind!r} in {source}: jkv reads GPT-2 style byte-level BPE ('gpt2') "
            "and SentencePiece ('llama') from GGUF; use a safetensors directory with tokenizer.json for others"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges") if kind == "gpt2" else []
    if not tokens or merges is None:
        raise TokenizerError(f"{source} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    pre = fields.get("tokenizer.ggml.pre") or "default"  # as llama.cpp reads a file without one
    _check_list(tokens, str, "tokenizer.ggml.tokens", source)
    _check_list(merges, str, "tokenizer.ggml.merges", source)
    _check_list(types, int, "tokenizer.ggml.token_type", source)
    if len(types) != len(tokens):
        raise TokenizerError(f"{source} has {len(tokens)} tokens but {len(types)} token types")
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id"):
        value = fields.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TokenizerError(f"{source}: tokenizer.ggml.{key}={value!r} is not a token id")
        ids[key] = value
    template = fields.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: tokenizer.chat_template is a {type(template).__name__}, not text")
    common = dict(bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"], chat_template=template)
    common["extra_stop_ids"] = tuple(ids[k] for k in ("eot_token_id", "eom_token_id") if ids[k] is not None)
    # Splitting as another scheme would give other token ids, silently.
    if kind == "gpt2" and (not isinstance(pre, str) or pre not in PRE_TOKENIZERS):
        raise TokenizerError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} in {source}: jkv splits text before byte-level "
            f"BPE as {', '.join(sorted(PRE_TOKENIZERS))}; use the model's safetensors directory, whose "
            "tokenizer.json carries its own pre-tokenizer (or load with with_tokenizer=False)"
        )
    # llama.cpp prepends BOS to SentencePiece and to Llama 3's byte-level BPE unless the file says otherwise
    add_bos = _flag(fields, "tokenizer.ggml.add_bos_token", kind == "llama" or pre in _IGNORE_MERGES, source)
    common["add_eos"] = _flag(fields, "tokenizer.ggml.add_eos_token", False, source)
    if kind == "llama":
        return _sentencepiece(fields, tokens, types, source, add_bos=add_bos, **common)
    bad = next((m for m in merges if " " not in m), None)
    if bad is not None:
        raise TokenizerError(f"{source}: merge {bad!r} in tokenizer.ggml.merges is not two tokens joined by a space")
    split, digits = PRE_TOKENIZERS[pre]

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:  # the backend refuses merges of tokens not in the vocabulary
        backend = Backend(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    except Exception as e:
        raise TokenizerError(f"{source}: the BPE vocabulary and merges do not fit together: {e}") from None
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    pairs_typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in pairs_typed if k == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in pairs_typed if k == TOKEN_USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    return Tokenizer(backend, add_bos=add_bos, **common)


def _sentencepiece(fields: dict, tokens: list, types: list, source: str, **options) -> Tokenizer:
    """A SentencePiece vocabulary (``jkv.loading.spm``); ``options``: ``Tokenizer``'s."""
    from jkv.loading.spm import SentencePieceBackend

    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    _check_list(scores, float, "tokenizer.ggml.scores", source)
    if len(scores) != len(tokens):
        raise TokenizerError(f"{source} has {len(tokens)} tokens but {len(scores)} token scores")
    prefix = _flag(fields, "tokenizer.ggml.add_space_prefix", True, source)
    try:
        backend = SentencePieceBackend(tokens, scores, types, add_space_prefix=prefix)
    except ValueError as e:
        raise TokenizerError(f"{source}: {e} in tokenizer.ggml.tokens") from None
    return Tokenizer(backend, **options)


def _flag(fields: dict, key: str, default: bool, source: str) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, (bool, int)) or value not in (0, 1):  # GGUF stores flags as bool; 0 and 1 pass too
        raise TokenizerError(f"{source}: {key}={value!r} is not a boolean")
    return bool(value)


def _check_list(values, kind: type, field: str, source: str) -> None:
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        raise TokenizerError(f"{source}: {field} must be a list of {kind.__name__}, got {type(values).__name__}")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def from_hf_directory(directory) -> Tokenizer:
    """A tokenizer from an HF directory's ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``)."""
    directory = Path(directory)
    try:
        backend = Backend.from_file(str(directory / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(_unreadable(directory / "tokenizer.json", e)) from None
    config, config_path = {}, directory / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json(config_path, TokenizerError, "a JSON object")
        if not isinstance(config, dict):
            raise TokenizerError(f"{str(config_path)!r} is not a JSON object: it holds a {type(config).__name__}")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default" serves chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    bos_id = backend.token_to_id(bos) if bos else None
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Llama 3 says nothing: its tokenizer.json's post-processor prepends BOS, as HF runs it
        add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=backend.token_to_id(eos) if eos else None,
        add_bos=bool(add_bos),
        chat_template=template if isinstance(template, str) else None,
        extra_stop_ids=generation_stop_ids(directory, backend.get_vocab_size(with_added_tokens=True)),
    )


def _unreadable(path: Path, error: Exception) -> str:
    """Why ``tokenizers`` refused ``path``; a pre-tokenizer type it does not know is named, with those it knows."""
    known = {n for n in dir(pre_tokenizers) if isinstance(getattr(pre_tokenizers, n), type)} - {"PreTokenizer"}
    try:
        config = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer")
    except (OSError, ValueError, AttributeError):
        config = None
    unknown = [t for t in _pre_tokenizer_types(config) if t not in known]
    if unknown:
        return (
            f"cannot read {str(path)!r}: its pre_tokenizer type {unknown[0]!r} is not one this tokenizers package "
            f"knows ({', '.join(sorted(known))}); a newer tokenizers may read it"
        )
    return f"cannot read {str(path)!r}: {error}"


def _pre_tokenizer_types(config) -> list:
    """The ``type`` of a tokenizer.json ``pre_tokenizer``, or of each step of a ``Sequence``."""
    if not isinstance(config, dict):
        return []
    if config.get("type") == "Sequence" and isinstance(config.get("pretokenizers"), list):
        return [t for step in config["pretokenizers"] for t in _pre_tokenizer_types(step)]
    return [config.get("type")]


def generation_stop_ids(directory: Path, vocab_size: int) -> tuple[int, ...]:
    """The end tokens HF's ``generate`` stops at besides the tokenizer's EOS: ``eos_token_id`` (an id or a list)
    of ``generation_config.json``, else of ``config.json`` (Phi-3 and Llama 3.1 Instruct end a turn with a token that
    only the former names)."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if not path.is_file():
            continue
        fields = read_json(path, TokenizerError, "a JSON object")
        value = fields.get("eos_token_id") if isinstance(fields, dict) else None
        ids = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise TokenizerError(
                f"{str(path)!r}: eos_token_id={value!r} is invalid: expected a token id or a list of token ids in "
                f"[0, {vocab_size})"
            )
        return tuple(ids)
    return ()
