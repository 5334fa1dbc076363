"""Greedy agreement of the two engines on the same weights: torch vs llama.cpp on a float32 GGUF, 16 users x 4 prompts.

    python benchmarks/engine_agreement.py [--new-tokens 24]
    python benchmarks/engine_agreement.py --gguf q8_0 --out benchmarks/engine_agreement_q8_0.json

The float32 GGUF is the bundled Q4_1 GGUF de-quantized (e2p.engines.gguf_convert), the very weights the torch path
runs, so a difference can only come from floating point (another summation order in llama.cpp's kernels). A random
input projector (seeded, person part large enough that users differ). Writes benchmarks/results/engine_agreement.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PROMPTS = ["What do you do on weekends?", "Tell me about yourself.", "What is your favourite food?",
           "Do you have any pets?"]


def main(argv=None) -> dict:
    from e2p import load_backbone
    from e2p.engines.gguf_convert import resolve_gguf
    from e2p.engines.llamacpp import LlamaCppModel
    from e2p.model import E2PModel, new_config
    from e2p.projector import Projector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--gguf", default="f32", help="f32 (the torch path's own weights), q8_0, q4_0, or a file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_agreement.json"))
    args = ap.parse_args(argv)
    bb = load_backbone()
    f32 = resolve_gguf(bb.name, args.gguf)
    torch.manual_seed(0)
    p = Projector(new_config(bb, embedding_dim=384, injection="input"))
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.05)
    p.eval()
    users = torch.randn(16, 384, generator=torch.Generator().manual_seed(3))
    torch_model, llama_model = E2PModel(bb, p), LlamaCppModel(bb, p, gguf=f32, n_seq_max=16)
    rows, same, first_diff, logit_gap = 0, 0, [], []
    for prompt in PROMPTS:
        segs = [torch_model.format(prompt)] * 16
        a = torch_model.generate_tokens(segs, users, max_new_tokens=args.new_tokens)
        b = llama_model.generate_tokens(segs, users, max_new_tokens=args.new_tokens)
        for x, y in zip(a, b):
            rows += 1
            if x == y:
                same += 1
            else:
                first_diff.append(next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))))
        dec_t, dec_l = torch_model.start_decoding(segs, users), llama_model.start_decoding(segs, users)
        logit_gap.append(float((torch_model.next_logits(dec_t) - llama_model.next_logits(dec_l)).abs().max()))
        del dec_t, dec_l  # a running llama.cpp batch holds its rows' sequences until it is dropped
    report = {"rows": rows, "rows_identical": same, "first_differing_token": sorted(first_diff),
              "max_abs_first_logit_difference": max(logit_gap), "new_tokens": args.new_tokens, "gguf": str(f32)}
    print(json.dumps(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
