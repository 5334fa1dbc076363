"""The model a server serves, loaded from disk: the backbone, the projector a folder holds, and the engine."""
from __future__ import annotations

from ..model import E2PModel


def load_model(projector_dir: str | None, backbone_name: str | None = None, max_prompt_tokens: int = 1024,
               device: str = "auto", dtype: str = "auto", engine: str = "torch", gguf: str | None = None,
               max_batch_size: int = 16, max_tokens_limit: int = 1024) -> E2PModel:
    """Backbone + projector from disk, ready to serve (on a CPU 'auto' is float32: batch-independent answers), on
    the torch or the llama-cpp engine (one llama.cpp sequence per row of the largest batch)."""
    from ..backbone import load_backbone
    from ..engines import make_model
    from ..projector import Projector

    backbone = load_backbone(backbone_name, device=device, dtype=dtype)
    projector = None
    if projector_dir is not None:
        projector = Projector.from_pretrained(projector_dir, backbone)
        projector.eval()
    return make_model(backbone, projector, engine=engine, gguf=gguf, n_seq_max=max_batch_size,
                      max_prompt_tokens=max_prompt_tokens, reply_tokens=max_tokens_limit)
