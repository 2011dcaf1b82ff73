"""Evaluations for the web app: `punkdiff eval` in the background, its report read back for the page.

The evaluation itself is `punkdiff eval MODEL_DIR --reference DATASET [--split SPLIT] --num-samples N
--scheduler S --steps K --seed S --out DIR --cache-dir CACHE` (the only contract with the evaluation work),
which writes `metrics.json`, `report.md` (figures referenced by relative names) and PNG figures into DIR. This
module only starts it as a `Job` under `<run root>/evaluations/<name>/` and reads those files back; a punkdiff
without the `eval` command is reported as such (`eval_available`), never faked. A score only means something
against the data the model learned, so `default_reference` proposes that dataset when the app may read it.

Example:
    >>> manager = EvalManager(roots)
    >>> proposed = default_reference(roots, Path("/abs/models/mnist16"))  # the run's own dataset, and why
    >>> evaluation = manager.start(EvalRequest("/abs/models/mnist16", proposed.dataset, num_samples=500))
    >>> evaluation.status(), evaluation.report_markdown()
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from punkdiff.jobs import Job, JobFolder
from punkdiff.roots import PathOutsideRoots, Roots, resolve_dataset

EVAL_LOG = "eval.log"
_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))|(<img\b[^>]*?\bsrc=[\"'])([^\"']+)([\"'])")
_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
# 50,000 is the count FID is usually reported at; more only makes one evaluation hold the machine for days
MAX_SAMPLES = 50_000


def eval_available() -> bool:
    """Whether this punkdiff has the `punkdiff eval` command (the evaluation work may not be installed)."""
    from punkdiff.cli import build_parser

    subcommands = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    return "eval" in subcommands.choices


@dataclass(frozen=True)
class ReferenceDefault:
    """The reference dataset (and split) proposed for a model, or None, with the reason the page shows."""

    dataset: str | None
    split: str | None
    reason: str
    trained_on: str | None = None

    def note_for(self, chosen: str | None) -> str:
        """What the page says beside the reference the user has now chosen."""
        if self.trained_on is None or (chosen or "").strip() in ("", self.dataset):
            return self.reason
        return (f"Not the data this model was trained on (`{self.trained_on}`): the scores then say how far its "
                "samples are from these images instead.")


def default_reference(roots: Roots, model: Path) -> ReferenceDefault:
    """The dataset `model` was trained on (its run's `training_summary.json`, else its model card), when it lies
    under the app's data roots or is built in; otherwise None, and a reason that asks the user to pick one.

    A Hub id is never proposed: the app reads only its own folders, and a local copy of the same data is the
    reference to choose then.
    """
    from punkdiff.studio import model_info

    info = model_info(model)
    if info.trained_on is None:
        return ReferenceDefault(None, None, (
            "This model's folder does not say what it was trained on (no `training_summary.json` beside it, no "
            "dataset in its model card): pick the dataset it learned from, or its scores mean little."))
    try:
        dataset = resolve_dataset(roots, info.trained_on, offline=True)
    except (FileNotFoundError, PathOutsideRoots):
        folders = ", ".join(f"`{p}`" for p in roots.of("data")) or "none"
        return ReferenceDefault(None, None, (
            f"This model was trained on `{info.trained_on}`, which is not a dataset under this app's data folders "
            f"({folders}): pick a local copy of that dataset, or its scores mean little."), info.trained_on)
    return ReferenceDefault(dataset, info.data.split, (
        f"`{roots.relative_name(Path(dataset), 'data')}`, split `{info.data.split}`: the data this model was "
        "trained on, so each score is read beside the real-vs-real floor of the same images."), info.trained_on)


@dataclass
class EvalRequest:
    """A model folder and reference dataset, already resolved inside the app's roots, and the sampling to score."""

    model: str
    reference: str
    split: str | None = None
    num_samples: int = 1000
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 0

    def check(self) -> EvalRequest:
        from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

        if self.scheduler not in SAMPLERS:
            raise ValueError(f"scheduler must be one of {', '.join(SAMPLERS)}, got {self.scheduler!r}")
        for label, value, low in (("number of samples", self.num_samples, 2), ("steps", self.steps, 1)):
            if not float(value).is_integer() or value < low:
                raise ValueError(f"{label} must be a whole number of at least {low}, got {value}")
        if self.num_samples > MAX_SAMPLES:
            raise ValueError(f"number of samples must be at most {MAX_SAMPLES:,} (the count FID is reported at), got "
                             f"{self.num_samples:,}: run `punkdiff eval` from the command line for more")
        return self

    def flags(self, out: Path) -> list[str]:
        flags = [self.model, "--reference", self.reference]
        if self.split:
            flags += ["--split", self.split]
        flags += ["--num-samples", str(int(self.num_samples)), "--scheduler", self.scheduler,
                  "--steps", str(int(self.steps)), "--seed", str(int(self.seed)), "--out", str(out)]
        return flags


class Evaluation(JobFolder):
    """One evaluation folder: its job, its `EvalRequest`, and the report once it is written."""

    request_type = EvalRequest

    def status(self) -> str:
        return self.job.status() or ("finished" if (self.folder / "report.md").is_file() else "unknown")

    def metrics(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / "metrics.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def written(self) -> tuple[float, ...]:
        """When `report.md` and `metrics.json` were last written (0 where absent): a change means a new report."""
        return tuple(p.stat().st_mtime if p.is_file() else 0.0
                     for p in (self.folder / "report.md", self.folder / "metrics.json"))

    def figures(self) -> list[Path]:
        """The PNG figures the evaluation wrote, by name."""
        return sorted(self.folder.glob("*.png"))

    def report_markdown(self) -> str | None:
        """`report.md` with its figures embedded as data URIs, so the page shows them without serving files.

        Only images inside this evaluation's folder are embedded; any other link is left as it is.
        """
        report = self.folder / "report.md"
        if not report.is_file():
            return None
        root = self.folder.resolve()

        def embed(match: re.Match) -> str:
            before, target, after = (match.group(1), match.group(2), match.group(3)) if match.group(1) else (
                match.group(4), match.group(5), match.group(6))
            path = (self.folder / target).resolve()
            if path.suffix.lower() not in _MIME or not path.is_file() or not path.is_relative_to(root):
                return match.group(0)
            data = base64.b64encode(path.read_bytes()).decode()
            return f"{before}data:{_MIME[path.suffix.lower()]};base64,{data}{after}"

        return _IMAGE_LINK.sub(embed, report.read_text(encoding="utf-8"))


class EvalManager:
    """Start and list evaluations under `<run root>/evaluations`; at most `max_active` at a time."""

    def __init__(self, roots: Roots, max_active: int = 1, command: Sequence[str] | None = None) -> None:
        self.folder = roots.runs / "evaluations"
        self.cache_dir = roots.runs / ".cache"  # decoded reference images and classifiers stay in the run root
        self.max_active = max_active
        self.command = list(command or [sys.executable, "-m", "punkdiff.cli"])
        self._lock = threading.Lock()

    def evaluations(self) -> list[Evaluation]:
        if not self.folder.is_dir():
            return []
        folders = [p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [Evaluation(p) for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def get(self, name: str) -> Evaluation:
        folder = (self.folder / name).resolve()
        if folder.parent != self.folder.resolve() or not folder.is_dir():
            raise FileNotFoundError(f"no evaluation named {name!r}")
        return Evaluation(folder)

    def stop(self, name: str, timeout: float = 30.0) -> str:
        """Stop a running evaluation (its process group); what it wrote so far stays. Returns the new status."""
        return self.get(name).stop(timeout)

    def start(self, request: EvalRequest) -> Evaluation:
        """Run `punkdiff eval` for `request` in a new folder named after the model and the time."""
        if not eval_available():
            raise RuntimeError("evaluation is not available in this install: this punkdiff has no `punkdiff eval`")
        request.check()
        from punkdiff.studio import model_info

        timesteps = model_info(Path(request.model)).num_train_timesteps
        if request.steps > timesteps:
            raise ValueError(f"steps must be at most {timesteps}, the length of this model's noise schedule; "
                             f"got {request.steps}")
        with self._lock:
            active = [e for e in self.evaluations() if e.job.is_running()]
            if len(active) >= self.max_active:
                raise RuntimeError(f"an evaluation is already running ({active[0].name}); wait for it to finish")
            model = Path(request.model)
            label = model.parent.name if model.name == "pipeline" else model.name
            folder = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
            folder.mkdir(parents=True)
            argv = [*self.command, "eval", *request.flags(folder), "--cache-dir", str(self.cache_dir)]
            Job.launch(folder, argv, EVAL_LOG, meta={"request": asdict(request)})
            return Evaluation(folder)
