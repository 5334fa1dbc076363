"""Shared pieces of the benchmarks: timing (median after a warm-up), backbones, models, requests.

Every benchmark module exposes `run(ctx) -> dict`; `ctx` is a `Context` made by run_all.py.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# a handful of chat turns and replies; all words also exist in the tiny test tokenizer's vocabulary
MESSAGES = [
    "hi ! tell me about yourself .",
    "what do you do for fun ?",
    "how are you ?",
    "do you like music ?",
    "what do you do for work ?",
    "hello , how are you ? tell me what you like .",
    "do you like dogs or cats ?",
    "tell me about your music .",
]
REPLIES = [
    "i am fine , i like to play guitar and i love music . what do you do for fun ?",
    "i work as a teacher . i love dogs and cats , and i like to play music with someone .",
    "hello ! i am a nurse and i like to play guitar . how are you ?",
    "i love music , i play guitar . i am a teacher . tell me about yourself !",
]
# ~5 persona sentences, the "persona as text" baseline puts these in the system prompt
PERSONA_SENTENCES = [
    "i love to play guitar .",
    "i work as a teacher .",
    "i like dogs and cats .",
    "i love music .",
    "i am a nurse .",
    "i like chatting with someone i just met .",
    "i play music for fun .",
]


def persona_text(user: int, n: int = 5) -> str:
    """n persona sentences, rotated per user so requests differ."""
    k = len(PERSONA_SENTENCES)
    return " ".join(PERSONA_SENTENCES[(user + j) % k] for j in range(n))


@dataclass
class Context:
    backbone: object
    tiny: bool
    quick: bool
    settings: dict = field(default_factory=dict)  # per-benchmark sizes, written into the JSON

    def seconds(self, fn: Callable[[], object], repeats: int | None = None, warmup: int = 1) -> float:
        return median_seconds(fn, repeats if repeats is not None else self.settings["repeats"], warmup)


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Like median_seconds, but also returns the last call's result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict:
    """Time several paths in alternating rounds (A B C, B C A, ...), so a machine that speeds up or slows
    down during the run (shared VMs do) affects every path alike. Returns, per name, the median seconds,
    every round's seconds and the last result; `ratio_median(res, a, b)` gives the median per-round ratio."""
    names = list(fns)
    out: dict = {n: {"times": [], "result": None} for n in names}
    for _ in range(warmup):
        for n in names:
            out[n]["result"] = fns[n]()
    for r in range(max(1, repeats)):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            out[n]["result"] = fns[n]()
            out[n]["times"].append(time.perf_counter() - t0)
    for n in names:
        out[n]["seconds"] = statistics.median(out[n]["times"])
    return out


def ratio_median(res: dict, slow: str, fast: str) -> float:
    """Median over rounds of seconds(slow) / seconds(fast): > 1 means `fast` is faster."""
    return round(statistics.median(a / b for a, b in zip(res[slow]["times"], res[fast]["times"])), 4)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def current_rss_mb() -> float | None:
    """Resident set size now (Linux /proc), None elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def tiny_backbone():
    """The tests' tiny random Llama + word-level tokenizer (tests/conftest.py): for smoke-testing only."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import make_backbone
    finally:
        sys.path.pop(0)
    return make_backbone()


def get_backbone(tiny: bool, device: str = "auto", dtype: str = "auto"):
    """The real backbone (or the tests' tiny one) on --device in --dtype, as the product loads it."""
    from e2p.devices import resolve_device, resolve_dtype

    if tiny:
        bb = tiny_backbone()
        where = resolve_device(device)
        bb.model.to(device=where, dtype=resolve_dtype(dtype, where).weights)
        bb.dtype_spec = dtype
        return bb
    from e2p.backbone import load_backbone

    return load_backbone(device=device, dtype=dtype)


def make_projector(backbone, injection: str, seed: int = 0, embedding_dim: int = 384):
    """A random-init k=1 projector (speed does not depend on training)."""
    from e2p.model import new_config
    from e2p.projector import Projector

    torch.manual_seed(seed)
    return Projector(new_config(backbone, embedding_dim=embedding_dim, injection=injection)).eval()


def make_model(backbone, projector=None, fixed_length: bool = True, training: bool = False):
    """An E2PModel; with fixed_length, EOS is disabled on this instance so every row decodes exactly
    max_new_tokens tokens (a fair tokens/s comparison; the library itself is unchanged). `training`: the
    precision the product trains in ('auto' on a CPU: bf16 autocast where native)."""
    from e2p.model import E2PModel

    model = E2PModel(backbone, projector, training=training)
    if fixed_length:
        model.eos_ids = [-1]  # no real token has id -1: never stops early
    return model


def embeddings(n: int, dim: int = 384, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def random_ids(backbone, n: int, seed: int) -> list[int]:
    """n token ids from the backbone's vocabulary (for controlled sequence lengths)."""
    vocab = backbone.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


def machine() -> dict:
    from e2p.model import bf16_supported

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "native_bf16": bf16_supported(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")
