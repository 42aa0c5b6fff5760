"""Where a relative path of `params.yaml` points, in the workspace and in DVC's experiment copies.

`dvc exp run --temp` and queued experiments run in a copy of the repo's git files, where
`../photos` or a git-ignored path is missing: so a relative path is looked up in the stage's
checkout first (the experiment's snapshot), then in the repo DVC ran from (`$DVC_ROOT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Located:
    """A path as `params.yaml` writes it, the file it names, and why that one."""

    written: str
    path: Path
    where: str  # one phrase for the stage's line: "used as given", "found in <repo>", ...


@dataclass(frozen=True)
class Locator:
    """Resolves the relative paths of `params.yaml`: in `checkout`, then in `origin`."""

    checkout: Path
    origin: Path

    @classmethod
    def for_stage(cls, cwd: Path, dvc_root: str | None) -> Locator:
        """The locator of a stage run from `cwd`, with DVC's `DVC_ROOT` (None outside DVC)."""
        checkout = cwd.resolve()
        return cls(checkout, Path(dvc_root).resolve() if dvc_root else checkout)

    @property
    def in_experiment_copy(self) -> bool:
        return self.origin != self.checkout

    def _candidates(self, written: str) -> dict[Path, str]:
        """Where `written` may be, each with the phrase that says why it was used."""
        given = Path(written).expanduser()
        if given.is_absolute():
            return {given: "used as given"}
        if not self.in_experiment_copy:
            return {self.checkout / given: "found in the repo"}
        return {
            self.checkout / given: "found in this experiment's copy of the repo",
            self.origin / given: f"found in {self.origin}, the repo DVC was run from "
            "(not in this experiment's copy)",
        }

    def find(self, written: str) -> Located | None:
        """The file or folder `written` names, or None where neither place has it."""
        for path, where in self._candidates(written).items():
            if path.exists():
                return Located(written, path, where)
        return None

    def locate(self, written: str, what: str) -> Located:
        """`find`, or FileNotFoundError saying `what` it is and every place looked in."""
        found = self.find(written)
        if found is not None:
            return found
        if Path(written).expanduser().is_absolute():
            raise FileNotFoundError(f"{what} not found: {written}")
        places = " and ".join(str(path) for path in self._candidates(written))
        raise FileNotFoundError(f"{what} not found: {written} (looked for {places})")

    def shared(self, written: str | Path) -> Path:
        """`written` in the repo DVC was run from: a per-machine cache (downloads) that every
        experiment copy shares instead of filling its own (an absolute path stays as it is)."""
        return self.origin / Path(written).expanduser()
