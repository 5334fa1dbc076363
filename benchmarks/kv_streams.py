"""One KV stream per row against one unified KV cache, on llama.cpp: batched speed and batch dependence.

    python benchmarks/kv_streams.py [--gguf q8_0] [--projectors 5]   # about 6 min on 2 cores

Why each row has its own stream in `LlamaCppBackend` (docs/performance.md): 16 users x 32 greedy tokens (EOS off)
decoded together, tokens/s as the median of 3 rounds for each layout; then, for random input projectors, how many of
16 batched rows equal the same row decoded alone. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_engines import PROMPTS
from common import embeddings, make_projector
from e2p.backbone import load_backbone
from e2p.engines.gguf_convert import resolve_gguf
from e2p.engines.llamacpp import LlamaCppModel
from e2p.engines.llamacpp_backend import LlamaCppBackend


def projector(backbone, seed: int):
    p = make_projector(backbone, "input", seed=seed)
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.05)  # a person part large enough that users get different replies
    return p.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="q8_0", help="a GGUF file or a derived kind: f32, q8_0, q4_0")
    ap.add_argument("--projectors", type=int, default=5, help="random projectors for the batch-dependence count")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    bb = load_backbone()
    layouts = {"unified": True, "own_streams": False}
    backends = {name: LlamaCppBackend(resolve_gguf(bb.name, args.gguf), n_ctx_seq=2048, n_seq_max=args.users,
                                      kv_unified=u) for name, u in layouts.items()}
    out: dict = {"gguf": args.gguf, "users": args.users, "new_tokens": args.new_tokens}
    with torch.inference_mode():
        for seed in range(args.projectors):
            emb = embeddings(args.users, seed=100 + seed)
            for name, be in backends.items():
                m = LlamaCppModel(bb, projector(bb, seed), backend=be)
                m.eos_ids = [-1]  # every row makes exactly new_tokens tokens
                rows = [m.format(PROMPTS[i % len(PROMPTS)]) for i in range(args.users)]
                times = []
                for _ in range(3 if seed == 0 else 1):
                    t0 = time.perf_counter()
                    together = m.generate_tokens(rows, emb, max_new_tokens=args.new_tokens)
                    times.append(time.perf_counter() - t0)
                if seed == 0:
                    out[f"{name}_batched_tokens_per_s"] = round(args.users * args.new_tokens / statistics.median(times), 1)
                alone = [m.generate_tokens([rows[i]], emb[i:i + 1], max_new_tokens=args.new_tokens)[0]
                         for i in range(args.users)]
                out.setdefault(f"{name}_rows_equal_alone", 0)
                out[f"{name}_rows_equal_alone"] += sum(a == b for a, b in zip(together, alone))
                print(f"projector {seed} {name}: {out[f'{name}_rows_equal_alone']} rows equal alone so far", flush=True)
    out["rows"] = args.projectors * args.users
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
