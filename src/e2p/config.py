"""E2PConfig: everything needed to rebuild a projector and check it fits a backbone."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError

INJECTIONS = ("input", "deep")
PRETRAINED_DIR = Path(__file__).parent / "pretrained"  # projectors shipped with the package, addressed by name
SPLIT_FILE = "split.json"  # in a run folder: the run's training, selection and verdict user ids (never ship it)


def read_json_object(path: str | Path, what: str, missing_hint: str) -> dict:
    """A JSON object from a file a user gives (a recipe, a profile rule); DataError naming the file and the fix for a
    missing file, unreadable JSON or JSON that is no object."""
    from .errors import DataError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist: {missing_hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} must be a JSON object")
    return data


def shipped_projectors() -> list[str]:
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file()) if PRETRAINED_DIR.is_dir() else []


def resolve_projector(name_or_path: str | Path) -> Path:
    """A projector folder, or the name of one shipped with the package (like a model id: "persona-deep-k1")."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    shipped = PRETRAINED_DIR / str(name_or_path)
    if not path.exists() and (shipped / "config.json").is_file():
        return shipped
    if path.is_dir():
        raise ConfigError(f"no config.json in {path}: is this a directory written by save_pretrained / `e2p train`?")
    raise ConfigError(f"no projector {str(name_or_path)!r}: pass a folder written by `e2p train` or a shipped name "
                      f"({', '.join(shipped_projectors()) or 'none shipped'})")
POSITIONS = ("start", "after_system", "after_sink")


REQUIRED_KEYS = ("embedding_dim", "num_prefix_tokens", "hidden_dims", "injection", "backbone_name", "backbone_hidden_size")


def _fits(value, kind: str) -> bool:
    """Whether a JSON value has the type a config field is annotated with (annotations are strings here)."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    checks = {
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "float": number,
        "str": lambda x: isinstance(x, str),
        "bool": lambda x: isinstance(x, bool),
        "list[int]": lambda x: isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x),
        "list[float] | None": lambda x: x is None or (isinstance(x, list) and all(number(i) for i in x)),
        "list[str]": lambda x: isinstance(x, list) and all(isinstance(i, str) for i in x),
        "dict[str, list[int]]": lambda x: isinstance(x, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)
            for v in x.values()),
    }
    return checks.get(kind, lambda x: True)(value)


def refuse_removed(raw: dict, path) -> None:
    """A config.json of a projector kind e2p no longer runs, refused with what to do (E2PConfig.load and the numpy
    projector, which reads config.json itself)."""
    if raw.get("prototypes"):
        raise ConfigError(f"{path} is a prototype-mixing projector: that study lost (docs/studies.md) and e2p no "
                          "longer runs it; retrain with `e2p train` (the person MLP) or use e2p 0.x to read it")


@dataclass
class E2PConfig:
    """Projector configuration, saved as config.json beside model.safetensors.

    embedding_dim == 0 makes a *shared* prefix: k trained soft tokens with no user input
    (prompt tuning), the style-only control every E2P figure is compared with.
    """

    embedding_dim: int = 384
    num_prefix_tokens: int = 1
    hidden_dims: list[int] = field(default_factory=lambda: [1024])
    dropout: float = 0.1
    output_norm: bool = True
    injection: str = "input"  # "input": soft tokens; "deep": a key/value prefix in every layer
    # "start": before the chat template (the prefix takes position 0, where the model keeps its attention sink);
    # "after_sink": behind one copy of the prompt's first token, which stays the sink; "after_system" (input only)
    prefix_position: str = "start"
    backbone_name: str = ""
    backbone_hidden_size: int = 0
    backbone_num_layers: int = 0
    backbone_kv_dim: int = 0  # num_key_value_heads * head_dim, for deep injection
    token_embedding_norm: float = 1.0  # mean norm of the backbone's token embeddings
    encoder_name: str = ""
    system_prompt: str = "You are chatting with someone you just met. Reply briefly."
    embedding_mean: list[float] | None = None  # centering learned from the training embeddings
    person_scale: float = 1.0  # multiplies the person part (shared + scale * person); calibrated on validation people
    # > 1: the embedding is `embedding_slots` blocks (one per persona sentence, encoders.SentenceSlotEncoder), each
    # block gives one prefix token through the same MLP, an all-zero block none
    embedding_slots: int = 1
    # > 0: a set profile: the embedding is up to `set_items` item vectors (what the user did, most recent last; an
    # all-zero block is no item) that attention with k learned queries pools into the k prefix tokens (Projector)
    set_items: int = 0
    # > 0: a LoRA adapter of this rank on the backbone's `lora_modules` ({module name: [out, in]}), shared by every user
    # and trained with the projector (e2p.lora); its tensors are saved beside the projector in `adapter/`, PEFT's format
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the update is (lora_alpha / lora_rank) * B A x
    lora_targets: list[str] = field(default_factory=list)  # the layer names it was made for (e.g. q_proj, v_proj)
    lora_modules: dict[str, list[int]] = field(default_factory=dict)
    # formatting the projector was trained with, so evaluation and serving format rows the same way
    history_turns: int = 2  # earlier dialogue turns kept in a prompt built from a persona dialogue
    max_target_tokens: int = 32  # target tokens scored per example (training loss and evaluation)

    def __post_init__(self) -> None:
        if self.injection not in INJECTIONS:
            raise ConfigError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.prefix_position not in POSITIONS:
            raise ConfigError(f"prefix_position must be one of {POSITIONS}, got {self.prefix_position!r}")
        if self.prefix_position == "after_system" and self.injection != "input":
            raise ConfigError("prefix_position 'after_system' needs injection 'input' (a deep prefix's keys sit in the cache "
                              "before the prompt): use 'start' or 'after_sink'")
        if self.num_prefix_tokens < 1:
            raise ConfigError(f"num_prefix_tokens must be >= 1, got {self.num_prefix_tokens}")
        if not (0.0 <= self.person_scale < float("inf")):
            raise ConfigError(f"person_scale must be a finite number >= 0, got {self.person_scale!r}")
        if self.embedding_dim < 0:
            raise ConfigError(f"embedding_dim must be >= 0, got {self.embedding_dim}")
        if self.embedding_slots < 1:
            raise ConfigError(f"embedding_slots must be >= 1, got {self.embedding_slots}")
        if self.embedding_slots > 1 and not self.is_shared:
            if self.embedding_dim % self.embedding_slots:
                raise ConfigError(f"embedding_dim {self.embedding_dim} is not a multiple of embedding_slots {self.embedding_slots}")
            if self.num_prefix_tokens != self.embedding_slots:
                raise ConfigError(f"with embedding_slots {self.embedding_slots} each slot gives one prefix token: set "
                                  f"num_prefix_tokens to {self.embedding_slots}, got {self.num_prefix_tokens}")
        if self.set_items < 0:
            raise ConfigError(f"set_items must be >= 0, got {self.set_items}")
        if self.set_items and not self.is_shared:
            if self.embedding_slots > 1:
                raise ConfigError("a set profile (set_items) pools its items itself: no embedding_slots")
            if self.embedding_dim % self.set_items:
                raise ConfigError(f"embedding_dim {self.embedding_dim} is not a multiple of set_items {self.set_items}")
        if self.lora_rank < 0 or (self.lora_rank > 0 and (not self.lora_modules or not self.lora_alpha > 0)):
            raise ConfigError(f"lora_rank must be >= 0, and a LoRA adapter (rank {self.lora_rank}) needs lora_modules "
                              f"and lora_alpha > 0 (got {len(self.lora_modules)} modules, alpha {self.lora_alpha!r})")

    @property
    def is_shared(self) -> bool:
        return self.embedding_dim == 0

    @property
    def blocks(self) -> int:
        """How many vectors one embedding holds: a set profile's items, the slots, or 1."""
        return self.set_items or self.embedding_slots

    @property
    def slot_dim(self) -> int:
        """Size of one block of the embedding (an item, a slot; the whole embedding when there is one)."""
        return self.embedding_dim // self.blocks

    @property
    def prefix_dim(self) -> int:
        """Size of one prefix vector: hidden size (input) or layers x (K, V) (deep)."""
        if self.injection == "deep":
            return self.backbone_num_layers * 2 * self.backbone_kv_dim
        return self.backbone_hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "E2PConfig":
        path = resolve_projector(directory) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt, retrain or restore it") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object: restore the projector's config.json")
        refuse_removed(raw, path)
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}: these are never guessed; restore the file or retrain")
        kinds = {f.name: f.type for f in fields(cls)}
        for key, value in raw.items():
            if key in kinds and not _fits(value, kinds[key]):
                raise ConfigError(f"{path}: {key} is {value!r} ({type(value).__name__}), expected {kinds[key]}: "
                                  "fix the value or restore the file")
        return cls(**{k: v for k, v in raw.items() if k in kinds})
