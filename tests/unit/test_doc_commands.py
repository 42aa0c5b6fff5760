"""Every command README.md and docs/ show is run by a test or by CI, so none of them rots.

A command is a line of a ```bash block (continuations joined, comments, redirections and
leading VAR=value assignments dropped, `&&` / `;` / `|` split) or an inline code span that
starts with a command this project's users type (a program and at least one word after it).
Each must match an entry of RUN_BY, whose
file must really run it (the evidence string is in that file), or of UNTESTED, which
docs/scaling.md lists with the reason. `--help` calls do not count as running a command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_WORDS = {"dvc", "make", "visiontune", "mlflow", "torchrun", "git", "python", "pip"}

# Pattern (re.search on the command) → (the file that runs it, text in that file showing it
# does). The first matching entry counts, so specific patterns come before general ones.
RUN_BY: list[tuple[str, str, str]] = [
    (r"^make demo$", "tests/test_tracking_server.py", 'make(project, "demo"'),
    (r"^make test$", ".ci/run", "make test"),
    (r"^make help$", "tests/unit/test_docs.py", '["make", "-s", "help"]'),
    (r"^make ui$", "tests/test_tracking_server.py", 'make_command(project, "ui"'),
    (r"^dvc repro -f fetch$", "tests/test_tracking_server.py", '"repro", "-f", "fetch"'),
    (r"^dvc repro source_stamp$", "tests/data/test_dvc_cache.py", '"repro", "source_stamp"'),
    (r"^dvc repro\b", "tests/test_tracking_server.py", 'dvc(project, "repro", env=env)'),
    (r"^dvc unprotect\b", "tests/data/test_dvc_cache.py", '"unprotect", "data/prepared"'),
    (r"^dvc gc -w$", "tests/data/test_dvc_cache.py", '"gc", "-w"'),
    (r"^dvc exp run --queue\b", "tests/test_queued_experiment.py", '"exp", "run", "--queue"'),
    (r"^dvc exp run\b", "tests/test_tracking_server.py", '"exp", "run", "--temp"'),
    (r"^dvc queue start$", "tests/test_queued_experiment.py", '"queue", "start"'),
    (r"^dvc exp show$", "tests/test_tracking_server.py", '"exp", "show"'),
    (r"^dvc metrics show$", "tests/test_tracking_server.py", '"metrics", "show"'),
    (r"^dvc plots show$", "tests/test_tracking_server.py", '"plots", "show"'),
    (r"^dvc remote add -d team /", "tests/test_team_storage.py", '"remote", "add", "--default"'),
    (r"^dvc push$", "tests/test_team_storage.py", 'dvc(alice, "push"'),
    (r"^dvc pull$", "tests/test_team_storage.py", 'dvc(bob, "pull"'),
    (r"^dvc status$", "tests/test_team_storage.py", 'dvc(alice, "status"'),
    (r"^git (add|commit)\b", "tests/test_team_storage.py", 'git(alice, "commit"'),
    (r"^git pull$", "tests/test_team_storage.py", 'git(alice, "pull"'),
    (r"^visiontune predict .* --format csv --tta\b", "tests/model/test_predict_cli.py",
     '"--format", "csv", "--tta"'),
    (r"^visiontune predict .* --submission\b", "tests/model/test_predict_cli.py",
     '"--submission", str(out)'),
    (r"^mlflow models serve -m models:/", "tests/test_tracking_model.py",
     '"mlflow", "models", "serve", "-m", uri'),
    (r"^mlflow models predict -m models:/", "tests/test_tracking_model.py",
     '"mlflow", "models", "predict", "-m", uri'),
    (r"^visiontune predict\b", "tests/test_tracking_server.py", '"visiontune"), "predict"'),
    (r"^mlflow server( --host 127\.0\.0\.1 .*--backend-store-uri sqlite:.*)?$",
     "tests/test_tracking_server.py", '"server", "--host", "127.0.0.1"'),
    (r"^torchrun --standalone\b", "tests/model/test_distributed_stages.py",
     '"torch.distributed.run", "--standalone"'),
    (r"^python stages/", "tests/data/test_own_data.py", 'str(REPO_ROOT / "stages/fetch.py")'),
]  # fmt: skip

# Commands that need what a test machine lacks; docs/scaling.md lists each with its reason.
UNTESTED: dict[str, str] = {
    r"s3://": "an S3 bucket and credentials",
    r"postgresql://": "a PostgreSQL server",
    r"^torchrun --nnodes": "several machines and a rendezvous endpoint",
}


def _strip_code_blocks(text: str) -> str:
    return re.sub(r"(?ms)^```.*?^```", "", text)


def _split(line: str) -> list[str]:
    commands = []
    for part in re.split(r"&&|;|\|", line):
        words = shlex.split(re.sub(r"\s+\d?>\s*\S+", "", part), comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before it
            words.pop(0)
        if words:
            commands.append(" ".join(words))
    return commands


def doc_commands() -> list[tuple[str, str]]:
    """(page, command) for every command shown in README.md and docs/*.md."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"(?ms)^```(?:bash|sh)\n(.*?)^```", text):
            for line in block.replace("\\\n", " ").splitlines():
                found += [(page.name, command) for command in _split(line)]
        for span in re.findall(r"`([^`\n]+)`", _strip_code_blocks(text)):
            commands = _split(span.replace("…", ""))
            # A lone word (`visiontune`, `torchrun`) names a program; it is no command.
            if (
                commands
                and len(commands[0].split()) > 1
                and commands[0].split()[0] in COMMAND_WORDS
            ):
                found += [(page.name, command) for command in commands]
    return found


COMMANDS = doc_commands()


def _runner(command: str) -> tuple[str, str, str] | None:
    return next((entry for entry in RUN_BY if re.search(entry[0], command)), None)


def _untested(command: str) -> str | None:
    return next((p for p in UNTESTED if re.search(p, command)), None)


def test_the_docs_show_commands_at_all():
    shown = {command for _, command in COMMANDS}
    assert {"make demo", "make test", "dvc repro", "dvc exp show", "make ui"} <= shown


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_command_shown_is_run_by_a_test_or_listed_as_untested(page: str, command: str):
    assert "--help" not in command, f"{page}: `{command}` (a --help call runs nothing)"
    if _untested(command):
        return
    entry = _runner(command)
    assert entry is not None, (
        f"{page}: `{command}` is run by no test: add it to a test and to RUN_BY, "
        "or to UNTESTED with the reason (and to docs/scaling.md)"
    )
    _, path, evidence = entry
    assert evidence in (ROOT / path).read_text(encoding="utf-8"), f"{path} no longer runs it"


def test_no_entry_is_stale():
    used = {_runner(c) for _, c in COMMANDS if not _untested(c)}
    assert [e[0] for e in RUN_BY if e not in used] == []
    assert [p for p in UNTESTED if not any(re.search(p, c) for _, c in COMMANDS)] == []


def test_untested_commands_are_listed_in_the_docs_with_the_reason():
    scaling = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = scaling.split("## Untested commands", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for pattern in UNTESTED:
        assert any(re.search(pattern, row.split("|")[1].strip("` ")) for row in rows), pattern
