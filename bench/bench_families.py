"""Decode steps of windowed, soft-capped families (issue 23): jkv's per-layer cache plan (rings for the windowed
layers) against HF transformers' compiled static cache (hybrid: sliding layers keep their window), same run.

    python bench/bench_families.py --out $OUT                       # the GPU run: Mistral-7B and Gemma-2-9B shapes
    python bench/bench_families.py --smoke --out /tmp/fam            # CPU, tiny shapes, seconds (no torch.compile)

For each model shape (random bf16 weights: the GPU machine reaches no model hub) and batch size, every sequence
holds a ``--prompt``-token random prompt (prefilled once), and each timed sample runs ``--steps`` more greedy decode
steps (both peers' contexts grow alike, sample after sample):

* jkv: the engine's compiled decode step (cache donated, argmax on the device) in a device loop;
* HF: ``transformers.StaticCache`` built from the model's config (its sliding layers hold only their window), the
  one-token forward + argmax under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) where CUDA is present.

Both are timed by the wall clock around ``--steps`` steps with a device sync at the end, in interleaved rounds
(:func:`bench.common.interleaved`). The jkv configuration is read from the HF config by jkv's own loader
(``config_from_hf``), so both run the same architecture. ``roofline``: the weight bytes one step reads at the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the same process
# ... and XLA's allocator keeps what it once grew to (compile-time autotuning included): cap it at half the GPU, so
# that torch's own autotuning finds room beside two copies of the weights.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, torch_peers
from jkv import xla_flags
from jkv.loading.safetensors import config_from_hf
from jkv.models import llama
from jkv.serving import Generator, SamplingParams

# HF config fields of the published models' shapes (the architecture's own defaults fill the rest).
SHAPES = {
    "mistral-7b": (
        "MistralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            sliding_window=4096,
            max_position_embeddings=32768,
        ),
    ),
    "gemma2-9b": (
        "Gemma2Config",
        dict(
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            max_position_embeddings=8192,
        ),
    ),
}
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_TINY |= dict(num_key_value_heads=2, sliding_window=24, max_position_embeddings=256)
SMOKE = {
    "mistral-7b": _TINY | dict(head_dim=16),
    "gemma2-9b": _TINY
    | dict(head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def hf_config(name: str, smoke: bool):
    import transformers

    cls, fields = SHAPES[name]
    return getattr(transformers, cls)(**(SMOKE[name] if smoke else fields))


# ---------------------------------------------------------------------------------------------- samplers
def jkv_sampler(config, params, batch: int, prompt: int, steps: int, max_len: int):
    """A callable giving one sample (seconds per decode step) and what the run compiled."""
    gen = Generator(config, params, max_len=max_len, batch=batch)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, config.vocab_size, prompt).tolist() for _ in range(batch)]
    gen.generate(prompts, max_new_tokens=2, stop_ids=())  # compiles prefill and decode
    step, rows = gen.decode_step_compiled()
    for p in prompts:
        gen.engine.submit(p, SamplingParams(max_new_tokens=steps))
    gen.engine.admit()  # the slots hold the prompts; the engine is not stepped again
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, batch), jnp.int32)

    def sample() -> float:
        nonlocal tokens
        t = time.perf_counter()
        for _ in range(steps):
            tokens, gen.cache = step(params, gen.cache, tokens, *rows)
        tokens.block_until_ready()
        return (time.perf_counter() - t) / steps

    stats = jax.devices()[0].memory_stats() or {}
    info = {"cache": type(gen.cache).__name__}
    info.update({f"{k}_gb": stats[k] / 1e9 for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats})
    return sample, info


def hf_sampler(torch, model, batch: int, prompt: int, steps: int, max_len: int, device: str):
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    with torch.no_grad():
        # logits of the last position only: all of them are batch x prompt x vocab (15.6 GiB for Gemma-2 at 32 x 1024)
        positions = torch.arange(prompt, device=device)
        model(ids, past_key_values=cache, cache_position=positions, use_cache=True, logits_to_keep=1)

    def one_token(token, position):
        out = model(
            token[:, None],
            past_key_values=cache,
            cache_position=position,
            position_ids=position[None].expand(batch, 1),
            use_cache=True,
        )
        return out.logits[:, -1].argmax(-1)

    step = torch.compile(one_token, mode="reduce-overhead", fullgraph=True) if device == "cuda" else one_token
    state = {"token": torch.randint(0, vocab, (batch,), device=device), "position": prompt}

    def sample() -> float:
        with torch.no_grad():
            token, position = state["token"], state["position"]
            positions = [torch.tensor([position + i], device=device) for i in range(steps)]
            t = time.perf_counter()
            for i in range(steps):
                token = step(token.clone(), positions[i])
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
        state.update(token=token, position=position + steps)
        return elapsed / steps

    for _ in range(2):  # compile, record the CUDA graphs
        sample()
    return sample, {"attn_implementation": model.config._attn_implementation}


# ---------------------------------------------------------------------------------------------- driver
def run_model(args, torch, name: str, device: str, bandwidth: float | None) -> list[dict]:
    hf = hf_config(name, args.smoke)
    config, _ = config_from_hf(hf.to_dict(), f"{name} shape")
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    params = llama.init_params(config, jax.random.key(0), dtype, scale=0.02, layout="layers")
    weight_bytes = params.decode_bytes()
    model = None
    if not args.no_hf:
        torch.manual_seed(0)
        with torch.device(device):
            model = type_of(hf)._from_config(hf, dtype=torch.float32 if args.smoke else torch.bfloat16).eval()
    rows = []
    for batch in args.batches:
        common.log(f"{name} b{batch}: prompt {args.prompt}, {args.steps} steps, max_len {args.max_len}")
        row = {
            "model": name,
            "batch": batch,
            "prompt": args.prompt,
            "steps": args.steps,
            "weight_gb": weight_bytes / 1e9,
        }
        samplers, info = {}, {}
        try:
            samplers["jkv"], info["jkv"] = jkv_sampler(config, params, batch, args.prompt, args.steps, args.max_len)
            if model is not None:
                hf = hf_sampler(torch, model, batch, args.prompt, args.steps, args.max_len, device)
                samplers["hf"], info["hf"] = hf
            timed = common.interleaved(samplers, args.rounds, baseline="hf" if model is not None else "jkv")
        except Exception as e:  # out of memory, a lowering failure: the next shapes still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            common.log(f"{name} b{batch} failed: {row['error']}")
        if "error" in row:  # (out of the except: its traceback no longer holds the failed engine)
            rows.append(row)
            del samplers
            gc.collect()
            continue
        for peer, t in timed.items():
            row[peer] = {"ms": 1e3 * t["time_s"], "spread_ms": 1e3 * t["spread_s"], **info[peer]}
            if model is not None:
                row[peer]["speed_vs_hf"] = t["speed_vs_hf"]
        if bandwidth:
            row["roofline_ms"] = 1e3 * weight_bytes / bandwidth
        rows.append(row)
        common.log(json.dumps(row))
        gc.collect()
    del params, model
    gc.collect()
    if torch is not None and device == "cuda":
        torch.cuda.empty_cache()
    return rows


def type_of(hf_cfg):
    import transformers

    return {"mistral": transformers.MistralForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}[hf_cfg.model_type]


def print_table(rows) -> None:
    print(f"\n{'model':11} {'B':>3} {'jkv ms':>8} {'HF ms':>8} {'vs HF':>6} {'range':>11} {'roof ms':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:11} {r['batch']:3d} failed: {r['error'][:100]}")
            continue
        hf = r.get("hf")
        vs = r["jkv"].get("speed_vs_hf")
        hf_cols = f"{hf['ms']:8.2f} {vs['median']:5.2f}x {vs['min']:5.2f}-{vs['max']:4.2f}" if hf else f"{'-':>8}"
        roof = f"{r['roofline_ms']:8.2f}" if "roofline_ms" in r else f"{'-':>8}"
        print(f"{r['model']:11} {r['batch']:3d} {r['jkv']['ms']:8.2f} {hf_cols} {roof}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["mistral-7b", "gemma2-9b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="(--smoke: 1 and 3 unless given)")
    ap.add_argument("--prompt", type=int, default=1024, help="tokens already in each sequence's cache")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed sample")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU, seconds)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--out", help="write bench_families.json here")
    args = ap.parse_args(argv)
    if args.smoke and args.batches == [1, 32]:
        args.batches = [1, 3]
    if args.smoke:
        args.prompt, args.steps, args.rounds = min(args.prompt, 40), min(args.steps, 4), min(args.rounds, 2)
    if min(args.batches) < 1 or args.prompt < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--batches, --prompt, --steps and --rounds must be positive")
    args.max_len = args.prompt + args.steps * (args.rounds + 2) + 8  # warm-up samples and every round
    xla_flags.apply_recommended(warn=False)  # what `jkv generate` runs with (GPU only)
    torch = None if args.no_hf else __import__("torch")
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    bandwidth = torch_peers.copy_bandwidth(torch)["tbps"] * 1e12 if device == "cuda" else None
    report = {"meta": common.meta(torch if device == "cuda" else None), "rows": []}
    for name in args.models:
        report["rows"] += run_model(args, torch, name, device, bandwidth)
        if args.out:  # after each model: a later one's failure or the call's time limit keeps these
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "bench_families.json"), "w") as f:
                json.dump(report, f, indent=1)
    print_table(report["rows"])
    return report


if __name__ == "__main__":
    main()
