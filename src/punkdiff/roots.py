"""The folders a long-running service may touch, and the one check that keeps every path inside them.

The web app reads models from its model roots, datasets from its data roots, and writes runs, generated
images and evaluations under its run root. Every path a user types or a browser sends goes through
`Roots.resolve` before anything opens it: the path is resolved with symlinks followed, so `..` tricks, an
absolute path elsewhere and a symlink that points out of a root are all refused with `PathOutsideRoots`.
A model or dataset folder is then walked by `Roots.check_tree` before anything reads it, so a weight file or an
image inside it that links out of the roots is refused too.

Example:
    >>> roots = Roots(models=["/srv/models"], data=["/srv/data"], runs="/srv/runs")
    >>> roots.resolve("mnist-16/pipeline", "models")  # relative to a model root (or the run root)
    PosixPath('/srv/models/mnist-16/pipeline')
    >>> roots.resolve("/etc/passwd", "data")
    Traceback (most recent call last):
    ...
    punkdiff.roots.PathOutsideRoots: /etc/passwd is outside the data folders this app may use (/srv/data)...
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["models", "data", "runs"]
# Environment variables a Space (or any deployment) sets instead of `punkdiff ui` flags; lists use os.pathsep.
ENV_MODEL_ROOTS = "PUNKDIFF_MODEL_ROOTS"
ENV_DATA_ROOTS = "PUNKDIFF_DATA_ROOTS"
ENV_RUN_ROOT = "PUNKDIFF_RUN_ROOT"
# Folders never worth walking into when looking for models or datasets.
_SKIPPED = {"node_modules", "__pycache__", "checkpoints", "logs", "site-packages"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class PathOutsideRoots(PermissionError):
    """A path that resolves (symlinks followed) outside the folders the service was started with."""


@dataclass
class Roots:
    """Model, data and run roots; each is stored resolved, so later comparisons see through symlinks.

    Args:
        models: Folders holding exported models (searched for `model_index.json`).
        data: Folders holding datasets (Hub layout or plain images).
        runs: The one folder the service writes to: training runs, generated images, evaluations. It is also
            searched for models (a finished run's `pipeline/`).
    """

    models: Sequence[str | os.PathLike[str]] = ()
    data: Sequence[str | os.PathLike[str]] = ()
    runs: str | os.PathLike[str] = "punkdiff-runs"
    _resolved: dict[str, list[Path]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        run_root = Path(self.runs).expanduser()
        run_root.mkdir(parents=True, exist_ok=True)
        self.runs = run_root.resolve()
        self.models = _existing(self.models, "model")
        self.data = _existing(self.data, "data")
        self._resolved = {"models": [*self.models, self.runs], "data": list(self.data), "runs": [self.runs]}

    @classmethod
    def from_env(cls, default_run_root: str = "punkdiff-runs") -> Roots:
        """Roots from `PUNKDIFF_MODEL_ROOTS`, `PUNKDIFF_DATA_ROOTS` (os.pathsep-separated) and `PUNKDIFF_RUN_ROOT`."""

        def paths(name: str) -> list[str]:
            return [p for p in os.environ.get(name, "").split(os.pathsep) if p]

        return cls(paths(ENV_MODEL_ROOTS), paths(ENV_DATA_ROOTS), os.environ.get(ENV_RUN_ROOT) or default_run_root)

    def of(self, kind: Kind) -> list[Path]:
        """The resolved roots of one kind (`"models"` includes the run root)."""
        return list(self._resolved[kind])

    def resolve(self, path: str | os.PathLike[str], kind: Kind, *, must_exist: bool = True) -> Path:
        """`path` resolved inside a root of `kind`, or `PathOutsideRoots` / `FileNotFoundError` saying why.

        A relative path is tried against each root in order (the first that exists wins; with
        `must_exist=False`, the first root). Symlinks are followed before the check, so a link that
        leads out of the roots is refused even though its own name lies inside.
        """
        text = os.fspath(path).strip()
        if not text:
            raise FileNotFoundError(f"no {_NOUN[kind]} given: pick one from the list or type a path")
        roots = self.of(kind)
        if not roots:
            raise PathOutsideRoots(
                f"this app was started without {_NOUN[kind]} folders, so it cannot open {text!r}; restart it with "
                f"{_FLAG[kind]} FOLDER"
            )
        raw = Path(text).expanduser()
        candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
        for candidate in candidates:
            resolved = candidate.resolve()
            if not _inside(resolved, roots):
                raise PathOutsideRoots(
                    f"{text} is outside the {_NOUN[kind]} folders this app may use "
                    f"({', '.join(map(str, roots))}); '..' and symlinks out of them are refused"
                )
            if resolved.exists() or not must_exist:
                return resolved
        raise FileNotFoundError(f"{text} does not exist in the {_NOUN[kind]} folders ({', '.join(map(str, roots))})")

    def check_tree(self, folder: Path, kind: Kind, *, also: Sequence[Path] = ()) -> Path:
        """`folder` again, once every file and folder under it (and each existing path in `also`, such as a run's
        `training_summary.json` beside its model) resolves inside the roots of `kind`; else `PathOutsideRoots`
        naming the first link that leads out.

        `resolve` checks the folder a user names; this checks what will be read from it (weights, configs, a
        dataset's images), so a weight file or an image linked from elsewhere is refused before anything opens it.
        Links inside the roots are followed (each real folder once, so a link loop ends).
        """
        roots = self.of(kind)
        seen: set[Path] = set()
        pending = [Path(folder)]
        for path in also:
            if path.is_symlink() or path.exists():
                self._check_inside(path, roots, kind)
        while pending:
            current = pending.pop()
            real = self._check_inside(current, roots, kind)
            if real in seen or not real.is_dir():
                continue
            seen.add(real)
            try:
                with os.scandir(current) as entries:  # plain files need no check: their folder is inside
                    pending += [Path(e.path) for e in entries if e.is_symlink() or e.is_dir(follow_symlinks=False)]
            except OSError:  # unreadable folder: nothing can be read from it either
                continue
        return Path(folder)

    def check_model(self, folder: Path) -> Path:
        """`check_tree` for a model folder: its weights, configs, palette and card, and the run's
        `training_summary.json` beside it, which the app reads for the model's preprocessing."""
        return self.check_tree(folder, "models", also=[Path(folder).parent / "training_summary.json"])

    @staticmethod
    def _check_inside(path: Path, roots: Sequence[Path], kind: Kind) -> Path:
        real = path.resolve()
        if not _inside(real, roots):
            raise PathOutsideRoots(
                f"{path} leads to {real}, outside the {_NOUN[kind]} folders this app may use "
                f"({', '.join(map(str, roots))}): replace the link with a copy of the file, or restart the app with "
                f"{_FLAG[kind]} naming the folder it points into"
            )
        return real

    def relative_name(self, path: Path, kind: Kind) -> str:
        """How a path is shown in the page: relative to its root, prefixed with the root's folder name."""
        for root in self.of(kind):
            if _inside(path, [root]):
                return str(Path(root.name) / path.relative_to(root))
        return str(path)

    def walk(self, kind: Kind, max_depth: int) -> Iterator[Path]:
        """Every folder under the roots of `kind` down to `max_depth`, skipping hidden ones and links out."""
        for root in self.of(kind):
            yield from _walk(root, max_depth, self.of(kind))


def resolve_dataset(roots: Roots, text: str, *, offline: bool | None = None) -> str:
    """A dataset reference for `punkdiff train` / `eval`: a folder inside the data roots (absolute), a built-in
    name such as `sklearn-digits`, or a Hub id (`owner/name`) when the app is online.

    A path that leaves the data roots is refused before anything reads it; so is a Hub id that is not a local
    folder while `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set.
    """
    from punkdiff.data import BUILTIN_DATASETS

    text = (text or "").strip()
    if text in BUILTIN_DATASETS:
        return text
    try:
        folder = roots.resolve(text, "data")
    except (FileNotFoundError, PathOutsideRoots):
        if not HUB_ID.match(text) or Path(text).is_absolute():
            raise
    else:
        return str(roots.check_tree(folder, "data"))
    if offline is None:
        flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)
    if offline:
        raise FileNotFoundError(
            f"{text} is not a dataset folder here, and this app is offline, so it cannot come from the Hub: "
            "pick a dataset from the list"
        )
    return text


_NOUN = {"models": "model", "data": "data", "runs": "run"}
_FLAG = {"models": "--model-root", "data": "--data-root", "runs": "--run-root"}


def _existing(paths: Sequence[str | os.PathLike[str]], noun: str) -> list[Path]:
    resolved = []
    for path in paths:
        p = Path(path).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"{noun} root {path} is not a folder; create it or pass another one")
        resolved.append(p)
    return resolved


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _walk(folder: Path, depth: int, roots: Sequence[Path]) -> Iterator[Path]:
    yield folder
    if depth == 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:  # unreadable folder: nothing to list, not an error for the caller
        return
    for child in children:
        if child.name.startswith(".") or child.name in _SKIPPED or not _inside(child.resolve(), roots):
            continue
        yield from _walk(child, depth - 1, roots)
