"""Accuracy of the Q8 cache format: the quantize/dequantize round trip, decode attention against the unquantized
cache (float64 references), and greedy generation on the default model (SmolLM2-135M-Instruct, float32 or bf16
weights) with f32 and Q8 caches against the bf16 cache: free runs, and the bf16 run's tokens predicted under teacher
forcing. Any backend (a few minutes on a CPU; the Q8 kernel in interpret mode off a GPU).

Usage: ``python scripts/q8_accuracy.py [--no-generation | --generation-only] [--weights bf16] [--prompts held-out]``
(``python scripts/bench_q8.py --accuracy`` runs the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jkv.caches.formats import quantize
from pallas_kernels import decode_q8

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a recipe for pancakes.",
    "What is 12 times 7?",
    "Describe the color blue to someone who cannot see.",
    "Name the planets of the solar system.",
]


HELD_OUT = [  # a second set, written after the rotation was chosen on PROMPTS: checks it did not fit PROMPTS
    "What is the boiling point of water at sea level?",
    "Write a short poem about autumn leaves.",
    "Explain photosynthesis to a child.",
    "What are the three states of matter?",
    "Give me three tips for better sleep.",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?",
    "Summarize the plot of Cinderella in two sentences.",
    "How many legs does a spider have?",
    "What does a compiler do?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue?",
    "Write a limerick about a cat.",
    "What is the square root of 144?",
    "List four fruits that are red.",
    "How do I make a cup of tea?",
    "What is the capital of Japan?",
    "Explain gravity in one sentence.",
    "Translate 'thank you' into French.",
    "What is the difference between weather and climate?",
    "Name three famous composers.",
    "What year did the first person walk on the Moon?",
    "Describe a sunset over the mountains.",
    "What is a prime number?",
    "Give an example of a mammal that lives in the sea.",
    "What is the chemical symbol for gold?",
    "How many days are in a leap year?",
    "Write a one-line slogan for a bakery.",
    "What is the tallest mountain in the world?",
    "Explain what a noun is.",
    "Count from one to ten in words.",
    "What is the opposite of 'ancient'?",
    "Recommend a good habit for students.",
    "What does DNA stand for?",
    "How does a rainbow form?",
    "Tell me a fun fact about octopuses.",
    "What is 15 plus 27?",
    "Name the primary colors.",
    "Write a sentence using the word 'serendipity'.",
    "What is the main ingredient of guacamole?",
    "Explain what the internet is in simple terms.",
    "What language is spoken in Brazil?",
    "Give me a synonym for 'happy'.",
    "What causes the seasons on Earth?",
    "Who was Albert Einstein?",
    "Describe the taste of a lemon.",
    "What is the freezing point of water in Fahrenheit?",
    "Write a thank-you note to a teacher.",
    "What are the benefits of exercise?",
    "How many continents are there, and what are they?",
]


def accuracy(log, new_tokens: int = 32, generate: bool = True, weights: str = "f32", prompt_set: str = "main") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import decode_attention_f64

    from jkv.caches.formats import dequantize

    rng = np.random.default_rng(0)
    log("round trip, x ~ N(0, 1) [4096, D] with 1 % of values x20: ||x' - x|| / ||x||, max |x' - x| / step")
    for scale_dtype in (jnp.float16, jnp.float32):
        for d in (64, 128):
            x = rng.standard_normal((4096, d)) * np.where(rng.random((4096, d)) < 0.01, 20, 1)
            codes, scales = quantize(jnp.asarray(x, jnp.float32), scale_dtype=scale_dtype)
            y = np.asarray(dequantize(codes, scales), np.float64)
            steps = np.asarray(scales, np.float64).repeat(32, -1)
            err = np.linalg.norm(y - x) / np.linalg.norm(x)
            log(f"  scale {jnp.dtype(scale_dtype).name} D={d}: {err:.3e}, {np.max(np.abs(y - x) / steps):.4f}")
    x = rng.standard_normal((4096, 128))
    bf = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    log(f"  bf16 rounding for comparison: {np.linalg.norm(bf - x) / np.linalg.norm(x):.3e}")
    log(
        "decode attention vs the unquantized cache (float64), B=4, K=2, S=1024, ragged lengths, 5 draws: min/median/max"
    )
    # "kernel/wide": the Q8 kernel itself (float16 scales, float32 q, interpret mode off the GPU).
    for name in ("q8/float16", "q8/float32", "bf16", "kernel/wide"):
        for d, g in ((64, 3), (128, 4)):
            errs = []
            for _ in range(5):
                b, kh, s = 4, 2, 1024
                lengths = rng.integers(s // 8, s + 1, b)
                k, v = rng.standard_normal((2, b, kh, s, d))
                q = rng.standard_normal((b, kh * g, d))
                if name.startswith("kernel/"):
                    kv = [x for a in (k, v) for x in quantize(jnp.asarray(a, jnp.float32))]
                    q32, n = jnp.asarray(q, jnp.float32), jnp.asarray(lengths, jnp.int32)
                    out = np.asarray(decode_q8.q8_decode_attention(q32, *kv, n), np.float64)
                    ref = decode_attention_f64(q, k, v, lengths)
                    errs.append(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                    continue
                if name == "bf16":
                    k2, v2 = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64) for a in (k, v))
                else:
                    sd = name.split("/")[1]
                    deq = lambda a, sd=sd: np.asarray(
                        dequantize(*quantize(jnp.asarray(a, jnp.float32), scale_dtype=sd))
                    )
                    k2, v2 = deq(k).astype(np.float64), deq(v).astype(np.float64)
                ref = decode_attention_f64(q, k, v, lengths)
                errs.append(np.linalg.norm(decode_attention_f64(q, k2, v2, lengths) - ref) / np.linalg.norm(ref))
            log(f"  {name:11s} D={d:3d} G={g}: {min(errs):.2e} / {np.median(errs):.2e} / {max(errs):.2e}")
    if generate:
        generation(log, new_tokens, weights, prompt_set)


def right_padded(seqs) -> np.ndarray:
    """Token sequences as one int32 array, zeros after each (causal attention never looks at them)."""
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = seq
    return tokens


def model_kv_error(log, model, prompts) -> None:
    """Round trip error of the default model's own keys and values (the prompts' prefill, every layer): Q8 with
    and without the rotation, and bf16 rounding; median and max over layers of ||x' - x|| / ||x||."""
    from jkv.caches import Q8, CacheSpec, KVCache
    from jkv.models import llama

    def round_trip(r, rotated):
        fmt = Q8(rotated=rotated)
        return fmt.from_stored(fmt.decode(fmt.encode(r, r), jnp.float32)[0])

    config = model.config
    tokens = right_padded(prompts)
    spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, tokens.shape[1], jnp.float32)
    run = jax.jit(lambda p, c, t: llama.forward(p, c, t, config=config))
    _, cache = run(model.params, KVCache.init(spec, len(prompts)), jnp.asarray(tokens))
    log(f"round trip of the model's own K/V ({len(prompts)} prompts' prefill), median / max over layers:")
    for name, x in (("k", cache.data[0]), ("v", cache.data[1])):
        rows = [
            np.concatenate(
                [np.asarray(x[layer, b, :, : len(p)]).reshape(-1, spec.head_dim) for b, p in enumerate(prompts)]
            )
            for layer in range(spec.num_layers)
        ]
        errs = {}
        for label, fn in (
            ("q8", lambda r: round_trip(r, False)),
            ("q8 rotated", lambda r: round_trip(r, True)),
            ("bf16", lambda r: r.astype(jnp.bfloat16).astype(jnp.float32)),
        ):
            errs[label] = [
                float(np.linalg.norm(np.asarray(fn(jnp.asarray(r)), np.float64) - r) / np.linalg.norm(r)) for r in rows
            ]
        log(f"  {name}: " + "; ".join(f"{k} {np.median(e):.2e} / {max(e):.2e}" for k, e in errs.items()))


GEN_CACHES = ("f32", "q8", "q8-plain")  # each against the bf16 cache; q8-plain: Q8 without the rotation


def generation(log, new_tokens: int, weights: str = "f32", prompt_set: str = "main") -> None:
    """Greedy generation with each cache of GEN_CACHES against the bf16 cache on the default model: free runs
    (position-wise agreement, identical runs, first divergence), free runs stopping at EOS, and the bf16 run's
    tokens predicted under teacher forcing."""
    from jkv.caches import CacheSpec
    from jkv.loading import default_model_path, load_gguf
    from jkv.models import llama
    from jkv.serving import Generator, make_cache

    model = load_gguf(default_model_path(), weights, progress=False)
    tok, config = model.tokenizer, model.config
    texts = {"main": PROMPTS, "held-out": HELD_OUT}[prompt_set]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_eos=False) for p in texts]
    model_kv_error(log, model, prompts)
    free = {}
    for kind in ("bf16", *GEN_CACHES):
        storage = {"rotated": False} if kind == "q8-plain" else {}  # the plain Q8 cache: no rotation
        g = Generator(
            config,
            model.params,
            max_len=256,
            batch=len(prompts),
            cache=kind.removesuffix("-plain"),
            cache_options=storage,
        )
        free[kind] = g.generate(prompts, max_new_tokens=new_tokens).tokens
        free[kind + "+stop"] = g.generate(prompts, max_new_tokens=new_tokens, stop_ids=tok.stop_ids).tokens
    ref = free["bf16"]
    seqs = [p + r for p, r in zip(prompts, ref, strict=True)]
    tokens = right_padded(seqs)
    spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, 256)
    forced = {}
    for kind in ("bf16", *GEN_CACHES):
        run = jax.jit(lambda p, c, t: llama.forward(p, c, t, config=config))
        storage = {"rotated": False} if kind == "q8-plain" else {}
        cache = make_cache(kind.removesuffix("-plain"), spec, len(seqs), **storage)
        logits, _ = run(model.params, cache, jnp.asarray(tokens))
        pred = np.asarray(jnp.argmax(logits, -1))
        forced[kind] = [[int(t) for t in pred[i, len(p) - 1 : len(p) - 1 + new_tokens]] for i, p in enumerate(prompts)]

    def agree(a_runs, b_runs):
        # Position-wise; a run that stopped earlier counts its missing positions as disagreements.
        same = sum(x == y for a, b in zip(a_runs, b_runs, strict=True) for x, y in zip(a, b, strict=False))
        total = sum(max(len(a), len(b)) for a, b in zip(a_runs, b_runs, strict=True))
        return same / total, total

    def first_divergence(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))

    log(
        f"greedy generation, SmolLM2-135M-Instruct ({weights} weights), {prompt_set} prompts: "
        f"{len(prompts)} x {new_tokens} tokens, each cache against the bf16 cache:"
    )
    for kind in GEN_CACHES:
        a, n = agree(ref, free[kind])
        b, m = agree(free["bf16+stop"], free[kind + "+stop"])
        c, _ = agree(ref, forced[kind])
        firsts = [first_divergence(r, x) for r, x in zip(ref, free[kind], strict=True)]
        log(
            f"  {kind:8s} free run {a:.3f} of {n} ({sum(f == new_tokens for f in firsts)} runs identical; first "
            f"divergences {sorted(f for f in firsts if f < new_tokens)}); free run to EOS {b:.3f} of {m}; "
            f"teacher-forced {c:.3f}"
        )
    log(f"  bf16 cache teacher-forced vs its own free run: {agree(ref, forced['bf16'])[0]:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--no-generation", action="store_true", help="without the generation part")
    parser.add_argument("--generation-only", action="store_true", help="the generation part only")
    parser.add_argument("--weights", choices=("f32", "bf16"), default="f32", help="model weights for the generation")
    parser.add_argument(
        "--prompts", choices=("main", "held-out"), default="main", help="prompt set of the generation (10 or 50)"
    )


def run(args) -> None:
    log = lambda msg: print(msg, flush=True)
    if args.generation_only:
        generation(log, 32, args.weights, args.prompts)
    else:
        accuracy(log, generate=not args.no_generation, weights=args.weights, prompt_set=args.prompts)


if __name__ == "__main__":
    main()
