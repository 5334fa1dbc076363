"""Run every E2P performance benchmark side by side on one backbone, print the figures, write JSON.

    python benchmarks/run_all.py --quick                 # real SmolLM2-135M-Instruct, small sizes (< 15 min, 2 CPUs)
    python benchmarks/run_all.py                         # real backbone, full sizes
    python benchmarks/run_all.py --tiny --quick --out /tmp/r.json   # tiny random model: smoke test of the scripts only

Benchmarks (one module each): bench_generation (serving overhead, E2P vs persona as text, mixed-user
batching), bench_train_step (project step vs naive full-vocabulary step, peak memory), bench_cost
(bytes per user vs LoRA), bench_scaling (curves + scaling.png). Every time is the median of repeated
runs after a warm-up (common.median_seconds). Headline keys at the top level of the JSON:
e2p_vs_plain_tokens_per_s, ttft_e2p_vs_text, batched_vs_sequential_throughput,
train_step_speedup_vs_naive (ratios) and bytes_per_user.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_cost  # noqa: E402
import bench_engines  # noqa: E402
import bench_generation  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train_step  # noqa: E402
from common import Context, get_backbone, machine  # noqa: E402

# sizes per mode; written into the JSON ("settings")
SETTINGS = {
    "quick": {
        "generation": dict(repeats=5, overhead_rounds=9, batch=8, new_tokens=16, ttft_requests=4, mixed_users=16, mixed_new_tokens=16,
                           mixed_repeats=3),
        "train_step": dict(repeats=3, batch=4, rss_steps=3),
        "engines": dict(new_tokens=32, users=16, rounds=3),
        "scaling": dict(repeats=1, batches=[1, 2, 4], train_seq_len=64, train_batch=2, train_seq_lens=[32, 64, 128],
                        gen_batches=[1, 2, 4, 8], gen_prompt_len=64, gen_batch=4, gen_prompt_lens=[32, 128, 256],
                        new_tokens=8),
    },
    "full": {
        "generation": dict(repeats=5, batch=16, new_tokens=32, ttft_requests=8, mixed_users=16, mixed_new_tokens=32,
                           mixed_repeats=3),
        "train_step": dict(repeats=5, batch=8, rss_steps=5),
        "engines": dict(new_tokens=64, users=16, rounds=5),
        "scaling": dict(repeats=3, batches=[1, 2, 4, 8, 16], train_seq_len=128, train_batch=4,
                        train_seq_lens=[32, 64, 128, 256, 512], gen_batches=[1, 2, 4, 8, 16, 32], gen_prompt_len=64,
                        gen_batch=8, gen_prompt_lens=[32, 128, 256, 512], new_tokens=16),
    },
}
# the tiny model has 256 positions: keep scaling lengths inside them
TINY_SCALING = dict(train_seq_lens=[32, 64, 128], gen_prompt_lens=[32, 64, 128])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and repeat counts")
    ap.add_argument("--tiny", action="store_true", help="tiny random model: smoke-tests the scripts, figures mean nothing")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/results.json; results_tiny.json with --tiny)")
    ap.add_argument("--png", default=None, help="scaling plot (default: scaling.png next to --out)")
    ap.add_argument("--only", nargs="*", choices=["generation", "train_step", "cost", "scaling", "engines"], default=None,
                    help="some benchmarks only (default: all but engines, which needs llama-cpp-python)")
    from e2p.devices import add_device_arguments, describe

    add_device_arguments(ap)
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    out = Path(args.out) if args.out else here / "results" / ("results_tiny.json" if args.tiny else "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.png) if args.png else out.with_name("scaling_tiny.png" if args.tiny else "scaling.png")

    settings = {k: dict(v) for k, v in SETTINGS["quick" if args.quick else "full"].items()}
    if args.tiny:
        settings["scaling"].update(TINY_SCALING)
    started = time.time()
    torch.manual_seed(0)
    backbone = get_backbone(args.tiny, args.device, args.dtype)
    load_s = time.time() - started
    where = describe(backbone.device, backbone.precision())
    print(f"backbone {backbone.name} loaded in {load_s:.1f}s on {where}; torch threads {torch.get_num_threads()}", flush=True)

    def ctx(name):
        return Context(backbone=backbone, tiny=args.tiny, quick=args.quick, settings=settings[name] if name in settings else {})

    wanted = args.only or ["generation", "train_step", "cost", "scaling"]
    results: dict = {}
    sections = {"generation": lambda: bench_generation.run(ctx("generation")),
                "train_step": lambda: bench_train_step.run(ctx("train_step")),
                "cost": lambda: bench_cost.run(ctx("cost")),
                "scaling": lambda: bench_scaling.run(ctx("scaling"), png),
                "engines": lambda: bench_engines.run(ctx("engines"))}
    for name in wanted:
        print(f"[{name}]", flush=True)
        t0 = time.time()
        results[name] = sections[name]()
        results[name]["section_wall_s"] = round(time.time() - t0, 1)

    headline = {}
    if "generation" in results:
        g = results["generation"]
        headline["e2p_vs_plain_tokens_per_s"] = g["serving_overhead"]["input_vs_plain_tokens_per_s"]
        headline["e2p_deep_vs_plain_tokens_per_s"] = g["serving_overhead"]["deep_vs_plain_tokens_per_s"]
        headline["plain_vs_plain_tokens_per_s"] = g["serving_overhead"]["plain_vs_plain_tokens_per_s"]
        headline["ttft_e2p_vs_text"] = g["persona_as_text"]["ttft_e2p_vs_text"]
        headline["prompt_tokens_saved_per_request"] = g["persona_as_text"]["prompt_tokens_saved_per_request"]
        headline["batched_vs_sequential_throughput"] = g["mixed_users"]["batched_vs_sequential_throughput"]
    if "train_step" in results:
        headline["train_step_speedup_vs_naive"] = results["train_step"]["train_step_speedup_vs_naive"]
        headline["train_loss_abs_diff_vs_naive"] = results["train_step"]["loss"]["abs_diff"]
    if "cost" in results:
        headline["bytes_per_user"] = results["cost"]["bytes_per_user"]
    if "engines" in results:
        for key in ("llamacpp_e2p_vs_plain_tokens_per_s", "llamacpp_batched_vs_torch_batched_tokens_per_s"):
            headline[key] = results["engines"][key]
    report = {
        **headline,
        "mode": {"quick": args.quick, "tiny": args.tiny,
                 "warning": "tiny random model: smoke test only, figures are meaningless" if args.tiny else None},
        "backbone": backbone.name, "backbone_load_s": round(load_s, 1), "machine": machine(), "device": where,
        "settings": settings, "timing": "median of `repeats` runs after 1 warm-up run",
        "results": results, "total_wall_s": round(time.time() - started, 1),
    }
    if args.only and out.is_file():  # some sections only: keep the others' figures, replace these
        try:
            old = json.loads(out.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and isinstance(old.get("results"), dict):
            old["results"].update(results)
            old.update(headline)
            old.setdefault("sections_rerun", {}).update({name: {"machine": machine(), "device": where,
                                                                "settings": settings.get(name)} for name in results})
            report = old
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n== headline (ratios are medians) ==")
    for k, v in headline.items():
        print(f"  {k}: {v}")
    print(f"written to {out} in {report['total_wall_s']}s")
    return report


if __name__ == "__main__":
    main()
