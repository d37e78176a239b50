"""Fenced code blocks of a Markdown file, for the README doc-test harness.

Every fenced block must name its language (``text`` for diagrams and printed output).
Blocks in a runnable language (:data:`RUNNABLE`) are run by ``tests/docs/test_readme.py``
unless the line immediately before the opening fence is
``<!-- illustrative: REASON -->`` with a non-empty reason. Blocks in other languages
(``text``, ``yaml``, ``json``, ...) are data and are not run.

The examples use fixed names (:data:`EXAMPLE_NAMES`) that the harness points at a real
server, model and slides by plain text substitution; the README says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PYTHON = frozenset({"python", "py"})
SHELL = frozenset({"bash", "sh", "shell"})
CONSOLE = frozenset({"console"})
RUNNABLE = PYTHON | SHELL | CONSOLE
#: Languages of data and pictures, never run. A block in any other language (zsh,
#: powershell, ...) must carry a marker: neither run nor known as data is a defect.
DATA = frozenset(
    {"text", "yaml", "yml", "json", "jsonl", "toml", "ini", "csv", "tsv", "xml", "html"}
    | {"dockerfile", "proto", "protobuf", "promql", "diff", "mermaid", "log", "properties"}
)

#: README names -> what the harness puts in their place. The slide root, the
#: slides under it (``cohort1/slide7.svs``) and the files of the working directory
#: (``artifacts/model.pt``, ``slide.svs``, ``local/slide7.svs``, ``holdout/``,
#: ``cohort.csv``) exist as written and need no substitution.
EXAMPLE_NAMES = {
    "server": "127.0.0.1:50051",
    "port": "--port 50051",
    "slide_root": "/data/slides",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*illustrative\b(?P<colon>:?)(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block.

    Attributes:
        line: 1-based line number of the opening fence.
        lang: first word of the info string, lower case ('' when unlabelled).
        code: the block's text, fence indentation removed, ending with a newline.
        heading: text of the nearest Markdown heading above it ('' before any).
        reason: the illustrative marker's reason (stripped; '' for a marker without
            one); None when the block has no marker.
    """

    line: int
    lang: str
    code: str
    heading: str
    reason: str | None

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE

    @property
    def run_by_test(self) -> bool:
        """Runnable and not marked illustrative: the harness runs it."""
        return self.runnable and self.reason is None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"L{self.line}-{self.lang or 'unlabelled'}-{slug or 'top'}"


@dataclass(frozen=True)
class Problem:
    """A defect of the file's blocks: 1-based line and what is wrong."""

    line: int
    message: str


def extract(text: str) -> tuple[list[Block], list[Problem]]:
    """Split Markdown ``text`` into its fenced blocks and the defects found.

    Defects: an unlabelled fence, a fence in a language neither run nor data without a
    marker, an illustrative marker without a reason, a marker not immediately
    followed by an opening fence, an unclosed fence.

    Returns:
        (blocks in file order, problems in file order).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[Problem] = []
    heading = ""
    pending: tuple[int, str] | None = None  # marker's line and reason
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if pending is not None and not fence:
            problems.append(Problem(pending[0], "illustrative marker not right before a fence"))
            pending = None
        if marker:
            reason = marker["reason"].strip() if marker["colon"] else ""
            if not reason:
                problems.append(Problem(i + 1, "illustrative marker without a reason"))
            pending = (i + 1, reason)
            i += 1
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not fence:
            i += 1
            continue
        indent, mark = fence["indent"], fence["fence"]
        lang = fence["info"].strip().split(" ")[0].lower() if fence["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            problems.append(Problem(i + 1, "unclosed fence"))
        if not lang:
            problems.append(Problem(i + 1, "fence without a language (use text for diagrams)"))
        code = "\n".join(body) + "\n"
        reason = pending[1] if pending is not None else None
        if lang and lang not in RUNNABLE | DATA and reason is None:
            problems.append(Problem(i + 1, f"{lang!r} is neither run nor data: mark it"))
        blocks.append(Block(i + 1, lang, code, heading, reason))
        pending = None
        i = j + 1
    if pending is not None:
        problems.append(Problem(pending[0], "illustrative marker not right before a fence"))
    return blocks, problems


def console_commands(code: str) -> str:
    """The commands of a ``console`` block: lines after ``$ `` (and the lines they
    continue with a trailing backslash); printed output is dropped."""
    out: list[str] = []
    continuing = False
    for line in code.splitlines():
        if continuing:
            out.append(line)
        elif line.startswith("$ "):
            out.append(line[2:])
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def shell_commands(code: str) -> list[str]:
    """Commands of a shell script: continuation lines joined, comments and blank
    lines dropped (for classifying a block, not for running it)."""
    commands: list[str] = []
    current = ""
    for line in code.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        commands.append((current + stripped).strip())
        current = ""
    if current:
        commands.append(current.strip())
    return commands


def substitute(code: str, values: dict[str, str]) -> str:
    """Replace each :data:`EXAMPLE_NAMES` text by ``values[key]`` (keys as there)."""
    for key, name in EXAMPLE_NAMES.items():
        if key in values:
            code = code.replace(name, values[key])
    return code
