"""Persona dialogue loaders (ConvAI2 text, Synthetic-Persona-Chat CSV, MSC JSON lines) -> PersonaExample.

Every reply of every speaker becomes an example; malformed rows are skipped and counted, never fatal.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersonaExample:
    person_id: str
    persona: tuple[str, ...]
    history: tuple[tuple[str, str], ...]  # (role, text), role "user" (the partner) or "assistant" (this person)
    reply: str
    source: str = ""

    @property
    def persona_text(self) -> str:
        return " ".join(self.persona)

    def messages(self, max_turns: int | None = None) -> list[dict]:
        turns = self.history[-max_turns:] if max_turns else self.history
        return [{"role": r, "content": t} for r, t in turns]


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    dialogues: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def repair(self, reason: str) -> None:
        self.repaired[reason] = self.repaired.get(reason, 0) + 1

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        text = f"{self.examples} examples from {self.dialogues} dialogues in {len(self.files)} files; skipped: {skipped}"
        if self.repaired:
            text += "; repaired: " + ", ".join(f"{n} {why}" for why, n in self.repaired.items())
        return text


def normalize_sentence(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence.strip().lower().rstrip("."))


def person_id(persona) -> str:
    """Same persona sentences (any order, case, spacing) -> same id, across files and formats."""
    norm = sorted(normalize_sentence(s) for s in persona if s.strip())
    return hashlib.sha1("\n".join(norm).encode()).hexdigest()[:12]


def _dialogue_examples(persona_a, persona_b, turns, source, report, id_a=None, id_b=None):
    """turns: [(speaker 0|1, text)] -> examples for both speakers (each turn with some history is a reply)."""
    out = []
    personas = (tuple(persona_a), tuple(persona_b))
    ids = (id_a or person_id(persona_a), id_b or person_id(persona_b))
    for j, (speaker, text) in enumerate(turns):
        if j == 0 or not personas[speaker]:
            continue
        history = tuple(("assistant" if s == speaker else "user", t) for s, t in turns[:j])
        out.append(PersonaExample(ids[speaker], personas[speaker], history, text, source))
    report.dialogues += 1
    return out


def load_convai2(path: Path, report: LoadReport) -> list[PersonaExample]:
    examples: list[PersonaExample] = []
    episode: list[str] = []

    def flush():
        if not episode:
            return
        yours, partners, turns = [], [], []
        for line in episode:
            body = line.split(" ", 1)[1] if " " in line else ""
            if body.startswith("your persona:"):
                yours.append(body[len("your persona:"):].strip())
            elif body.startswith("partner's persona:"):
                partners.append(body[len("partner's persona:"):].strip())
            elif "\t" in body:
                partner_said, self_said = body.split("\t")[:2]
                turns += [(1, partner_said.strip()), (0, self_said.strip())]
            else:
                report.skip("malformed convai2 lines")
        if not yours or not turns:
            report.skip("convai2 episodes without persona or turns")
            return
        examples.extend(_dialogue_examples(yours, partners, turns, path.name, report))

    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        number = line.split(" ", 1)[0]
        if not number.isdigit():
            report.skip("malformed convai2 lines")
            continue
        if number == "1":
            flush()
            episode = []
        episode.append(line)
    flush()
    return examples


_SPEAKER = re.compile(r"^\W*user\s*([12])\s*\W*:\W*\s*(.*)$", re.IGNORECASE)


def load_spc(path: Path, report: LoadReport) -> list[PersonaExample]:
    examples: list[PersonaExample] = []
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        needed = {"user 1 personas", "user 2 personas", "Best Generated Conversation"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise DataError(f"{path}: expected CSV columns {sorted(needed)}, got {reader.fieldnames}")
        for row in reader:
            p1 = [s.strip() for s in (row["user 1 personas"] or "").splitlines() if s.strip()]
            p2 = [s.strip() for s in (row["user 2 personas"] or "").splitlines() if s.strip()]
            turns: list[tuple[int, str]] = []
            unlabeled = 0
            for line in (row["Best Generated Conversation"] or "").splitlines():
                if not line.strip():
                    continue
                m = _SPEAKER.match(line.strip())
                if m:
                    text = m.group(2).strip().strip("*").strip()
                    if text:
                        turns.append((int(m.group(1)) - 1, text))
                elif turns:
                    turns[-1] = (turns[-1][0], turns[-1][1] + " " + line.strip())
                else:
                    unlabeled += 1
            if len(turns) < 2 or not (p1 or p2):
                report.skip("spc rows without speaker labels or personas")
                continue
            examples.extend(_dialogue_examples(p1, p2, turns, path.name, report))
    return examples


def load_msc(path: Path, report: LoadReport) -> list[PersonaExample]:
    """Session 1 summaries (bot_0/bot_1) or sessions 2+ (Speaker 1/2, personas grown over sessions).

    person_id comes from the *initial* persona, so one person keeps one id across sessions.
    """
    examples: list[PersonaExample] = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            init = obj.get("init_personas") or obj.get("init_personachat", {}).get("init_personas")
            personas = obj.get("personas") or init
            turns = _msc_turns(obj["dialog"], report)
            if not personas or len(personas) != 2 or len(turns) < 2:
                raise ValueError("needs two personas and two turns")
        except (ValueError, KeyError, TypeError, AttributeError):
            report.skip("malformed msc lines")
            continue
        ids = (person_id(init[0]), person_id(init[1])) if init and len(init) == 2 else (None, None)
        examples.extend(_dialogue_examples(personas[0], personas[1], turns, path.name, report, *ids))
    return examples


MSC_SPEAKERS = {"bot_0": 0, "Speaker 1": 0, "bot_1": 1, "Speaker 2": 1}


def _msc_turns(dialog: list[dict], report: LoadReport) -> list[tuple[int, str]]:
    """(speaker, text) turns. Some MSC sessions label one turn with a crowd worker's numeric id instead of
    "Speaker 1/2"; speakers alternate, so such a turn takes the speaker its neighbours imply (counted)."""
    speakers = [MSC_SPEAKERS.get(t["id"]) for t in dialog]
    for i, sp in enumerate(speakers):
        if sp is not None:
            continue
        neighbours = {1 - speakers[j] for j in (i - 1, i + 1) if 0 <= j < len(speakers) and speakers[j] is not None}
        if len(neighbours) != 1:
            raise ValueError(f"unknown speaker {dialog[i]['id']!r}")
        speakers[i] = neighbours.pop()
        report.repair("msc turns labelled with a worker id (speaker inferred from alternation)")
    return [(sp, t["text"].strip()) for sp, t in zip(speakers, dialog)]


def _loader_for(path: Path):
    name = path.name.lower()
    if path.suffix == ".csv":
        return load_spc
    if name.startswith("msc") or path.suffix in (".jsonl", ".json"):
        return load_msc
    if path.suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace") as f:
            first = f.readline().lstrip()
        return load_msc if first.startswith("{") else load_convai2
    return None


def persona_files(path: str | Path, split: str = "all", include_msc: bool = False) -> list[Path]:
    """Persona files under `path`. split "test": files named *test* (all files if none is);
    "train": the others, MSC excluded unless `include_msc` (its grown personas add thousands of
    distinct persona sentences); "all": everything."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a persona file or a folder of them")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _loader_for(p) and "readme" not in p.name.lower())
    if split == "test":
        tests = [p for p in files if "test" in p.name.lower()]
        return tests or files
    if split == "train":
        files = [p for p in files if "test" not in p.name.lower() and (include_msc or not p.name.lower().startswith("msc"))]
    return files


def load_persona(path: str | Path, split: str = "all", report: LoadReport | None = None,
                 include_msc: bool = False) -> list[PersonaExample]:
    """Load every persona file under `path` (see persona_files for `split`), de-duplicated."""
    report = report if report is not None else LoadReport()
    seen = set()
    out: list[PersonaExample] = []
    for f in persona_files(path, split, include_msc):
        loader = _loader_for(f)
        if loader is None:
            continue
        report.files.append(str(f))
        for ex in loader(f, report):
            key = (ex.person_id, ex.history, ex.reply)
            if key in seen:
                continue
            seen.add(key)
            out.append(ex)
    if not out:
        raise DataError(f"no persona examples found in {path} ({report}): expected ConvAI2 .txt, Synthetic-Persona-Chat .csv or MSC JSON lines")
    report.examples = len(out)
    log.info("loaded %s", report)
    return out


def persona_split(path: str | Path, include_msc: bool = False,
                  report: LoadReport | None = None) -> tuple[list[PersonaExample], list[PersonaExample]]:
    """The leakage-free split of the data README: (train, test). Test people are removed from train,
    and so is every persona sentence that also occurs in a test persona (a person left with none is dropped)."""
    train = load_persona(path, "train", report, include_msc=include_msc)
    test = load_persona(path, "test")
    return without_people_of(train, test), test


def people_half(examples: list[PersonaExample], half: int) -> list[PersonaExample]:
    """One of two disjoint halves of the people (by person-id parity), for two independent test figures."""
    return [e for e in examples if int(e.person_id, 16) % 2 == half]


def without_people_of(examples: list[PersonaExample], held_out: list[PersonaExample]) -> list[PersonaExample]:
    """`examples` minus the held-out people and minus every persona sentence that also occurs in a held-out persona
    (a person left with none is dropped), so the held-out people are new people with new sentences."""
    ids = {e.person_id for e in held_out}
    sentences = {normalize_sentence(s) for e in held_out for s in e.persona}
    out = []
    for e in examples:
        if e.person_id in ids:
            continue
        kept = tuple(s for s in e.persona if normalize_sentence(s) not in sentences)
        if kept:
            out.append(e if len(kept) == len(e.persona) else replace(e, persona=kept))
    return out
