"""The GPU check (scripts/gpu_check.sh): train, evaluate, generate and serve on an accelerator, against the CPU.

    python scripts/gpu_check.py [--device cuda] [--out runs/gpu-check]

On the 24 unseen people shipped with the package (the demo sample, no data folder needed):
1. train 30 steps (`e2p train --users --examples`) on the device in float32 and bfloat16 and on the CPU in
   float32, the same seed: the device's float32 validation loss equals the CPU's within 1e-3 relative, bf16's
   within 2% (bf16 keeps 8 bits of mantissa);
2. evaluate (`e2p eval`) the device-trained projector on the device;
3. generate greedily for 16 users x 4 prompts in float32 on the device and on the CPU: the same tokens;
4. serve: `e2p serve --device ...` with the 16 users in its store, 16 concurrent chat requests, all answered,
   each with the text the Python API gives for that user;
5. tokens/s of E2P against the plain backbone on the device (benchmarks/run_all.py --only generation).
Prints one line per check and writes OUT/gpu_check.json; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = ["What do you do on weekends?", "Tell me about yourself.", "What is your favourite food?",
            "Do you have any pets?"]


def e2p(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "e2p.cli", *args], check=True, cwd=ROOT)


def train(sample: Path, out: Path, device: str, dtype: str) -> float:
    out.mkdir(parents=True, exist_ok=True)
    (out / "no-dropout.json").write_text(json.dumps({"dropout": 0}))  # a research knob: the recipe file carries it
    e2p("train", "--users", str(sample / "users.npz"), "--examples", str(sample / "examples.jsonl"), "--steps", "30",
        "--device", device, "--dtype", dtype, "--recipe", str(out / "no-dropout.json"), "--out", str(out))
    report = json.loads((out / "training_report.json").read_text())
    return report["stages"]["e2p"]["best_val"]


def greedy(device: str, users: int = 16, new_tokens: int = 24) -> tuple[list, float]:
    import torch

    from e2p import E2PModel, Projector, load_backbone
    from e2p.data.contract import load_users
    from e2p.evaluate.demo import SAMPLE

    backbone = load_backbone(device=device, dtype="float32")
    model = E2PModel(backbone, Projector.from_pretrained("persona-deep-k1", backbone).eval())
    table = load_users(SAMPLE / "users.npz")
    emb = table.subset(table.ids[:users]).tensor()
    t0 = time.time()
    out = [model.generate_tokens([model.format(m)] * users, emb, max_new_tokens=new_tokens) for m in MESSAGES]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.time() - t0


def serve(device: str, workdir: Path, users: int = 16) -> dict:
    import httpx
    import torch

    from e2p import E2PModel, Projector, load_backbone
    from e2p.data.contract import load_users
    from e2p.evaluate.demo import SAMPLE

    table = load_users(SAMPLE / "users.npz")
    ids = table.ids[:users]
    store = workdir / "store.db"
    store.unlink(missing_ok=True)
    e2p("users", "import", str(SAMPLE / "users.npz"), "--store", str(store))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "e2p.cli", "serve", "--projector", "persona-deep-k1", "--store", str(store),
                             "--device", device, "--dtype", "float32", "--port", str(port), "--max-batch-size", "16"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(workdir / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)

        def ask(user: str) -> tuple[int, str]:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "e2p", "user": user, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": MESSAGES[0]}]})
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(users) as pool:
            answers = list(pool.map(ask, ids))
        seconds = time.time() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    backbone = load_backbone(device=device, dtype="float32")
    model = E2PModel(backbone, Projector.from_pretrained("persona-deep-k1", backbone).eval())
    expected = model.generate([MESSAGES[0]] * users, embeddings=table.subset(ids).tensor(), max_new_tokens=24)
    del torch
    return {"requests": users, "ok": sum(code == 200 for code, _ in answers),
            "same_text_as_api": sum(a == e for (_, a), e in zip(answers, expected)), "seconds": round(seconds, 2)}


def vllm_path(record, device) -> None:
    """The vLLM engine on the accelerator (where vLLM is installed): greedy float32 tokens of 16 users x 4 prompts
    against the torch engine on the same device, and E2P against plain tokens/s (benchmarks/vllm_engine.py)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        record("vllm", False, skipped=f"vLLM is not installed here ({exc}): pip install vllm==0.32.*")
        return
    import e2p

    t = time.time()
    torch_model = e2p.load("persona-input-k1", device=str(device), dtype="float32")
    vllm_model = e2p.load("persona-input-k1", engine="vllm", max_new_tokens=64)
    import torch

    g = torch.Generator().manual_seed(0)
    users = [torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0) for _ in range(16)]
    same = 0
    for m in MESSAGES:
        rows = [torch_model.model.format(m)] * 16
        a = torch_model.model.generate_tokens(rows, users, max_new_tokens=24)
        b = vllm_model.model.generate_tokens(rows, users, max_new_tokens=24)
        same += sum(x == y for x, y in zip(a, b))
    vllm_model.model.close()
    record("vllm_greedy_float32_same_tokens_as_torch", same == 16 * len(MESSAGES), rows_identical=same,
           rows=16 * len(MESSAGES), seconds=round(time.time() - t, 1))
    bench = ROOT / "runs" / "gpu-check" / "vllm_engine.json"
    subprocess.run([sys.executable, "benchmarks/vllm_engine.py", "--engines", "vllm,torch", "--no-gateway",
                    "--out", str(bench)], check=True, cwd=ROOT)
    engines = json.loads(bench.read_text())["engines"]
    record("vllm_tokens_per_s", True, e2p_over_plain=engines["vllm"]["e2p_over_plain"],
           vllm=engines["vllm"]["e2p"], torch=engines["torch"]["e2p"])


def main(argv=None) -> int:
    import torch

    from e2p.evaluate.demo import SAMPLE
    from e2p.devices import describe, resolve_device, resolve_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="runs/gpu-check")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": describe(device, resolve_dtype("auto", device)), "torch": torch.__version__, "checks": {}}
    print(f"gpu check on {report['device']} (torch {torch.__version__})", flush=True)
    checks = report["checks"]

    def record(name: str, ok: bool, **figures) -> None:
        checks[name] = {"ok": bool(ok), **figures}
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {figures}", flush=True)

    t = time.time()
    cpu_loss = train(SAMPLE, out / "train-cpu", "cpu", "float32")
    dev_loss = train(SAMPLE, out / "train-f32", str(device), "float32")
    bf16_loss = train(SAMPLE, out / "train-bf16", str(device), "bfloat16")
    record("train_float32_matches_cpu", abs(dev_loss - cpu_loss) <= 1e-3 * abs(cpu_loss), cpu=cpu_loss, device=dev_loss)
    record("train_bfloat16_within_tolerance", abs(bf16_loss - cpu_loss) <= 0.02 * abs(cpu_loss), cpu=cpu_loss,
           bfloat16=bf16_loss, seconds=round(time.time() - t, 1))
    t = time.time()
    e2p("eval", "--users", str(SAMPLE / "users.npz"), "--examples", str(SAMPLE / "examples.jsonl"), "--projector",
        str(out / "train-f32"), "--device", str(device), "--generate", "8", "--out", str(out / "eval"))
    results = json.loads((out / "eval" / "results.json").read_text())
    record("eval", "e2p" in results["conditions"], perplexity={k: round(v["perplexity"], 3) for k, v in results["conditions"].items()},
           seconds=round(time.time() - t, 1))
    cpu_tokens, cpu_s = greedy("cpu")
    dev_tokens, dev_s = greedy(str(device))
    rows = [(a == b) for pa, pb in zip(cpu_tokens, dev_tokens) for a, b in zip(pa, pb)]
    record("greedy_float32_same_tokens_as_cpu", all(rows), rows_identical=sum(rows), rows=len(rows),
           cpu_s=round(cpu_s, 2), device_s=round(dev_s, 2))
    served = serve(str(device), out)
    record("serve_16_concurrent", served["ok"] == served["requests"] and served["same_text_as_api"] == served["requests"], **served)
    subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only", "generation", "--device", str(device),
                    "--out", str(out / "bench.json")], check=True, cwd=ROOT)
    bench = json.loads((out / "bench.json").read_text())
    record("tokens_per_s", True, e2p_input_vs_plain=bench["e2p_vs_plain_tokens_per_s"],
           e2p_deep_vs_plain=bench["e2p_deep_vs_plain_tokens_per_s"],
           plain_tokens_per_s=bench["results"]["generation"]["serving_overhead"]["plain"]["tokens_per_s"],
           batched_vs_sequential=bench["batched_vs_sequential_throughput"])
    vllm_path(record, device)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out / 'gpu_check.json'}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
