"""Engines that run the backbone's forward passes behind one interface (`base.Engine`): torch (e2p.model.E2PModel,
the default) or llama.cpp (`llamacpp`, input injection on any GGUF, no torch weights). Both format prompts with
e2p.formatting and serve through the same decode loop."""
from __future__ import annotations

ENGINES = ("torch", "llama-cpp")
DEFAULT_PROJECTOR = {"torch": "persona-deep-k1", "llama-cpp": "persona-input-k1"}


def add_engine_arguments(parser) -> None:
    """--engine and --gguf, the same on generate, eval and serve."""
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="torch (any Hugging Face causal LM, input or deep projectors) or llama-cpp (the GGUF "
                             "through llama.cpp, input projectors only; pip install 'e2p[llamacpp]')")
    parser.add_argument("--gguf", default=None, help="with --engine llama-cpp: the GGUF to run (any quantization "
                                                     "llama.cpp reads; default: the named backbone's own), or f32, "
                                                     "q8_0 or q4_0: that GGUF converted once and cached (q8_0 "
                                                     "decodes many rows faster)")


def check_engine(engine: str, config) -> None:
    """Refuse, before any model loads, a projector (its E2PConfig) the engine cannot run: the llama-cpp engine takes
    neither deep injection nor a shared LoRA adapter."""
    if engine == "llama-cpp":
        from .llamacpp import check_projector

        check_projector(config)


def evaluation_engine(backbone, engine: str = "torch", gguf: str | None = None, n_seq_max: int = 16):
    """The evaluation loop's `engine=` (every condition on one loaded GGUF), or None for torch."""
    if engine != "llama-cpp":
        return None
    from .gguf_convert import resolve_gguf
    from .llamacpp import LlamaCppBackend, LlamaCppModel

    return LlamaCppModel.factory(LlamaCppBackend(resolve_gguf(backbone.name, gguf), n_seq_max=n_seq_max))
