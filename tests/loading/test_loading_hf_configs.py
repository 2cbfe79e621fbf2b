"""``config.json`` as checkpoints on the hub spell it, against HF transformers reading the same directory: a small
random model of each family saved by transformers, its ``config.json`` edited to an older or sparser spelling,
then loaded by both. jkv's logits over a prompt and HF's greedy continuation (one forward, float32, CPU) match
HF's, and so does every greedy token; what jkv cannot run is refused with the field, its value and what is
supported."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from helpers_families import SMALL, hf_model, one_torch_thread

import jkv
from jkv.loading import ModelLoadError, load_safetensors
from jkv.loading.safetensors import config_from_hf
from jkv.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, STEPS = 12, 8  # longer than the families' window (8) once generation runs


@functools.partial(jax.jit, static_argnames="config", compiler_options=FAST_COMPILE)
def jkv_logits(params, tokens, *, config):
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, tokens.shape[1])
    cache = jkv.make_cache("f32", spec, 1)
    return llama.forward(params, cache, tokens, config=config, options=llama.LlamaOptions(impl="xla"))[0]


def llama_model(family: str, **overrides):
    """A random HF Llama or Qwen2 model of ``helpers_families``' small shape, norms drawn around 1."""
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[family]
    kw = SMALL | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "num_hidden_layers": 2} | overrides
    torch.manual_seed(0)
    with one_torch_thread():
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15) + (1.0 if "norm" in name else 0.0))
    return model


def saved(tmp_path, family: str, edit=None, dtype=None, **overrides):
    """A random ``family`` model saved in ``tmp_path`` (weights in ``dtype``, default float32), its
    ``config.json`` passed through ``edit`` (a dict in place)."""
    model = llama_model(family, **overrides) if family in ("llama", "qwen2") else hf_model(family, **overrides)
    model.to(dtype or torch.float32).save_pretrained(tmp_path)
    if edit is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def assert_matches_hf(directory):
    """HF's model from ``directory``: its greedy continuation of a random prompt, and its logits over prompt and
    continuation; jkv's model from ``directory``: the same logits (one forward) and argmax."""
    with one_torch_thread():
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        seq = np.random.default_rng(0).integers(3, hf.config.vocab_size, PROMPT).tolist()
        with torch.no_grad():
            for _ in range(STEPS):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            want = hf(torch.tensor([seq])).logits[0].numpy()
    loaded = load_safetensors(directory, "f32", progress=False)
    got = np.asarray(jkv_logits(loaded.params, jnp.asarray([seq], jnp.int32), config=loaded.config)[0])
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(got[PROMPT - 1 : -1].argmax(-1), seq[PROMPT:])
    return loaded.config


def drop(*keys):
    return lambda config: [config.pop(key, None) for key in keys]


# transformers 4 left out of config.json what equals its base class's default, and tie_word_embeddings=True was
# one: Gemma 2 and Gemma 3 (1B) checkpoints on the hub have no tie_word_embeddings, and HF ties them.
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_without_tie_word_embeddings_ties(family, tmp_path):
    directory = saved(tmp_path, family, drop("tie_word_embeddings"), tie_word_embeddings=True)
    assert assert_matches_hf(directory).tie_embeddings


# family -> the keys dropped from its config.json: HF then takes its config class's defaults
ABSENT = {
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "head_dim"),
    "gemma3": ("query_pre_attn_scalar", "rope_parameters", "sliding_window"),
    "qwen3": ("head_dim",),
    "mistral": ("sliding_window",),
    "phi3": ("rms_norm_eps",),
}


@pytest.mark.parametrize("family", list(ABSENT))
def test_absent_keys_take_hf_defaults(family, tmp_path):
    """A key missing from ``config.json`` means the HF config class's default, which for these families is not
    Llama's (Gemma's head_dim, query scale, soft caps and rope bases, Qwen3's head_dim, Mistral's window)."""
    overrides = {"rms_norm_eps": 2e-5} if family == "phi3" else {}
    if family in ("gemma2", "gemma3", "qwen3"):  # the class default head_dim, 256 or 128, with 4 heads
        overrides |= {"head_dim": 256 if family.startswith("gemma") else 128, "num_key_value_heads": 1}
    directory = saved(tmp_path, family, drop(*ABSENT[family]), **overrides)
    config = assert_matches_hf(directory)
    if family == "mistral":  # HF's default window, 4096, is beyond the prompt: its value is checked here
        assert config.windows == (4096,) * config.num_layers


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_attention_bias_that_hf_ignores(family, tmp_path):
    """Mistral's and Phi-3's attention has no biases whatever ``attention_bias`` says."""
    assert not assert_matches_hf(saved(tmp_path, family, lambda c: c.update(attention_bias=True))).qkv_bias


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_attention_bias_on_o_proj_is_refused(model_type):
    """These families' ``attention_bias`` biases o_proj too, which the decoder has no place for."""
    hf = dict(model_type=model_type, vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2)
    hf |= dict(num_attention_heads=4, attention_bias=True)
    with pytest.raises(ModelLoadError, match=rf"attention_bias=True .*model_type='{model_type}'.*expected false"):
        config_from_hf(hf)


LONGROPE = {"long_factor": [1.0] * 8, "short_factor": [1.0] * 8, "original_max_position_embeddings": 64}
# config.json edit -> what the error must say: the field as the file spells it, its value, what is supported
REFUSED = {
    "phi3-longrope": (
        dict(model_type="phi3", rope_scaling={"type": "longrope", **LONGROPE}),
        r"rope_scaling.type='longrope' .*expected one of default, linear, llama3",
    ),
    "phi3-su": (
        dict(model_type="phi3", rope_scaling={"type": "su", **LONGROPE}),
        r"rope_scaling.type='su' .*expected one of default, linear, llama3",
    ),
    "phi3-longrope-t5": (
        dict(model_type="phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, **LONGROPE}),
        r"rope_parameters.rope_type='longrope' .*expected one of default, linear, llama3",
    ),
    "llama-yarn": (
        dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        r"rope_scaling.rope_type='yarn' .*expected one of default, linear, llama3",
    ),
    "gemma3-local-linear": (
        dict(
            model_type="gemma3_text",
            rope_parameters={
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        ),
        r"rope_parameters.sliding_attention.rope_type='linear' .*expected default",
    ),
    "gemma3-global-dynamic": (
        dict(model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}),
        r"rope_parameters.full_attention.rope_type='dynamic' .*expected one of default, linear, llama3",
    ),
    "qwen2-sliding": (
        dict(model_type="qwen2", use_sliding_window=True, sliding_window=8),
        r"use_sliding_window=True .*expected false",
    ),
    "llama-mlp-bias": (dict(model_type="llama", mlp_bias=True), r"mlp_bias=True .*expected false"),
    "phi3-partial-rotary": (
        dict(model_type="phi3", partial_rotary_factor=0.5),
        r"partial_rotary_factor=0.5 .*expected 1.0",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_field_value_and_what_is_supported(case):
    fields, message = REFUSED[case]
    hf = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ModelLoadError, match=message):
        config_from_hf(hf | dict(head_dim=16, sliding_window=8) | fields)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("self_attn.qkv_proj.weight", (300, 192)),
        ("mlp.gate_up_proj.weight", (160, 100)),
        ("mlp.gate_up_proj.weight", (160,)),
    ],
    ids=["qkv-rows", "gate-up-columns", "gate-up-1d"],
)
def test_phi3_fused_tensor_of_the_wrong_shape(tmp_path, name, shape):
    """Phi-3's fused tensors are checked as the file holds them: the error names the file's tensor, the shape
    found and the shape expected, with the fields that give it."""
    from safetensors.numpy import load_file, save_file

    saved(tmp_path, "phi3")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[f"model.layers.1.{name}"] = np.zeros(shape, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    kv = " \\+ num_key_value_heads=1 × head dim 96"
    rows = f"384 from num_attention_heads=2 × head dim 96{kv}{kv}"
    rows = rows if "qkv" in name else "160 from intermediate_size=80 \\+ intermediate_size=80"
    want = rf"tensor 'model.layers.1.{name}' in .* has shape \({', '.join(map(str, shape))},?\), expected "
    with pytest.raises(
        ModelLoadError, match=want + rf"\({rows.split()[0]}, 192\) \({rows}, 192 from hidden_size=192\)"
    ):
        load_safetensors(tmp_path, "f32", progress=False)


def renamed(directory, rename):
    """``directory``'s ``model.safetensors`` with every tensor renamed by ``rename``."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_base_model_names_load_as_hf_loads_them(tmp_path):
    """A tied model saved from its base model (``embed_tokens.weight``, ``layers.0...``: no ``model.``), which HF
    loads into its causal LM."""
    directory = saved(tmp_path, "qwen3", tie_word_embeddings=True)
    assert_matches_hf(renamed(directory, lambda k: k.removeprefix("model.")))


# transformers 4 and 5 names of a multimodal checkpoint's language model: (layers' prefix, lm_head's name)
MULTIMODAL = {"t4": ("language_model.model.", "language_model.lm_head.weight"), "t5": ("model.language_model.", None)}


@pytest.mark.parametrize("spelling", list(MULTIMODAL))
def test_names_under_a_multimodal_prefix_are_refused_naming_them(tmp_path, spelling):
    """A multimodal checkpoint's language model, which HF's causal LM would not read either: the error names the
    tensor missing and what the files hold instead."""
    prefix, lm_head = MULTIMODAL[spelling]
    rename = lambda k: (lm_head or k) if k == "lm_head.weight" else prefix + k.removeprefix("model.")
    directory = renamed(saved(tmp_path, "qwen3"), rename)
    key, held = ("lm_head", lm_head) if lm_head else ("model.embed_tokens", f"{prefix}embed_tokens.weight")
    with pytest.raises(ModelLoadError, match=rf"'{key}.weight' is missing from .*: the files hold '{held}'"):
        load_safetensors(directory, "f32", progress=False)


def test_gemma3_attention_takes_no_soft_cap(tmp_path):
    """Gemma 3's config has attn_logit_softcapping (null in Google's checkpoints), but HF's Gemma 3 attention never
    applies it (nor does llama.cpp's): only the final cap counts."""
    directory = saved(tmp_path, "gemma3", attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    config = assert_matches_hf(directory)
    assert (config.attn_softcap, config.final_softcap) == (None, 5.0)


# rope fields as the file spells them -> the field the error must name
ROPE_FIELDS = {
    "t5-linear-factor": (
        dict(rope_parameters={"rope_type": "linear", "factor": 0.0, "rope_theta": 1e4}),
        r"rope_parameters.factor=0.0 is invalid",
    ),
    "t4-llama3-missing": (
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
        r"lacks the field 'rope_scaling.high_freq_factor'",
    ),
    "t5-gemma3-linear-missing": (
        dict(
            model_type="gemma3_text",
            rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6}, "sliding_attention": {}},
        ),
        r"lacks the field 'rope_parameters.full_attention.factor'",
    ),
    "t5-theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": -1}), r"rope_parameters.rope_theta=-1"),
}


@pytest.mark.parametrize("case", list(ROPE_FIELDS))
def test_rope_errors_name_the_field_as_spelled(case):
    fields, message = ROPE_FIELDS[case]
    hf = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2)
    with pytest.raises(ModelLoadError, match=message):
        config_from_hf(hf | dict(num_attention_heads=4) | fields)


def transformers4(config: dict) -> None:
    """``config.json`` as transformers 4 wrote it: rope_theta and rope_scaling beside the other keys (Gemma 3's
    local base as rope_local_base_freq), no layer_types, no key equal to its base class default (Gemma's
    tie_word_embeddings), torch_dtype."""
    rope = config.pop("rope_parameters")
    full = rope.pop("full_attention", rope)
    if "sliding_attention" in rope:
        config |= {"rope_local_base_freq": rope["sliding_attention"]["rope_theta"], "sliding_window_pattern": 6}
    config["rope_theta"] = full.pop("rope_theta")
    full.pop("partial_rotary_factor", None)
    config["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
    gemma_tied = config["model_type"].startswith("gemma") and config["tie_word_embeddings"]  # Gemma's default
    for key in ("layer_types", "dtype") + (("tie_word_embeddings",) if gemma_tied else ()):
        config.pop(key, None)
    config["torch_dtype"] = "bfloat16"


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}
LLAMA3 |= {"original_max_position_embeddings": 16}
GEMMA3_4B = dict(num_hidden_layers=7, layer_types=None, tie_word_embeddings=True)  # 5 local : 1 global, then local
GEMMA3_4B["rope_parameters"] = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
}
# name -> (family, config overrides, weight dtype on disk), each saved in transformers 4's spelling too
VARIANTS = {
    "gemma3-4b-text-linear-global-rope": ("gemma3", GEMMA3_4B, torch.bfloat16),
    "gemma2-tied": ("gemma2", dict(tie_word_embeddings=True), torch.float16),
    "phi3-4k-rope-scaling-null": ("phi3", {}, torch.float16),
    "qwen2-use-sliding-window-false": (
        "qwen2",
        dict(use_sliding_window=False, sliding_window=8, max_window_layers=1),
        None,
    ),
    "mistral-head-dim-32": ("mistral", dict(head_dim=32), torch.bfloat16),
    "llama-linear-rope": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
        None,
    ),
    "llama3.2-tied-llama3-rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3), torch.bfloat16),
}


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_variants_match_hf(tmp_path, variant, spelling):
    family, overrides, dtype = VARIANTS[variant]
    edit = transformers4 if spelling == "transformers4" else None
    assert_matches_hf(saved(tmp_path, family, edit, dtype, **overrides))
