"""The one reader of embedding files: the store's import, the data contract (`load_users`) and the CLI all read
vectors through it, so a file means the same everywhere. Nothing here unpickles, and tables stream in chunks
(`iter_embedding_chunks`) so that memory stays flat however large the file.

Tables of users (one row per user):
* Parquet (`.parquet`): a user id column (`user`, any type, turned into a string) plus either a list column
  `embedding` (list<float|double>, large_list or fixed_size_list, as Spark `array<float>` / BigQuery
  `ARRAY<FLOAT64>` exports write them; a one-field struct around the list or its items is unwrapped) or
  numeric columns (taken in file order, e.g. `e0, e1, ...`). Other names: `user_column=` /
  `embedding_column=` (`e2p users import --user-column --embedding-column`). Read with `iter_batches`.
* CSV (`.csv`): a header with `user` plus either an `embedding` column holding a JSON list
  (`"[0.1, 0.2]"`) or numeric columns in header order. Read row by row.
* JSON lines (`.jsonl`, `.ndjson`, `.json`): one object per line, `{"user": "...", "embedding": [...]}`
  (or numeric keys in order instead of `embedding`). Read line by line.
* NumPy `.npz`: arrays `user` (strings) and `embedding` ([N, E]); also `users` / `embeddings`. Both
  members are streamed out of the zip (compressed or not).
* NumPy `.npy`: a structured array with fields `user` and `embedding`, or a plain [N, E] array whose
  user ids are the row numbers "0".."N-1" (or the lines of an ids file). Memory-mapped (`mmap_mode="r"`).

`read_embeddings(path)` returns a whole table as (user, vector) pairs, for small files. `read_vector(path)` reads ONE
user's vector (`.npy`, `.json`, `.safetensors`, or comma-separated text), as `e2p generate --embedding` takes it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError, EmbeddingError
from .vectors import as_vector

DEFAULT_CHUNK_ROWS = 10_000
IMPORT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json", ".npz", ".npy")
Chunk = tuple[list[str], object]  # (user ids, [n, E] float32 array or a list of n per-row values)


def _user_str(value) -> str | None:
    """A user id from a file as a string; a missing (null) id stays None so that it is refused, not stored as "None"."""
    return None if value is None else str(value)


def _unwrap_list(arr):
    """A list-like Arrow array (list / large_list / fixed_size_list, maybe in a one-field struct, items maybe
    one-field structs as some BigQuery / Hive exports write them) -> (flat values, offsets or None, width)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    while pa.types.is_struct(arr.type) and arr.type.num_fields == 1:
        arr = arr.field(0)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return None
    if arr.null_count:
        i = int(np.argmax(np.asarray(arr.is_null())))
        raise DataError(f"row {i}: the embedding is null")
    values = arr.flatten()
    while pa.types.is_struct(values.type) and values.type.num_fields == 1:
        values = values.field(0)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type) or pa.types.is_decimal(values.type)):
        raise DataError(f"embedding items are {values.type}, not numbers")
    if values.null_count:
        raise DataError("an embedding contains null values: recompute it before importing")
    flat = np.asarray(values.cast(pa.float32()) if not pa.types.is_float32(values.type) else values, dtype=np.float32)
    if pa.types.is_fixed_size_list(t):
        return flat, None, t.list_size
    offsets = np.asarray(arr.offsets)
    return flat, offsets - offsets[0], None


def _parquet_matrix(batch, embedding_column: str, names: list[str], source: str, start: int):
    import pyarrow as pa

    if embedding_column in names:
        col = batch.column(names.index(embedding_column))
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # JSON text lists
            return [json.loads(v) if v is not None else None for v in col.to_pylist()]
        unwrapped = _unwrap_list(col)
        if unwrapped is None:
            raise DataError(f"{source}: column `{embedding_column}` is {col.type}, not a list of numbers")
        flat, offsets, width = unwrapped
        if width is not None:
            return flat.reshape(-1, width) if width else np.zeros((len(col), 0), np.float32)
        lengths = np.diff(offsets)
        if len(lengths) and (lengths != lengths[0]).any():  # ragged: per-row check names the row
            return [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
        width = int(lengths[0]) if len(lengths) else 0
        return flat[offsets[0]: offsets[-1]].reshape(-1, width) if width else [[] for _ in lengths]
    raise DataError(f"{source}: no `{embedding_column}` column")


def _iter_parquet(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer=False: with pre-buffering (the default) pyarrow keeps the read-ahead of every row group it
        # has passed, and memory grows with the file (measured: +364 MB for 1M x 64 vs +50 MB without)
        pf = pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types
        raise DataError(f"cannot read {path} as Parquet ({exc})") from exc
    names = pf.schema_arrow.names
    if user_column not in names:
        raise DataError(f"{path} has no `{user_column}` column (columns: {names[:10]}): name the user id column "
                        f"`{user_column}` or pass user_column= / --user-column")
    numeric = [n for n in names if n != user_column]
    if embedding_column not in names:
        if not numeric:
            raise DataError(f"{path} has a `{user_column}` column but no `{embedding_column}` column or numeric columns")
        bad = [n for n in numeric if not (pa.types.is_integer(pf.schema_arrow.field(n).type) or pa.types.is_floating(pf.schema_arrow.field(n).type))]
        if bad:
            raise DataError(f"{path}: columns other than `{user_column}` must all be numbers, or name the list column "
                            f"`{embedding_column}` (non-numeric: {bad[:5]})")
    columns = [user_column, embedding_column] if embedding_column in names else None
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            users = [_user_str(u) for u in batch.column(batch.schema.names.index(user_column)).to_pylist()]
            if embedding_column in names:
                vectors = _parquet_matrix(batch, embedding_column, batch.schema.names, str(path), start)
            else:
                vectors = np.stack([np.asarray(batch.column(batch.schema.names.index(n)).cast(pa.float32()), dtype=np.float32)
                                    for n in numeric], axis=1)
            yield users, vectors
            start += len(users)
    except DataError as exc:
        raise DataError(f"{path}: rows from {start}: {exc}") from exc


def _iter_csv(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM as Excel writes it is not a column name
        reader = csv.reader(f)
        names = next(reader, [])
        if user_column not in names:
            raise DataError(f"{path} has no `{user_column}` column (columns: {names[:10]}): name the user id column `{user_column}`")
        ucol = names.index(user_column)
        ecol = names.index(embedding_column) if embedding_column in names else None
        numeric = [i for i, n in enumerate(names) if i != ucol]
        if ecol is None and not numeric:
            raise DataError(f"{path} has a `{user_column}` column but no `{embedding_column}` column or numeric columns")
        users: list[str] = []
        vectors: list = []
        for n, row in enumerate(reader, 1):
            if not row:
                continue
            if len(row) != len(names):
                raise DataError(f"{path}:{n + 1} has {len(row)} fields, the header has {len(names)}")
            users.append(row[ucol])
            if ecol is not None:
                try:
                    vectors.append(json.loads(row[ecol]))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: embedding of user {row[ucol]!r} is not a JSON list ({exc})") from exc
            else:
                try:
                    vectors.append([float(row[i]) for i in numeric])
                except ValueError as exc:
                    raise DataError(f"{path}:{n + 1}: columns other than `{user_column}` must all be numbers ({exc})") from exc
            if len(users) >= chunk_rows:
                yield users, vectors
                users, vectors = [], []
        if users:
            yield users, vectors


def _iter_jsonl(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    users: list[str] = []
    vectors: list = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON ({exc}): write one object per line") from exc
            if not isinstance(obj, dict) or user_column not in obj:
                raise DataError(f'{path}:{n} needs an object with "{user_column}" and "{embedding_column}"')
            if embedding_column in obj:
                vector = obj[embedding_column]
            else:
                vector = [v for k, v in obj.items() if k != user_column]
            users.append(_user_str(obj[user_column]))
            vectors.append(vector)
            if len(users) >= chunk_rows:
                yield users, vectors
                users, vectors = [], []
    if users:
        yield users, vectors


def _npy_member(f):
    """Header of an .npy stream -> (shape, dtype, fortran_order); the file is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _stream_npy(f, shape, dtype, chunk_rows: int) -> Iterator[np.ndarray]:
    """Rows of a C-order array from an open .npy stream, `chunk_rows` at a time."""
    row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    row_bytes = dtype.itemsize * row_items
    for start in range(0, shape[0] if shape else 0, chunk_rows):
        n = min(chunk_rows, shape[0] - start)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
            raise DataError("the array data ends early: the file is truncated")
        yield np.frombuffer(data, dtype=dtype).reshape((n,) + tuple(shape[1:]))


def _iter_npz(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"cannot read {path} as .npz ({exc})") from exc
    with z:
        keys = {name[:-4] for name in z.namelist() if name.endswith(".npy")}
        ukey = next((k for k in ("user", "users") if k in keys), None)
        ekey = next((k for k in ("embedding", "embeddings") if k in keys), None)
        if ukey is None or ekey is None:
            raise DataError(f"{path} needs arrays `user` and `embedding` (found {sorted(keys)})")
        with z.open(ukey + ".npy") as fu, z.open(ekey + ".npy") as fe:
            ushape, ufortran, udtype = _npy_member(fu)
            eshape, efortran, edtype = _npy_member(fe)
            if udtype.hasobject or edtype.hasobject:
                raise DataError(f"cannot read {path} without pickle (object arrays): store user ids as a string array, not objects")
            if len(eshape) != 2 or len(ushape) != 1 or ushape[0] != eshape[0]:
                raise DataError(f"{path}: `embedding` must be [N, E] with one row per user (got {eshape} for {ushape[0] if ushape else 0} users)")
            if ufortran or efortran:
                raise DataError(f"{path}: Fortran-ordered arrays are not supported: save with np.ascontiguousarray")
            for users, matrix in zip(_stream_npy(fu, ushape, udtype, chunk_rows), _stream_npy(fe, eshape, edtype, chunk_rows)):
                yield [str(u) for u in users], matrix


def _iter_npy(path: Path, chunk_rows: int, ids_file: Path | None) -> Iterator[Chunk]:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise DataError(f"cannot read {path} without pickle ({exc}): save a numeric or structured array") from exc
    if arr.dtype.names:
        if not {"user", "embedding"} <= set(arr.dtype.names):
            raise DataError(f"{path}: a structured array needs fields `user` and `embedding` (has {arr.dtype.names})")
        for start in range(0, len(arr), chunk_rows):
            part = arr[start:start + chunk_rows]
            yield [str(u) for u in part["user"]], np.asarray(part["embedding"]).reshape(len(part), -1)
        return
    if arr.ndim != 2:
        raise DataError(f"{path}: expected an [N, E] array, got shape {arr.shape}")
    ids = open(ids_file) if ids_file is not None else None
    try:
        for start in range(0, len(arr), chunk_rows):
            part = np.asarray(arr[start:start + chunk_rows])
            if ids is None:
                users = [str(i) for i in range(start, start + len(part))]
            else:
                users = []
                while len(users) < len(part):
                    line = ids.readline()
                    if not line:
                        raise DataError(f"{path} has {len(arr)} rows but {ids_file} has fewer user ids")
                    if line.strip():
                        users.append(line.strip())
            yield users, part
        if ids is not None and any(line.strip() for line in ids):
            raise DataError(f"{path} has {len(arr)} rows but {ids_file} has more user ids")
    finally:
        if ids is not None:
            ids.close()


def iter_embedding_chunks(path: str | Path, ids_file: str | Path | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                          user_column: str = "user", embedding_column: str = "embedding") -> Iterator[Chunk]:
    """(user ids, vectors) chunks of at most `chunk_rows` rows from any import format (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(path, chunk_rows, user_column, embedding_column)
    if suffix == ".csv":
        return _iter_csv(path, chunk_rows, user_column, embedding_column)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _iter_jsonl(path, chunk_rows, user_column, embedding_column)
    if suffix == ".npz":
        return _iter_npz(path, chunk_rows)
    if suffix == ".npy":
        return _iter_npy(path, chunk_rows, Path(ids_file) if ids_file is not None else None)
    raise DataError(f"unknown file type {suffix!r}: use one of {', '.join(IMPORT_SUFFIXES)}")


def read_embeddings(path: str | Path, ids_file: str | Path | None = None, **columns) -> list[tuple[str, np.ndarray]]:
    """The whole file as (user, vector) pairs (for small files; `import_embeddings` streams)."""
    rows: list[tuple[str, np.ndarray]] = []
    for users, vectors in iter_embedding_chunks(path, ids_file, **columns):
        rows.extend(zip(users, list(vectors)))
    seen: dict[str, int] = {}
    for user, _ in rows:
        seen[user] = seen.get(user, 0) + 1
    dupes = [u for u, c in seen.items() if c > 1]
    if dupes:
        raise DataError(f"{path}: user ids appear more than once ({dupes[:5]}): keep one row per user")
    return rows


def read_vector(path: str | Path, dim: int | None = None) -> np.ndarray:
    """One user's vector from .npy / .json / .safetensors / .csv (or text), checked like every stored vector."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"embedding file {p} does not exist: pass a .npy, .json, .safetensors or .csv file")
    try:
        if p.suffix == ".npy":
            values = np.load(p, allow_pickle=False).reshape(-1)
        elif p.suffix == ".json":
            values = np.asarray(json.loads(p.read_text())).reshape(-1)
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            values = next(iter(load_file(str(p)).values())).reshape(-1)
        else:
            values = np.loadtxt(p, dtype="float32", delimiter=",").reshape(-1)
        return as_vector(values, dim)
    except EmbeddingError as exc:
        raise DataError(f"embedding file {p}: {exc}") from None
    except Exception as exc:  # numpy, json and safetensors raise many types for unreadable files
        raise DataError(f"cannot read an embedding from {p} ({type(exc).__name__}: {exc}): write the vector as a "
                        "JSON list of numbers, a .npy array or a comma-separated line") from None
