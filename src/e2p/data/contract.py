"""The data contract anyone can fill: a table of user embeddings and a file of examples.

Users: any file `e2p users import` reads (Parquet, CSV, JSON lines, NPZ, NPY), through the same reader
(`e2p.store.files.iter_embedding_chunks`) and the same row checks (`e2p.store.vectors.check_chunk`): one parser
for the store and for training.

Examples: JSON lines or Parquet, one row per target, each with a `user` id and either
  * `messages`: OpenAI-style chat messages; the last one is the assistant's target, everything before it
    (system and earlier turns, possibly none) is the prompt, or
  * `prompt` + `completion`: a plain prompt (sent as one user message) and its target.
An optional `profile_text` (the user described in words) feeds the text-prompt conditions.

Every problem is a DataError naming the file, the row and the fix; a bad row is never skipped quietly,
so what trains is exactly what the files say.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..store.files import iter_embedding_chunks
from ..errors import DataError
from ..store.vectors import check_chunk

EXAMPLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
ROLES = ("system", "developer", "user", "assistant")


@dataclass
class UserTable:
    """User ids and their embeddings, row i belonging to ids[i]."""

    ids: list[str]
    vectors: np.ndarray  # [N, E] float32
    source: str = ""
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {u: i for i, u in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.vectors, dtype=np.float32))

    def subset(self, ids: Sequence[str]) -> "UserTable":
        return UserTable(list(ids), self.vectors[[self.index[u] for u in ids]], self.source)


@dataclass
class Example:
    """One target of one user: `prompt` is chat messages (or one plain user message), `target` the text to learn."""

    user: str
    prompt: list[dict] | str
    target: str
    profile_text: str | None = None
    row: int = 0  # its row in the examples file, for messages


def load_users(path: str | Path, ids_file: str | Path | None = None, user_column: str = "user",
               embedding_column: str = "embedding") -> UserTable:
    """The whole table, checked row by row exactly as `e2p users import` checks it (size, NaN / inf, ids, duplicates)."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    dim = None
    seen: dict[str, int] = {}
    for users, vectors in iter_embedding_chunks(path, ids_file, user_column=user_column, embedding_column=embedding_column):
        if not len(users):
            continue
        try:
            matrix, dim = check_chunk(users, vectors, len(ids), dim)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        for i, u in enumerate(users):
            if u in seen:
                raise DataError(f"{path}: row {len(ids) + i}: user id {u!r} appears more than once (first at row "
                                f"{seen[u]}): keep one row per user")
            seen[u] = len(ids) + i
        ids += users
        parts.append(matrix)
    if not ids:
        raise DataError(f"{path} holds no user embeddings")
    return UserTable(ids, np.concatenate(parts), str(path))


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(row number, raw record) from JSON lines (1-based line numbers) or Parquet (0-based rows)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types
            raise DataError(f"cannot read {path} as Parquet ({exc})") from exc
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield row, record
                row += 1
        return
    if suffix not in EXAMPLE_SUFFIXES:
        raise DataError(f"{path}: examples must be JSON lines ({', '.join(EXAMPLE_SUFFIXES[:3])}) or Parquet")
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON ({exc}): write one object per line") from exc


def _text(value, what: str, where: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: `{what}` must be text, got {type(value).__name__}")
    return value


def parse_example(record, where: str, row: int = 0) -> Example:
    """One raw record -> Example, or DataError saying what is wrong at `where` and how to fix it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: each row must be an object with `user` and `messages` or `prompt` + `completion`")
    user = record.get("user")
    if user is None or (isinstance(user, str) and not user.strip()):
        raise DataError(f"{where}: missing `user`: every example names the user it belongs to")
    if not isinstance(user, (str, int)) or isinstance(user, bool):
        raise DataError(f"{where}: `user` must be a string id, got {type(user).__name__}")
    user = str(user)
    has_messages, has_prompt = record.get("messages") is not None, record.get("prompt") is not None
    if has_messages == has_prompt:
        raise DataError(f"{where}: give either `messages` (chat, the last one the assistant's target) or `prompt` + "
                        f"`completion`, not {'both' if has_messages else 'neither'}")
    if has_messages:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: `messages` must be a list of chat messages ending with the assistant's target")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": text}}")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is the target and must have role `assistant` "
                            f"(it has {clean[-1]['role']!r})")
        prompt, target = clean[:-1], clean[-1]["content"]  # an empty prompt: the assistant speaks first
    else:
        prompt = _text(record["prompt"], "prompt", where)
        target = _text(record.get("completion"), "completion", where)
        if not prompt.strip():
            raise DataError(f"{where}: `prompt` is empty")
    if not target.strip():
        raise DataError(f"{where}: the target is empty: drop the row or give the text the user wrote")
    profile = _text(record.get("profile_text"), "profile_text", where, required=False)
    return Example(user=user, prompt=prompt, target=target, profile_text=profile or None, row=row)


def load_examples(path: str | Path, users: UserTable | None = None) -> list[Example]:
    """Every example of the file, checked; with `users`, every example's user must have an embedding."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass a JSON lines or Parquet file of examples")
    examples = []
    for row, record in _records(path):
        where = f"{path}:{row}" if path.suffix.lower() != ".parquet" else f"{path} row {row}"
        ex = parse_example(record, where, row)
        if users is not None and ex.user not in users.index:
            raise DataError(f"{where}: user {ex.user!r} has no embedding in {users.source}: add it there or drop "
                            "this user's examples")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def limit_examples(examples: list, limit: int | None, seed: int) -> list:
    """At most `limit` of `examples`, drawn with `seed` (all of them when `limit` is None or not smaller): the
    rule of `evaluate_examples(limit=...)`, also for commands that draw before persona data is embedded."""
    return random.Random(seed).sample(examples, limit) if limit and limit < len(examples) else examples


def split_validation_users(ids: Sequence[str], n_val: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) user ids: validation users are people never trained on. Deterministic in `seed`."""
    ids = sorted(set(ids))
    if n_val < 2 or n_val > len(ids) - 2:
        raise DataError(f"{len(ids)} users with examples cannot give {n_val} validation users and at least 2 to "
                        "train on: add users or change the number of validation users")
    random.Random(seed).shuffle(ids)
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def write_users(path: str | Path, ids: Sequence[str], vectors: np.ndarray) -> Path:
    """A user table as `.npz` (arrays `user`, `embedding`), readable by `load_users` and `e2p users import`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, user=np.asarray(list(ids), dtype=str), embedding=np.asarray(vectors, dtype=np.float32))
    return path


def write_examples(path: str | Path, examples: Sequence[Example]) -> Path:
    """Examples as JSON lines in the contract's shape (`messages` for chats, `prompt` + `completion` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            if isinstance(ex.prompt, str):
                record = {"user": ex.user, "prompt": ex.prompt, "completion": ex.target}
            else:
                record = {"user": ex.user, "messages": list(ex.prompt) + [{"role": "assistant", "content": ex.target}]}
            if ex.profile_text:
                record["profile_text"] = ex.profile_text
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
