"""Greedy agreement of the shipped SmolLM2 (native Q4_1 weights) in the dp4a layout with the row layout, both through
the quantized-matmul kernels (``weights_impl="pallas"``: interpret mode on a CPU, Triton on a GPU): the dp4a
layout's decode products round the activations to int8 per 32-block; how often does that change a greedy token?

Usage: ``python bench/agreement_dp4a.py [--prompts 4] [--new-tokens 16]`` (about 2-3 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_qweights import PROMPTS
from jkv.loading import default_model_path, load_gguf
from jkv.models import llama, quant
from jkv.serving.generator import Generator


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help=f"the first N of bench_qweights' {len(PROMPTS)}")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    model = load_gguf(default_model_path(), "f32", progress=False, layout="layers", weights="native")
    tok = model.tokenizer
    chats = [tok.render_chat([{"role": "user", "content": q}]) for q in PROMPTS[: args.prompts]]
    prompts = [tok.encode(c, add_eos=False) for c in chats]
    options = llama.LlamaOptions(weights_impl="pallas")
    tokens = {}
    for name, params in {"rows": model.params, "dp4a": quant.to_dp4a_layout(model.params)}.items():
        start = time.perf_counter()
        max_len = max(map(len, prompts)) + args.new_tokens + 8
        generator = Generator(model.config, params, max_len=max_len, batch=len(prompts), options=options)
        tokens[name] = np.asarray(generator.generate(prompts, max_new_tokens=args.new_tokens, stop_ids=()).tokens)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    same = tokens["rows"] == tokens["dp4a"]
    report = {"token_agreement": float(same.mean()), "prompts_equal": float(same.all(1).mean())}
    for row in tokens["dp4a"]:
        print(repr(tok.decode(list(row))))
    print(f"tokens equal {report['token_agreement']:.3f}, prompts equal {report['prompts_equal']:.3f}")
    return report


if __name__ == "__main__":
    main()
