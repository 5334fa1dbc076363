"""The live profile: what a user does (texts they wrote, item vectors) folded into their embedding as it happens.

A profile *rule* says how a user's actions become the vector a projector reads; it is the rule the training
users were built with, so a user whose profile grows online gets exactly the vector the same history would
have given in batch. The rule is a JSON file (`<users file>.profile.json` beside the users table that `e2p data`
writes, copied into the projector folder as `profile.json` by `e2p train`):

    {"format": "e2p-profile/1", "encoder": "all-MiniLM-L6-v2", "normalize": true,
     "style": null | {"features": [...], "mean": [...], "scale": [...]},   # e2p.data.headline_style
     "half_life_events": null | H, "set_items": null | N}

The vector is the (unit) mean of the items' encoder vectors, joined, where the rule has `style`, with the
z-scored style statistics of the texts (capitalisation, length, punctuation). Both are ratios of sums, so a
profile is kept as *running sums* (`ProfileSums`): folding one item adds to them, and the vector is recomputed
from them in microseconds. Online and batch give the same vector (tested). With `half_life_events` H every
earlier sum is multiplied by 0.5 ** (1 / H) before an item is added, so an item H items old weighs half as much
as the newest one (a window that forgets smoothly; None: all items weigh the same, the exact mean).

With `set_items` N the user is a *set* (a set profile, Projector with config.set_items): each item becomes the
vector of a profile of that one item (by the rule without set_items), the newest N are kept in order (the oldest
out), and the embedding is them one after another, all-zero blocks for the items not there yet (`ProfileSet`).

What is kept per user is the sums (float64) or the set's item vectors, never the texts: a text's words are counted,
then dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import read_json_object
from ..errors import DataError
from .headline_style import STYLE_COUNTERS, STYLE_FEATURES, style_counts, style_from_counts

FORMAT = "e2p-profile/1"
PROFILE_FILE = "profile.json"
def rule_path(users_file: str | Path) -> Path:
    """Where the rule that built a users table lies: `users_text.npz` -> `users_text.profile.json`."""
    users_file = Path(users_file)
    return users_file.with_name(users_file.name.split(".")[0] + ".profile.json")


def carry_rule(users, out_dir: str | Path) -> Path | None:
    """Copy the rule beside a users table (`users.source`) into a projector folder as `profile.json`, where it
    matches the table's vector size; None when the table has no rule (vectors made elsewhere)."""
    if not users.source:
        return None
    beside = rule_path(users.source)
    if not beside.is_file():
        return None
    rule = ProfileRule.load(beside)
    if rule.embedding_dim != users.dim:
        raise DataError(f"{beside} makes {rule.embedding_dim}-dim vectors but {users.source} holds {users.dim}-dim "
                        "ones: it is not the rule of this table; remove it or rebuild the data with `e2p data`")
    return rule.save(Path(out_dir) / PROFILE_FILE)


@dataclass
class ProfileRule:
    """How actions become an embedding; see the module doc. `dim`: the encoder's vector size."""

    dim: int
    encoder: str = "all-MiniLM-L6-v2"
    normalize: bool = True
    style: dict | None = None  # {"features", "mean", "scale"}: headline_style.StyleScaler.to_dict()
    half_life_events: float | None = None
    set_items: int | None = None  # a set profile: the newest N items' own vectors, not one mean

    def __post_init__(self):
        if self.set_items is not None and (not isinstance(self.set_items, int) or self.set_items < 1):
            raise DataError(f"set_items must be a whole number >= 1 or null, got {self.set_items!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise DataError(f"a profile rule needs the encoder's vector size (dim >= 1), got {self.dim!r}")
        if self.half_life_events is not None and not (isinstance(self.half_life_events, (int, float))
                                                      and math.isfinite(self.half_life_events)
                                                      and self.half_life_events > 0):
            raise DataError(f"half_life_events must be a positive number of events or null, got {self.half_life_events!r}")
        if self.style is not None:
            if list(self.style.get("features", [])) != list(STYLE_FEATURES):
                raise DataError(f"the profile rule's style features {self.style.get('features')!r} are not this "
                                f"version's {list(STYLE_FEATURES)!r}: rebuild the data with `e2p data`")
            self._mean = np.asarray(self.style["mean"], dtype=np.float64)
            self._scale = np.asarray(self.style["scale"], dtype=np.float64)

    @property
    def item_dim(self) -> int:
        """The size of one item's (or a mean profile's) vector: the encoder's, plus the style block."""
        return self.dim + (len(STYLE_FEATURES) if self.style else 0)

    @property
    def embedding_dim(self) -> int:
        """The size of the vector this rule makes (what the projector reads)."""
        return self.item_dim * (self.set_items or 1)

    def item_rule(self) -> "ProfileRule":
        """The rule one item's vector is made by (this rule without set_items)."""
        return ProfileRule(self.dim, self.encoder, self.normalize, self.style, None, None)

    @property
    def decay(self) -> float:
        return 1.0 if self.half_life_events is None else 0.5 ** (1.0 / self.half_life_events)

    def empty(self):
        if self.set_items:
            return ProfileSet(np.zeros((0, self.item_dim), dtype=np.float32))
        return ProfileSums(np.zeros(self.dim), np.zeros(len(STYLE_COUNTERS) if self.style else 0))

    # --- folding ---------------------------------------------------------------------------------
    def fold(self, sums: "ProfileSums", vectors: np.ndarray, texts: Sequence[str | None]) -> "ProfileSums":
        """`sums` with items added in order: `vectors[i]` (the encoder vector of item i) and `texts[i]` (its
        text, or None for an item given only as a vector: it adds to the mean vector, not to the style)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(texts):
            raise DataError(f"profile items must be [n, {self.dim}] vectors with one text (or None) each, got "
                            f"{tuple(vectors.shape)} and {len(texts)} texts")
        if self.set_items:  # each item its own vector, the newest set_items kept
            items = self.item_rule()
            new = [items.batch(v[None], [t]) for v, t in zip(vectors, texts)]
            kept = np.concatenate([sums.items, np.asarray(new, dtype=np.float32).reshape(-1, self.item_dim)])
            return ProfileSet(kept[-self.set_items:], sums.events + len(new))
        out = sums.copy()
        d = self.decay
        for v, text in zip(vectors, texts):
            out.vector_sum *= d
            out.weight *= d
            out.style_counts *= d
            out.vector_sum += v
            out.weight += 1.0
            if self.style and text is not None:
                out.style_counts += style_counts(text)
            out.events += 1
        return out

    def vector(self, sums: "ProfileSums") -> np.ndarray:
        """[embedding_dim] float32: the embedding these sums stand for (zeros for a profile with no item)."""
        if self.set_items:
            out = np.zeros((self.set_items, self.item_dim), dtype=np.float32)
            out[:len(sums.items)] = sums.items
            return out.reshape(-1)
        mean = sums.vector_sum / sums.weight if sums.weight > 0 else np.zeros(self.dim)
        if self.normalize:
            mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        if not self.style:
            return mean.astype(np.float32)
        style = (style_from_counts(sums.style_counts) - self._mean) / self._scale / np.sqrt(len(STYLE_FEATURES))
        return np.concatenate([mean.astype(np.float32), style.astype(np.float32)])

    def batch(self, vectors: np.ndarray, texts: Sequence[str | None]) -> np.ndarray:
        """The embedding of a whole history at once: the same as folding it item by item."""
        return self.vector(self.fold(self.empty(), vectors, texts))

    def each(self, vectors: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """[N, embedding_dim]: each text on its own as a profile of one item (a user described by one text)."""
        return np.stack([self.batch(vectors[i:i + 1], [t]) for i, t in enumerate(texts)])

    def fold_stored(self, blob: bytes | None, vectors: np.ndarray, texts: Sequence[str | None]) -> "ProfileSums":
        """The sums a store holds (`ProfileSums.to_bytes`, None: no profile yet) with items folded in."""
        kind = ProfileSet if self.set_items else ProfileSums
        return self.fold(self.empty() if blob is None else kind.from_bytes(blob, self), vectors, texts)

    # --- files -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "dim": self.dim, "encoder": self.encoder, "normalize": self.normalize,
                "style": self.style, "half_life_events": self.half_life_events, "set_items": self.set_items}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProfileRule":
        path = Path(path)
        data = read_json_object(path, "profile rule", "`e2p data` writes one beside each users file (<users>.profile.json)")
        if data.get("format") != FORMAT:
            raise DataError(f"{path} is not a profile rule: expected a JSON object with \"format\": \"{FORMAT}\"")
        try:
            return cls(dim=data["dim"], encoder=data.get("encoder", "all-MiniLM-L6-v2"),
                       normalize=bool(data.get("normalize", True)), style=data.get("style"),
                       half_life_events=data.get("half_life_events"), set_items=data.get("set_items"))
        except (KeyError, TypeError) as exc:
            raise DataError(f"profile rule {path} is missing or has a bad field ({exc}): write it again with "
                            "`e2p data`") from None


def serving_rule(projector_dir: str | Path | None, config, path: str | Path | None = None) -> ProfileRule | None:
    """The rule a server folds events with: `path` if given, else the projector folder's `profile.json`, else the
    plain unit mean of the projector's encoder vectors (what a persona projector's users were made with); None for
    a projector whose embedding is several sentence slots (no mean of items makes one)."""
    from ..errors import ConfigError

    found = Path(path) if path else (Path(projector_dir) / PROFILE_FILE if projector_dir else None)
    if found is not None and (path or found.is_file()):
        rule = ProfileRule.load(found)
        if rule.embedding_dim != config.embedding_dim:
            raise ConfigError(f"profile rule {found} makes {rule.embedding_dim}-dim vectors, the projector reads "
                              f"{config.embedding_dim}: give the rule of the users it was trained on")
        return rule
    if getattr(config, "embedding_slots", 1) > 1:
        return None
    if getattr(config, "set_items", 0):  # a set of the encoder's item vectors
        return ProfileRule(dim=config.slot_dim, encoder=config.encoder_name or "all-MiniLM-L6-v2", set_items=config.set_items)
    return ProfileRule(dim=config.embedding_dim, encoder=config.encoder_name or "all-MiniLM-L6-v2")


@dataclass
class ProfileSums:
    """A user's running sums: the (decayed) sum of item vectors and its weight, the style counters, the number of
    items folded. Saved as float64 bytes (`to_bytes`), never as text."""

    vector_sum: np.ndarray  # float64 [dim]
    style_counts: np.ndarray  # float64 [len(STYLE_COUNTERS)] or [0]
    weight: float = 0.0
    events: int = 0

    def copy(self) -> "ProfileSums":
        return ProfileSums(self.vector_sum.copy(), self.style_counts.copy(), self.weight, self.events)

    def to_bytes(self) -> bytes:
        head = np.asarray([self.weight, float(self.events)], dtype=np.float64)
        return np.concatenate([head, self.vector_sum, self.style_counts]).astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, rule: ProfileRule) -> "ProfileSums":
        values = np.frombuffer(blob, dtype="<f8")
        n_style = len(STYLE_COUNTERS) if rule.style else 0
        if values.size != 2 + rule.dim + n_style or not np.isfinite(values).all():
            raise DataError(f"stored profile sums hold {values.size} values, this rule needs {2 + rule.dim + n_style}: "
                            "the profile was built by another rule; rebuild it with `e2p users update`")
        return cls(values[2:2 + rule.dim].copy(), values[2 + rule.dim:].copy(), float(values[0]), int(values[1]))


@dataclass
class ProfileSet:
    """A set profile's items (float32 [n <= set_items, item_dim], oldest first) and the number of items folded."""

    items: np.ndarray
    events: int = 0

    def to_bytes(self) -> bytes:
        return np.asarray([len(self.items), self.events], dtype="<i8").tobytes() + self.items.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, rule: ProfileRule) -> "ProfileSet":
        n, events = (np.frombuffer(blob[:16], dtype="<i8").tolist() if len(blob) >= 16 else (-1, 0))
        items = np.frombuffer(blob[16:], dtype="<f4")
        if n < 0 or n > rule.set_items or items.size != n * rule.item_dim or not np.isfinite(items).all():
            raise DataError("the stored set profile does not fit this rule: the profile was built by another rule; "
                            "rebuild it with `e2p users update`")
        return cls(items.reshape(n, rule.item_dim).copy(), int(events))


def read_events(path: str | Path, rule: ProfileRule) -> dict[str, list[tuple[str | None, np.ndarray | None]]]:
    """A JSON-lines file of events, `{"user": ID, "text": TEXT}` or `{"user": ID, "vector": [...]}`, checked whole
    before anything is folded -> {user: [(text, vector), ...] in file order}; DataError naming the line and the fix."""
    from ..errors import EmbeddingError
    from ..store.vectors import as_vector, check_user_id

    path = Path(path)
    if not path.is_file():
        raise DataError(f"events file {path} does not exist: give JSON lines of {{\"user\", \"text\" | \"vector\"}}")
    events: dict[str, list] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg}): one JSON object per line") from None
            if not isinstance(record, dict) or ("text" in record) == ("vector" in record):
                raise DataError(f"{where}: each event is {{\"user\": ID, \"text\": TEXT}} or {{\"user\": ID, "
                                "\"vector\": [...]}: exactly one of text and vector")
            try:
                user = check_user_id(record.get("user"))
                if "text" in record:
                    text = record["text"]
                    if not isinstance(text, str) or not text.strip():
                        raise DataError("the text is empty: every text event needs the text the user wrote")
                    item = (text, None)
                else:
                    item = (None, as_vector(record["vector"], rule.dim))
            except (EmbeddingError, DataError) as exc:
                raise DataError(f"{where}: {exc}") from None
            events.setdefault(user, []).append(item)
    if not events:
        raise DataError(f"{path} holds no events")
    return events


def fold_event_file(path: str | Path, store, rule: ProfileRule, tenant: str, encoder=None,
                    progress: bool = True) -> tuple[int, int]:
    """`e2p users update`: every event of the file folded into its user's profile in `store` (one transaction per
    user), by exactly the rule a server folds with. -> (users, events)."""
    from tqdm.auto import tqdm

    events = read_events(path, rule)
    texts = [t for items in events.values() for t, _ in items if t is not None]
    if texts:
        if encoder is None:
            from .encoders import TextEncoder

            encoder = TextEncoder(rule.encoder)
        encoded = iter(np.asarray(encoder.encode(texts, show_progress_bar=progress), dtype=np.float32))
    total = 0
    for user, items in tqdm(events.items(), desc="profiles", disable=not progress, dynamic_ncols=True):
        vectors = np.stack([next(encoded) if t is not None else v for t, v in items])
        if vectors.shape[1] != rule.dim:
            raise DataError(f"the encoder gives {vectors.shape[1]} values, the rule folds {rule.dim}: use the rule's "
                            f"encoder ({rule.encoder})")

        def update(blob, vectors=vectors, items=items):
            sums = rule.fold_stored(blob, vectors, [t for t, _ in items])
            return sums.to_bytes(), rule.vector(sums)

        store.update_profile(user, update, tenant)
        total += len(items)
    return len(events), total
