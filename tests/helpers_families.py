"""Small random HF models of each family beyond Llama (shared by tests/models and tests/serving): the configs, HF's
own greedy continuations and logits, and the GGUF file llama.cpp's converter would write from such a model."""

import contextlib
import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_compile import FAST_COMPILE
from helpers_loading import byte_level_alphabet, llama_cpp_permute

from jkv.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW = 8
PROMPTS = (5, 11, 3, 9)  # two longer than the window; each plus 32 steps passes it
STEPS = 32
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)
SMALL |= dict(head_dim=16, max_position_embeddings=128, attn_implementation="eager")
# Gemma ties its embeddings by default; untied here, since a tied random model repeats its last token, and greedy
# tokens that repeat would check little past the window.
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            num_hidden_layers=3,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            tie_word_embeddings=False,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            tie_word_embeddings=False,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(num_hidden_layers=2, hidden_size=192, num_attention_heads=2, num_key_value_heads=1, sliding_window=WINDOW),
    ),
}


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread, restored after: these tiny models run far slower on several threads that contend with
    JAX's on a small CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# family -> (GGUF architecture, HF config overrides that llama.cpp's reading of the file can express: Gemma's
# query scale is head_dim ** -0.5 below 27B, Gemma 3's windows fall on all but every sixth layer, and Gemma 2's
# converter drops lm_head)
GGUF_CASES = {
    "mistral": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=SMALL["head_dim"], tie_word_embeddings=True)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=SMALL["head_dim"], num_hidden_layers=6, layer_types=None)),
}


def hf_model(family: str, **overrides):
    """A random HF model of ``family`` (``overrides``: config fields), every weight (norms too) drawn away from
    its default."""
    config_cls, model_cls, extra = FAMILIES[family]
    kw = SMALL | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} | extra | overrides
    if family == "phi3":
        kw.pop("head_dim")
    torch.manual_seed(sum(map(ord, family)))
    with one_torch_thread():
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.15
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and "gemma" not in family else 0.0))
    return model


def hf_greedy(model, prompts, steps: int = STEPS):
    """Per prompt: HF's greedy tokens and its logits at every position of prompt + continuation but the last.
    No HF cache: each step is a full causal pass over the right-padded batch (padding after a sequence's last
    token cannot reach it), so HF's own window masks decide everything."""
    seqs = [list(p) for p in prompts]
    width = max(map(len, prompts)) + steps

    def run(rows):
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return model(ids).logits.numpy().astype(np.float64)

    with torch.no_grad(), one_torch_thread():
        for _ in range(steps):
            logits = run(seqs)
            for seq, row in zip(seqs, logits, strict=True):
                seq.append(int(row[len(seq) - 1].argmax()))
        logits = run([seq[:-1] for seq in seqs])
    return [(seq[len(p) :], row[: len(seq) - 1]) for p, seq, row in zip(prompts, seqs, logits, strict=True)]


def save_word_tokenizer(directory, vocab_size: int) -> None:
    """A ``tokenizer.json`` of whole words (``<pad>``, ``<bos>``, ``<eos>``, then ``w3`` ... split on spaces, so
    text and token ids determine each other) and a ``tokenizer_config.json`` naming BOS (prepended) and EOS."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_gguf(path, model, arch: str, bpe: bool = False) -> None:
    """``model`` as llama.cpp's ``convert_hf_to_gguf.py`` writes it for ``arch`` (f32 tensors): the keys its
    model class sets, tensor names by gguf's own name map, Q/K rows permuted for ``llama`` (Mistral), Gemma's norms
    stored as ``1 + w`` and no ``lm_head``. ``llama`` gets ``attention.sliding_window`` when the model has one
    (the converter leaves it out; jkv reads it where present). The tokenizer gives the vocabulary size, as the
    converter's does: SentencePiece pieces of one character each (no space prefix for Gemma), or for ``qwen3``
    placeholder pieces, or with ``bpe`` a GPT-2 style byte-level BPE (its 256 byte pieces need a vocabulary of at
    least 259)."""
    c, hp = model.config, model.config.to_dict()
    n_layers, heads, kv_heads = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(n_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch != "phi3":  # Phi3MiniModel writes no head dimension
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    rope = hp.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    if arch != "gemma2":  # Gemma2Model writes its own keys only: llama.cpp's default base, 10000, is Gemma 2's
        w.add_rope_freq_base(full["rope_theta"])
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
    if arch == "phi3":
        w.add_rope_dimension_count(c.hidden_size // heads)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3" and c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if getattr(c, "sliding_window", None) and arch in ("llama", "phi3", "gemma2", "gemma3"):
        w.add_sliding_window(c.sliding_window)
    if bpe:
        pieces = ["Ġt", "he", "Ġthe"]
        tokens = [*byte_level_alphabet(), *pieces] + [f"<extra{i}>" for i in range(c.vocab_size - 259)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * 259 + [3] * (c.vocab_size - 259))
        w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    elif arch == "qwen3":
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
        w.add_token_types([3] * 3 + [1] * (c.vocab_size - 3))
    else:  # SentencePiece: control tokens, then "▁" and one character per piece, so every text of them encodes
        chars = [chr(i) for i in range(33, 127)] + [chr(i) for i in range(0x100, 0x100 + c.vocab_size)]
        w.add_tokenizer_model("llama")
        w.add_token_list(["<pad>", "<bos>", "<eos>", "\u2581", *chars[: c.vocab_size - 4]])
        w.add_token_scores([0.0] * c.vocab_size)
        w.add_token_types([3] * 3 + [1] * (c.vocab_size - 3))
        if arch.startswith("gemma"):
            w.add_add_space_prefix(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_layers)
    for name, x in model.state_dict().items():
        if name == "lm_head.weight" and (c.tie_word_embeddings or arch == "gemma2"):
            continue
        x = x.numpy().astype(np.float32)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + np.float32(1.0)
        if arch == "llama" and name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, kv_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def loaded_family(name: str, tmp_path_factory):
    """(name, the jkv model loaded from the saved random HF model, random prompts, each prompt's HF greedy tokens
    and logits)."""
    from jkv.loading import load_safetensors

    model = hf_model(name)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    loaded = load_safetensors(directory, "f32", progress=False)
    rng = np.random.default_rng(len(name))
    prompts = [rng.integers(3, loaded.config.vocab_size, n).tolist() for n in PROMPTS]
    return name, loaded, prompts, hf_greedy(model, prompts)


def padded_prompts(prompts, pad: int = 5):
    """Right-padded prompts ``[B, max length]`` (``pad`` after each) and their lengths ``[B]``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.full((len(prompts), lengths.max()), pad, np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    return padded, lengths


@functools.partial(jax.jit, static_argnames=("config", "options", "wrong_at"), compiler_options=FAST_COMPILE)
def teacher_forced(params, cache, padded, lengths, tokens, *, config, options, wrong_at=None):
    """One compile for a whole comparison: a ragged prefill of ``padded`` (each prompt read at its own last token,
    the cache rolled back to ``lengths``), then one decode step per column of ``tokens [B, S]`` (``lax.scan``).
    With ``wrong_at=j``: columns ``j`` and ``j + 1`` go in one 3-token forward step whose last token is wrong
    (``tokens[:, j] + 1``), rolled back by one (a branch of the scanned step, so the decode step compiles once).
    Returns the prefill logits ``[B, V]``, the logits after each column ``[B, S, V]`` and the cache."""
    model = dict(config=config, options=options)
    logits, cache = llama.prefill(params, cache, padded, lengths - 1, **model)
    cache = cache.rollback(lengths)

    def decode(cache, three):  # logits of the first token, a row of zeros after
        out, cache = llama.decode_step(params, cache, three[:, 0], **model)
        return cache, jnp.stack([out, jnp.zeros_like(out)], axis=1)

    def speculate(cache, three):  # logits of the two right tokens
        out, cache = llama.forward(params, cache, three, **model)
        return cache.rollback(cache.lengths - 1), out[:, :2]

    s = tokens.shape[1]
    if wrong_at is None:
        cache, out = jax.lax.scan(decode, cache, jnp.swapaxes(tokens, 0, 1)[:, :, None])
        return logits, jnp.swapaxes(out, 0, 1)[:, :, 0], cache
    # The step at wrong_at takes columns wrong_at and wrong_at + 1: s - 1 scanned steps for s columns.
    columns = jnp.concatenate([jnp.arange(wrong_at + 1), jnp.arange(wrong_at + 2, s)])
    three = jnp.stack([tokens[:, columns], tokens[:, jnp.minimum(columns + 1, s - 1)], tokens[:, columns] + 1], -1)
    step = lambda cache, x: jax.lax.cond(x[1], speculate, decode, cache, x[0])
    cache, out = jax.lax.scan(step, cache, (jnp.swapaxes(three, 0, 1), columns == wrong_at))
    out = jnp.swapaxes(out, 0, 1)  # (B, steps, 2, V)
    steps = jnp.concatenate([out[:, :wrong_at, 0], out[:, wrong_at], out[:, wrong_at + 1 :, 0]], axis=1)
    return logits, steps, cache


def flat_columns(prompts, tokens, width: int = 32, pad: int = 7, wrong_at=None):
    """The inputs of ``flat_forced`` for the comparison ``teacher_forced`` makes, in the serving step's form (flat
    steps of ``width`` rows, those past the real tokens padding): the prompts as one flat step, then one step per
    column of ``tokens [B, S]`` (one token per sequence), or with ``wrong_at=j`` columns ``j`` and ``j + 1`` and a
    wrong token (``tokens[:, j] + 1``) in one step of 3 tokens per sequence, rolled back by one. Each step reads
    two rows per sequence (the same row twice but in that 3-token step)."""
    b, s = tokens.shape
    lengths = np.array([len(p) for p in prompts], np.int32)
    steps = [(np.concatenate(prompts), lengths, np.repeat(np.cumsum(lengths) - 1, 2), 0)]
    one, first = np.ones(b, np.int32), np.repeat(np.arange(b), 2)
    j = 0
    while j < s:
        if j == wrong_at:
            three = np.stack([tokens[:, j], tokens[:, min(j + 1, s - 1)], tokens[:, j] + 1], -1).reshape(-1)
            steps.append((three, 3 * one, (3 * np.arange(b)[:, None] + [0, 1]).reshape(-1), 1))
            j += 2
        else:
            steps.append((tokens[:, j], one, first, 0))
            j += 1
    flat = np.full((len(steps), width), pad, np.int32)
    for i, (t, _, _, _) in enumerate(steps):
        flat[i, : len(t)] = t
    counts, rows, back = (np.array([x[k] for x in steps], np.int32) for k in (1, 2, 3))
    return flat, counts, rows, np.repeat(back[:, None], b, 1)


@functools.partial(jax.jit, static_argnames=("config", "options", "rollback"), compiler_options=FAST_COMPILE)
def flat_forced(params, cache, tokens, counts, rows, back, *, config, options, rollback=False):
    """One compile for a whole comparison in the serving step's form (``flat_columns``): one flat step per row of
    ``tokens [S, T]`` (``counts [S, B]`` tokens per sequence, ``llama.flat_hidden_states``, a ``lax.scan``), the
    logits of its ``rows [S, R]``, and with ``rollback`` the cache rolled back by ``back [S, B]`` after it (the
    rejection of a speculative draft). Returns the logits ``[S, R, V]`` and the cache."""

    def step(cache, x):
        tokens, counts, rows, back = x
        h, cache = llama.flat_hidden_states(params, cache, tokens, counts, config=config, options=options)
        if rollback:
            cache = cache.rollback(cache.lengths - back)
        return cache, llama.lm_head(params, h[rows], options, config=config)

    cache, logits = jax.lax.scan(step, cache, (tokens, counts, rows, back))
    return logits, cache


def forced_logits(logits, wrong_at=None):
    """``flat_forced``'s logits ``[S, 2B, V]`` as ``teacher_forced`` returns them: the prefill's ``[B, V]`` and
    one row per column ``[B, columns, V]``."""
    logits = np.asarray(logits)
    first = logits[:, 0::2]  # (S, B, V): each sequence's first row
    steps = [first[i] for i in range(1, len(logits))]
    if wrong_at is not None:  # the 3-token step: its two right rows
        steps[wrong_at : wrong_at + 1] = [first[wrong_at + 1], logits[wrong_at + 1, 1::2]]
    return first[0], np.stack(steps, 1)
