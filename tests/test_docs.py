"""The docs run as written: every `e2p ...` command line in README.md and docs/*.md uses only subcommands and
flags that `e2p ... --help` knows, every `python script.py` names a script that exists with those flags, the
README's Python blocks run (the first needs the real backbone), and every other block says what it needs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of a Markdown file ("" for no language)."""
    out, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                out.append((lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    return out


def blocks(path: Path, langs: tuple[str, ...]) -> list[str]:
    return [text for lang, text in all_blocks(path) if lang in langs]


SHELL = ("bash", "sh", "console", "")  # shell blocks, and blocks that name no language


def documented_lines(starts: tuple[str, ...]) -> list[tuple[str, str]]:
    """(file, command) for every shell command line in the docs whose first word is one of `starts`."""
    out = []
    for path in DOCS:
        for block in blocks(path, SHELL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].strip()
                for part in re.split(r"&&|\||;", line):
                    words = part.split()
                    if words and words[0] in starts:
                        out.append((path.name, part.strip()))
    return out


def help_of(words: list[str]) -> tuple[list[str], str]:
    """The deepest subcommand named by `words` and its help text, plus the flags it still takes without listing them
    (research knobs moved into `--recipe FILE`: they keep working, with a warning, for one release)."""
    import argparse

    from e2p.cli import build_parser

    parser, path = build_parser(), []
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        parser, path = sub.choices[word], path + [word]
    hidden = [o for a in parser._actions if a.help == argparse.SUPPRESS for o in a.option_strings]
    return path, parser.format_help() + "\n" + " ".join(hidden)


@pytest.mark.parametrize("where, line", documented_lines(("e2p", ".venv/bin/e2p")))
def test_documented_command_lines_match_the_cli(where, line):
    words = [w for w in re.split(r"[\s\[\]|]+", line) if w][1:]
    path, text = help_of([w for w in words if not w.startswith("-")][:2])
    assert path, f"{where}: `{line}` names no e2p subcommand"
    for flag in {w.split("=")[0] for w in words if w.startswith("--")}:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{where}: `{line}`: {flag} is not an option of e2p {' '.join(path)}"


def test_readme_python_blocks_run(real_backbone, monkeypatch, tmp_path):
    code = blocks(ROOT / "README.md", ("python",))
    assert len(code) >= 2
    monkeypatch.chdir(tmp_path)
    for block in code:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


NEEDS = re.compile(r"#\s*(runs as written|needs\b)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_block_runs_as_written_or_says_what_it_needs(path):
    """A newcomer can tell, before pasting, whether a block will run in a fresh clone: the README's Python blocks
    are run by the test above; every other block is a diagram or a data sample (```text, json, jsonl) or carries
    a `# needs ...` comment (data, a trained run, a server, a GPU) or `# runs as written`."""
    for i, (lang, text) in enumerate(all_blocks(path)):
        if lang in ("text", "json", "jsonl") or (path.name == "README.md" and lang == "python"):
            continue
        assert NEEDS.search(text), (f"{path.name}, block {i + 1} ({lang or 'no language'}): add a `# needs ...` or "
                                    f"`# runs as written` comment, or mark a diagram ```text:\n{text[:200]}")


@pytest.mark.parametrize("where, line", [(w, line) for w, line in documented_lines(("python", ".venv/bin/python"))
                                         if line.split()[1:2] and line.split()[1].endswith(".py")])
def test_documented_scripts_exist_with_their_flags(where, line):
    words = line.split()
    script = ROOT / words[1]
    assert script.is_file(), f"{where}: `{line}`: {words[1]} does not exist"
    source = script.read_text()
    for flag in {w.split("=")[0] for w in words[2:] if w.startswith("--")}:
        assert f'"{flag}"' in source, f"{where}: `{line}`: {words[1]} has no option {flag}"
