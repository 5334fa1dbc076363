"""e2p: personalize a frozen causal LM with Embedding-to-Prefix."""
from .config import E2PConfig
from .errors import BackboneMismatchError, ConfigError, DataError, E2PError, EmbeddingError

__all__ = [
    "load", "E2PConfig", "Projector", "E2PModel", "load_backbone", "TextEncoder",
    "E2PError", "ConfigError", "EmbeddingError", "BackboneMismatchError", "DataError",
]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing e2p imports neither torch nor transformers (e2p.engines.numpy_projector runs without them)
    if name == "load":
        from .loading import load
        return load
    if name == "Projector":
        from .projector import Projector
        return Projector
    if name == "E2PModel":
        from .model import E2PModel
        return E2PModel
    if name == "load_backbone":
        from .backbone import load_backbone
        return load_backbone
    if name == "TextEncoder":
        from .data.encoders import TextEncoder
        return TextEncoder
    raise AttributeError(name)
