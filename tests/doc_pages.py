"""What README.md and docs/*.md show a user: shell commands, YAML snippets, other code.

A command is a line of a ```bash block (continuations joined; comments, output redirections
and leading VAR=value assignments dropped; `&&`, `;` and `|` split it) or an inline code span
that starts with a program this project's users type and has a word after it. An inline span
that only names a shown command (a word-wise prefix of one, `dvc exp run`) is a reference to
it, not a command of its own.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_WORDS = {"dvc", "make", "visiontune", "mlflow", "torchrun", "git", "python", "pip"}


@dataclass(frozen=True)
class Block:
    """A fenced block of a page: its language (`bash`, `yaml`, `python`, "" unlabelled)."""

    page: str
    language: str
    text: str


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page.name, language, body)
        for language, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text)
    ]


def normalize(command: str) -> list[str]:
    """The commands of one shell line, as compared: words re-joined, redirections dropped."""
    commands = []
    for part in re.split(r"&&|;|\|", command):
        words = shlex.split(re.sub(r"\s+\d?>\s*\S+", "", part), comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before it
            words.pop(0)
        if words:
            commands.append(" ".join(words))
    return commands


def shell_lines(block: Block) -> list[str]:
    """The lines of a bash block, continuations joined, as a shell reads them."""
    return [line for line in block.text.replace("\\\n", " ").splitlines() if line.strip()]


def fenced_commands(page: Path) -> list[str]:
    return [
        command
        for block in blocks(page)
        if block.language in ("bash", "sh")
        for line in shell_lines(block)
        for command in normalize(line)
    ]


def inline_commands(page: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.split()[0] not in COMMAND_WORDS:  # a name, a value, a path: no command
            continue
        commands = normalize(span.replace("…", ""))
        words = commands[0].split() if commands else []
        if len(words) > 1 and words[0] in COMMAND_WORDS:
            found += commands
    return found


def shown_commands() -> dict[str, list[str]]:
    """Every command each page shows, fenced first; inline references to them left out."""
    fenced = {page.name: fenced_commands(page) for page in PAGES}
    every = [command for commands in fenced.values() for command in commands]

    def names_one(span: str) -> bool:
        words = span.split()
        return any(other.split()[: len(words)] == words for other in every)

    return {
        page.name: fenced[page.name]
        + [c for c in inline_commands(page) if not names_one(c) and c not in fenced[page.name]]
        for page in PAGES
    }


def page(name: str) -> Path:
    """README.md, or a page of docs/ by its file name."""
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


def bash_lines(name: str) -> list[str]:
    """The shell lines of a page's bash blocks, in order."""
    return [
        line
        for block in blocks(page(name))
        if block.language in ("bash", "sh")
        for line in shell_lines(block)
    ]
