"""How often a greedy answer depends on its batch, per dtype: 16 users x 4 prompts, each row alone and in a batch.

    python benchmarks/bench_batch_invariance.py                          # float32 and bfloat16 on this machine
    python benchmarks/bench_batch_invariance.py --dtypes float32 --device cuda

The shipped projector (persona-deep-k1) and the 16 first people of the demo sample (their real persona
embeddings). Each prompt is generated once for all 16 users in one batch and once per user alone; a row
agrees when its greedy tokens are identical. In float32 every row must agree (the tests check it too);
in bf16 a row's matmuls see different shapes in different batches, so rounding, and with it a near-tie
between two tokens, can change. Writes benchmarks/results/batch_invariance.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MESSAGES = ["What do you do on weekends?", "Tell me about yourself.", "What is your favourite food?",
            "Do you have any pets?"]


def measure(dtype: str, device: str, users: int, new_tokens: int) -> dict:
    from e2p import E2PModel, Projector, load_backbone
    from e2p.data.contract import load_users
    from e2p.evaluate.demo import SAMPLE

    backbone = load_backbone(device=device, dtype=dtype)
    model = E2PModel(backbone, Projector.from_pretrained("persona-deep-k1", backbone).eval())
    table = load_users(SAMPLE / "users.npz")
    emb = table.subset(table.ids[:users]).tensor()
    rows_total, agree, first_diff = 0, 0, []
    t0 = time.time()
    for message in MESSAGES:
        rows = [model.format(message)] * users
        batched = model.generate_tokens(rows, emb, max_new_tokens=new_tokens)
        for i in range(users):
            alone = model.generate_tokens(rows[i:i + 1], emb[i:i + 1], max_new_tokens=new_tokens)[0]
            rows_total += 1
            if alone == batched[i]:
                agree += 1
            else:
                first_diff.append(next((j for j, (a, b) in enumerate(zip(alone, batched[i])) if a != b),
                                       min(len(alone), len(batched[i]))))
    return {"dtype": dtype, "precision": backbone.precision().name, "autocast": str(model.autocast),
            "rows": rows_total, "rows_identical": agree, "agreement": round(agree / rows_total, 4),
            "first_differing_token": sorted(first_diff), "new_tokens": new_tokens, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> dict:
    from e2p.devices import cpu_has_native_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_invariance.json"))
    args = ap.parse_args(argv)
    results = [measure(d, args.device, args.users, args.new_tokens) for d in args.dtypes.split(",")]
    for r in results:
        print(f"{r['dtype']} ({r['precision']}): {r['rows_identical']}/{r['rows']} rows identical alone and batched "
              f"(first differing token: {r['first_differing_token']}) in {r['seconds']} s")
    report = {"device": args.device, "native_bf16_cpu": cpu_has_native_bf16(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
