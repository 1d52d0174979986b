"""Compile a real transformer (a Llama shaped like SmolLM2-135M, fewer layers, random weights)
with backend="longattn", print what was rewritten, and check the result against eager.

    python examples/demo.py [--policy examples/policies/all-flash.yaml] [--layers 6] [--seq-len 256]
"""
import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import longattn

HERE = Path(__file__).parent


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default=str(HERE / "policies" / "llama-long-context.yaml"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--inner", default="inductor", help="inner torch.compile backend")
    args = parser.parse_args(argv)

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=2048,
                         max_position_embeddings=8192, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()  # layers at model.layers.N, as the policy names them
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len))

    compiled = torch.compile(model, backend="longattn", options={"policy": args.policy, "inner": args.inner})
    with torch.no_grad():
        start = time.perf_counter()
        got = compiled(input_ids=ids).logits
        compile_s = time.perf_counter() - start
        expected = model(input_ids=ids).logits
    report = longattn.last_report()
    print(report)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"first call (compile + run): {compile_s:.1f} s; max relative difference to eager: {rel:.2e}")
    if report.count("rewritten") == 0:
        raise SystemExit("nothing was rewritten")


if __name__ == "__main__":
    main()
