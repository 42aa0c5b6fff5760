"""Where a relative path of `params.yaml` points, in the workspace and in DVC's experiment copies.

`dvc exp run --temp` and queued experiments run the stages in a copy of the repo's git
files under `.dvc/tmp/exps/`: a path outside the repo (`../photos`) or a git-ignored one is
not there. A relative path is therefore looked up in the checkout the stage runs in first
(what is there belongs to the experiment's snapshot), then in the repo DVC was run from
(`$DVC_ROOT`, which DVC hands every stage). In the workspace the two are the same folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class NotFoundError(FileNotFoundError):
    """A path of params.yaml found in neither place; the message names both."""


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

    def find(self, written: str) -> Located | None:
        """The file or folder `written` names, or None where neither place has it."""
        given = Path(written).expanduser()
        if given.is_absolute():
            return Located(written, given, "used as given") if given.exists() else None
        for root in dict.fromkeys((self.checkout, self.origin)):
            candidate = root / given
            if candidate.exists():
                return Located(written, candidate, self._describe(root))
        return None

    def locate(self, written: str, what: str) -> Located:
        """`find`, or NotFoundError saying `what` it is and every place looked in."""
        found = self.find(written)
        if found is not None:
            return found
        given = Path(written).expanduser()
        if given.is_absolute():
            raise NotFoundError(f"{what} not found: {written}")
        places = [str(root / given) for root in dict.fromkeys((self.checkout, self.origin))]
        raise NotFoundError(f"{what} not found: {written} (looked for {' and '.join(places)})")

    def shared(self, written: str | Path) -> Path:
        """`written` in the repo DVC was run from: a per-machine cache (downloads) that every
        experiment copy shares instead of filling its own."""
        given = Path(written).expanduser()
        return given if given.is_absolute() else self.origin / given

    def _describe(self, root: Path) -> str:
        if not self.in_experiment_copy:
            return "found in the repo"
        if root == self.checkout:
            return "found in this experiment's copy of the repo"
        return f"found in {root}, the repo DVC was run from (not in this experiment's copy)"
