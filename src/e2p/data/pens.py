"""PENS (Microsoft personalized news headlines) loader and leakage-free splits -> PensUser.

File format (see shared/data/README.md): tab-separated, header ``userid clicknewsID posnewID rewrite_titles``;
``clicknewsID`` comma-separated clicked news IDs, ``posnewID`` the IDs of the news shown to the user and
``rewrite_titles`` the headlines the user wrote for them, ``;;``-separated and aligned with ``posnewID``.
The released file is written with CSV quoting (fields holding ``"`` or a tab are quoted, ``""`` escapes a
quote), so it is read with the csv module, not by splitting lines on tabs.

Malformed rows are skipped and counted in a :class:`~e2p.data.persona.LoadReport`, never fatal:

- ``malformed PENS rows``: wrong column count, unreadable quoting or an empty user id / click list;
- ``PENS rows with misaligned headlines``: not as many headlines as shown IDs;
- ``PENS rows without headlines``: no (ID, headline) pair left;
- ``empty PENS headlines``: single blank headlines, dropped together with their shown ID (the released
  file has one, user NT24, who therefore keeps 199 headlines);
- ``duplicate PENS users``: a user id already read from an earlier row or file (the first is kept).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .persona import LoadReport

log = logging.getLogger(__name__)

PENS_HEADER = ("userid", "clicknewsID", "posnewID", "rewrite_titles")
HEADLINE_SEP = ";;"

Pair = tuple[str, str]  # (news_id, headline)


@dataclass(frozen=True)
class PensUser:
    user_id: str
    clicked: tuple[str, ...]    # clicked news IDs, file order (duplicates kept as written)
    shown: tuple[str, ...]      # IDs of the news the user wrote headlines for
    headlines: tuple[str, ...]  # the user's headlines, aligned with `shown`
    source: str = ""

    def pairs(self) -> tuple[Pair, ...]:
        return tuple(zip(self.shown, self.headlines))


def _header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    return [c.strip().lstrip("\ufeff") for c in first.rstrip("\r\n").split("\t")]


def is_pens_file(path: str | Path) -> bool:
    """True when `path` is a file whose first line is the PENS header."""
    path = Path(path)
    try:
        return path.is_file() and tuple(_header(path)) == PENS_HEADER
    except OSError:
        return False


def pens_files(path: str | Path) -> list[Path]:
    """`path` itself, or every PENS-format .tsv file below a folder (detected by header, others ignored)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a PENS .tsv file or a folder holding them")
    if path.is_file():
        header = _header(path)
        if tuple(header) != PENS_HEADER:
            raise DataError(f"{path}: expected a PENS file with tab-separated header {' '.join(PENS_HEADER)!r}, "
                            f"got {header[:6]!r}; pass the PENS personalized test file (personalized_test_users_*.tsv)")
        return [path]
    files = []
    for p in sorted(path.rglob("*.tsv")):
        if is_pens_file(p):
            files.append(p)
        else:
            log.debug("ignoring %s: not a PENS header", p)
    return files


def _read_file(path: Path, report: LoadReport, seen: set[str]) -> list[PensUser]:
    users: list[PensUser] = []
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)  # header, checked by pens_files
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                report.skip("malformed PENS rows")
                continue
            if not row or not any(c.strip() for c in row):
                continue  # blank line
            if len(row) != len(PENS_HEADER):
                report.skip("malformed PENS rows")
                continue
            uid, clicks, shown, titles = (c.strip() for c in row)
            clicked = tuple(c.strip() for c in clicks.split(",") if c.strip())
            if not uid or not clicked:
                report.skip("malformed PENS rows")
                continue
            ids = [s.strip() for s in shown.split(",")] if shown.strip() else []
            heads = [" ".join(h.split()) for h in titles.split(HEADLINE_SEP)] if titles.strip() else []
            if len(ids) != len(heads):
                report.skip("PENS rows with misaligned headlines")
                continue
            pairs = []
            for nid, head in zip(ids, heads):
                if not nid or not head:
                    report.skip("empty PENS headlines")
                    continue
                pairs.append((nid, head))
            if not pairs:
                report.skip("PENS rows without headlines")
                continue
            if uid in seen:
                report.skip("duplicate PENS users")
                continue
            seen.add(uid)
            users.append(PensUser(uid, clicked, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), path.name))
    return users


def load_pens(path: str | Path, report: LoadReport | None = None) -> list[PensUser]:
    """Load a PENS .tsv file, or every PENS-format .tsv below a folder, one :class:`PensUser` per row.

    ``report.examples`` counts users and ``report.dialogues`` data rows read; skipped rows are counted by reason.
    """
    report = report if report is not None else LoadReport()
    seen: set[str] = set()
    users: list[PensUser] = []
    for f in pens_files(path):
        report.files.append(str(f))
        got = _read_file(f, report, seen)
        report.dialogues += len(got)
        users.extend(got)
    if not users:
        raise DataError(f"no PENS users found in {path} ({report}): expected .tsv files with header "
                        f"{' '.join(PENS_HEADER)!r} and at least one well-formed row")
    report.examples = len(users)
    log.info("loaded PENS: %s", report)
    return users


def _rng(seed: int, *salt: str) -> random.Random:
    """A generator that depends only on (seed, salt): stable across runs, platforms and PYTHONHASHSEED."""
    digest = hashlib.sha256("\x1f".join((str(seed),) + salt).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_test_users(users: Sequence[PensUser], test_fraction: float = 0.2, seed: int = 0
                ) -> tuple[list[PensUser], list[PensUser]]:
    """(train_users, test_users), disjoint by user id; both non-empty. Depends only on the set of user ids and
    `seed`, not on input order; each list keeps the input order."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = sorted({u.user_id for u in users})
    if len(ids) < 2:
        raise DataError(f"need at least 2 distinct users to split, got {len(ids)}")
    _rng(seed, "split_users").shuffle(ids)  # the salt keeps its old name: the same seed gives the same split
    n_test = min(max(1, round(len(ids) * test_fraction)), len(ids) - 1)
    test_ids = set(ids[:n_test])
    return [u for u in users if u.user_id not in test_ids], [u for u in users if u.user_id in test_ids]


def split_headlines(user: PensUser, history_fraction: float = 0.5, seed: int = 0, half: int | None = None
                    ) -> tuple[tuple[Pair, ...], tuple[Pair, ...]]:
    """(history, targets) of one user's (news_id, headline) pairs; deterministic in (user_id, seed).

    A seeded permutation of the user's pairs is cut in two: the first ``round(n * history_fraction)`` form the
    history pool, the rest the targets. The targets never depend on `half`. ``half=None`` returns the whole
    history pool; ``half=0`` / ``half=1`` return the first / second half of it (for embedding drift: the
    embedding recomputed from the other half of the history, evaluated on the same targets). Both parts are non-empty (and both halves, when asked for).
    """
    if not 0.0 < history_fraction < 1.0:
        raise DataError(f"history_fraction must be in (0, 1), got {history_fraction}")
    if half not in (None, 0, 1):
        raise DataError(f"half must be None, 0 or 1, got {half!r}")
    pairs = list(user.pairs())
    need = 3 if half is not None else 2
    if len(pairs) < need:
        raise DataError(f"user {user.user_id} has {len(pairs)} headlines, needs at least {need} to split")
    order = list(range(len(pairs)))
    _rng(seed, "split_headlines", user.user_id).shuffle(order)
    n_hist = min(max(need - 1, round(len(pairs) * history_fraction)), len(pairs) - 1)
    hist = [pairs[i] for i in order[:n_hist]]
    targets = tuple(pairs[i] for i in order[n_hist:])
    if half is not None:
        mid = (len(hist) + 1) // 2
        hist = hist[:mid] if half == 0 else hist[mid:]
    return tuple(hist), targets


def headlines(pairs: Sequence[Pair]) -> list[str]:
    """The headline texts of (news_id, headline) pairs."""
    return [h for _, h in pairs]
