"""Where a backbone runs and in which precision: `--device` / `--dtype`, resolved once when the backbone loads.

Everything else (projector, embeddings, caches, sampling streams, the server's batcher) follows the backbone's
device, so this is the only module that looks at what hardware there is.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """bf16 only pays on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is ~100x slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' (the accelerator when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps' -> a torch.device that exists."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: use one of {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device is visible to this process (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or install a CUDA build of torch")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ..)")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise ConfigError("--device mps: this machine has no Metal (MPS) backend; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {spec!r}: use one of {DEVICE_CHOICES}")
    return device


@dataclass(frozen=True)
class Precision:
    """How a backbone computes: the dtype of its weights, and the autocast dtype on top of them (None: none).

    On a CPU bf16 is autocast over float32 weights (the weights stay exact, matmuls run in bf16 where the CPU has
    it natively); on a GPU the weights themselves are bf16/fp16, which halves their memory."""

    weights: torch.dtype = torch.float32
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        return str(self.autocast or self.weights).replace("torch.", "")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, training: bool = False) -> Precision:
    """'auto' | 'float32' | 'bfloat16' | 'float16' (or a torch.dtype) on `device` -> a Precision.

    'auto': bf16 on a GPU that has it (float32 on older ones and on MPS); on a CPU float32 for generation and
    serving, so that a greedy answer never depends on its batch, and bf16 autocast for training where the CPU
    has native bf16."""
    if isinstance(spec, torch.dtype):
        spec = str(spec).replace("torch.", "")
    spec = (spec or "auto").strip().lower()
    if spec not in DTYPES:
        raise ConfigError(f"--dtype {spec!r}: use one of {'|'.join(DTYPES)}")
    if spec == "auto":
        if device.type == "cuda":
            spec = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        elif device.type == "cpu" and training and cpu_has_native_bf16():
            spec = "bfloat16"
        else:
            spec = "float32"
    dtype = _DTYPE[spec]
    if device.type == "cpu":
        if dtype == torch.float16:
            raise ConfigError("--dtype float16 is for GPUs; on a CPU use bfloat16 (fast only with AVX512-BF16/AMX) or float32")
        return Precision(torch.float32, None if dtype == torch.float32 else dtype)
    return Precision(dtype, None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A torch.autocast context for `device`'s type, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(device: torch.device, precision: Precision) -> str:
    """One line for logs and reports: 'cuda:0 (NVIDIA H100), bfloat16'."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    mode = precision.name + (" autocast over float32 weights" if precision.autocast is not None else "")
    return f"{where}, {mode}"


def add_device_arguments(parser) -> None:
    """--device and --dtype, the same on every command that loads a backbone."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: the accelerator when there is one)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bf16 on a recent GPU; on a CPU float32 to generate and serve (a greedy answer never "
                             "depends on its batch), bf16 autocast to train where the CPU has native bf16")


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for /healthz, the engines' memory report and the soak benchmark."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
