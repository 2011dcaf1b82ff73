"""Training runs for the web app: `punkdiff train` in the background, watched through the files it writes.

A run is a folder under the app's run root. The app starts `punkdiff train` there as a `Job` (the same flags
as `accelerate launch training/train.py`) and reads back what the training loop writes anyway: TensorBoard
scalars (step, loss, images/s), `samples/step-*.png`, `checkpoints/checkpoint-N/training_state.json`,
`training_summary.json` and `pipeline/`. The server keeps nothing in memory that the folder does not hold,
so a restarted app finds its runs again, and runs started from the command line into the run root are
listed too.

Example:
    >>> manager = RunManager(Roots(data=["datasets"], runs="punkdiff-runs"))
    >>> request = TrainRequest("mnist-a", "mnist-fast-16", "/abs/datasets/mnist", max_steps=2000)
    >>> run = manager.start(request)
    >>> run.progress().step, run.status()
    (0, 'running')
    >>> manager.stop("mnist-a")  # keeps every checkpoint; resume with manager.resume("mnist-a")
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from punkdiff.jobs import Job, JobFolder
from punkdiff.roots import Roots

RUN_LOG = "train.log"
# Folders of the run root the app uses for other things than runs.
RESERVED_NAMES = {"generated", "evaluations", "hub"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_OVERRIDE = re.compile(r"^(model|scheduler|data|train)\.[A-Za-z_][A-Za-z0-9_]*=.*$")
_SAMPLE = re.compile(r"^step-(\d+)\.png$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def suggest_dataset(preset: str, datasets: Sequence[str]) -> str | None:
    """The dataset among `datasets` (paths or names) that looks like the preset's own (same final name), else the
    first: `mnist-fast-16` (ylecun/mnist) suggests `.../mnist`, `punks-24` (huggingnft/cryptopunks) `.../cryptopunks`.
    """
    from punkdiff.presets import PRESETS

    default = PRESETS[preset].data.dataset if preset in PRESETS else None
    wanted = Path(default).name if default else None
    return next((d for d in datasets if Path(d).name == wanted), datasets[0] if datasets else None)


class RunError(ValueError):
    """A request the app refuses before starting anything; the message says what to change."""


@dataclass
class TrainRequest:
    """What the Train tab asks for; `None` keeps the preset's value.

    `dataset` must already be resolved: an absolute folder inside the data roots, a built-in name or a Hub id
    (see `punkdiff.roots.resolve_dataset`). `overrides` are `--set section.key=value` items.
    """

    name: str
    preset: str
    dataset: str
    max_steps: int
    batch_size: int | None = None
    learning_rate: float | None = None
    lr_warmup_steps: int | None = None
    sample_every: int | None = None
    checkpoint_every: int | None = None
    max_train_samples: int | None = None
    seed: int = 0
    overrides: list[str] = field(default_factory=list)

    def check(self) -> TrainRequest:
        """Refuse what is malformed (names, counts, override syntax); the train command checks the rest."""
        if not _NAME.match(self.name) or self.name in RESERVED_NAMES:
            raise RunError(
                f"run name {self.name!r} is not allowed: use letters, digits, '.', '_' or '-' (up to 80), "
                f"not one of {', '.join(sorted(RESERVED_NAMES))}"
            )
        counts = {
            "max steps": self.max_steps,
            "batch size": self.batch_size,
            "warmup steps": self.lr_warmup_steps,
            "sample every": self.sample_every,
            "checkpoint every": self.checkpoint_every,
            "max train samples": self.max_train_samples,
        }
        for label, value in counts.items():
            low = 0 if label == "warmup steps" else 1
            if value is not None and (not float(value).is_integer() or value < low):
                raise RunError(f"{label} must be a whole number of at least {low}, got {value}")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise RunError(f"learning rate must be between 0 and 1, got {self.learning_rate}")
        for item in self.overrides:
            if not _OVERRIDE.match(item):
                raise RunError(f"override {item!r} must look like section.key=value, e.g. train.ema_decay=0.999")
            if item.startswith(("data.dataset=", "data.cache_dir=")):
                raise RunError("choose the dataset with the Dataset field, not an override")
        return self

    def train_flags(self) -> list[str]:
        """The `punkdiff train` flags for this request (without the output and cache folders)."""
        flags = ["--preset", self.preset, "--dataset", self.dataset, "--max-steps", str(int(self.max_steps))]
        optional = {
            "--batch-size": self.batch_size,
            "--learning-rate": self.learning_rate,
            "--lr-warmup-steps": self.lr_warmup_steps,
            "--sample-every": self.sample_every,
            "--checkpoint-every": self.checkpoint_every,
            "--max-train-samples": self.max_train_samples,
        }
        for flag, value in optional.items():
            if value is not None:
                flags += [flag, str(int(value)) if flag != "--learning-rate" else repr(float(value))]
        flags += ["--seed", str(int(self.seed))]
        for item in self.overrides:
            flags += ["--set", item]
        return flags


@dataclass
class RunProgress:
    """Where a run is, from its TensorBoard scalars; `None` where not known yet."""

    step: int = 0
    total: int | None = None
    loss: float | None = None
    images_per_sec: float | None = None
    eta_s: float | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


class Run(JobFolder):
    """A run folder, read on demand; `request()` is its `TrainRequest` (None for a command-line run)."""

    request_type = TrainRequest

    def status(self) -> str:
        """`running`, `stopping`, `finished`, `stopped`, `failed`, `lost`; or for a command-line run
        `finished` (it has a summary) or `incomplete`."""
        status = self.job.status()
        if status is not None:
            return status
        return "finished" if (self.folder / "training_summary.json").is_file() else "incomplete"

    def error(self) -> str | None:
        """For a failed run, the error the training command printed (the last `error:` line)."""
        return self.job.error_message()

    def log_tail(self, max_lines: int = 25) -> str:
        return self.job.log_tail(max_lines)

    def progress(self) -> RunProgress:
        steps, losses, walls, speeds = _scalars(self.folder / "logs" / "punkdiff")
        total = self._total_steps()
        if not steps:
            return RunProgress(total=total)
        eta = None
        if total is not None and self.status() == "running":
            eta = _time_left(steps, walls, total, (self.job.latest() or {}).get("started"))
        speed = sum(speeds[-10:]) / len(speeds[-10:]) if speeds else None
        return RunProgress(steps[-1], total, losses[-1], speed, eta, steps, losses)

    def samples(self) -> list[tuple[int, Path]]:
        """Sample grids saved during training, `(step, path)`, oldest first."""
        grids = (self.folder / "samples").glob("step-*.png")
        return sorted((int(m.group(1)), p) for p in grids if (m := _SAMPLE.match(p.name)))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (with their `training_state.json`), `(step, path)`, oldest first."""
        found = [
            (int(m.group(1)), p)
            for p in (self.folder / "checkpoints").glob("checkpoint-*")
            if (m := _CHECKPOINT.match(p.name)) and (p / "training_state.json").is_file()
        ]
        return sorted(found)

    def pipeline(self) -> Path | None:
        """The exported model, once the run has finished."""
        folder = self.folder / "pipeline"
        return folder if (folder / "model_index.json").is_file() else None

    def summary(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / "training_summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _total_steps(self) -> int | None:
        request = self.request()
        if request is not None:
            return int(request.max_steps)
        checkpoints = self.checkpoints()
        if checkpoints:
            state = json.loads((checkpoints[-1][1] / "training_state.json").read_text())
            return state.get("config", {}).get("train", {}).get("max_steps")
        summary = self.summary()
        return summary["steps"] if summary else None


class RunManager:
    """Start, stop, resume and list the training runs in the run root; at most `max_active` at a time.

    Args:
        roots: The app's roots; runs are written under `roots.runs`, decoded datasets are cached in
            `roots.runs/.cache`.
        max_active: How many runs may train at once (one by default: they share the machine).
        command: How to call the punkdiff CLI (default: this Python with `-m punkdiff.cli`).
    """

    def __init__(self, roots: Roots, max_active: int = 1, command: Sequence[str] | None = None) -> None:
        self.roots = roots
        self.max_active = max_active
        self.command = list(command or [sys.executable, "-m", "punkdiff.cli"])
        self._lock = threading.Lock()

    def runs(self) -> list[Run]:
        """Every run folder (launched by the app, or holding checkpoints or a summary), newest first."""
        root = self.roots.runs
        folders = [
            p for p in root.iterdir()
            if p.is_dir() and p.name not in RESERVED_NAMES and not p.name.startswith(".")
            and ((p / "job.json").is_file() or (p / "checkpoints").is_dir() or (p / "training_summary.json").is_file())
        ]
        return [Run(p) for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def get(self, name: str) -> Run:
        folder = self.roots.resolve(name, "runs")
        if folder.parent != self.roots.runs:
            raise RunError(f"{name} is not a run of this app")
        return Run(folder)

    def active(self) -> list[Run]:
        return [run for run in self.runs() if run.job.is_running()]

    def start(self, request: TrainRequest) -> Run:
        """Start a new run in `<run root>/<name>`; refused if the name is taken or enough runs are active."""
        request.check()
        folder = self.roots.resolve(request.name, "runs", must_exist=False)
        with self._lock:
            if folder.exists() and any(folder.iterdir()):
                raise RunError(f"a run named {request.name!r} already exists: pick another name, or resume it")
            self._check_capacity()
            return self._launch(folder, request, request.train_flags())

    def resume(self, name: str, max_steps: int | None = None) -> Run:
        """Continue a stopped, failed or finished run from its latest checkpoint, optionally to more steps.

        A new `max_steps` extends the run (`--extend-schedule`: the LR schedule is re-planned over the new length).
        """
        run = self.get(name)
        request = run.request()
        if request is None:
            raise RunError(f"{name} was not started from this app, so its settings are unknown: resume it with "
                           "`punkdiff train ... --resume-from-checkpoint latest`")
        if run.job.is_running():
            raise RunError(f"{name} is still running")
        if not run.checkpoints():
            raise RunError(f"{name} has no checkpoint yet, so there is nothing to resume: start a new run")
        resume = ["--resume-from-checkpoint", "latest"]
        if max_steps is not None and max_steps != request.max_steps:
            request.max_steps = max_steps
            resume.append("--extend-schedule")
        request.check()
        last = run.checkpoints()[-1][0]
        if request.max_steps <= last:
            raise RunError(f"{name} is at step {last}: set max steps above {last} to train further")
        with self._lock:
            self._check_capacity()
            return self._launch(run.folder, request, [*request.train_flags(), *resume])

    def stop(self, name: str, timeout: float = 120.0) -> str:
        """Stop a run (SIGTERM, then SIGKILL after `timeout` s); its checkpoints stay. Returns the new status."""
        try:
            return self.get(name).stop(timeout)
        except ValueError as err:
            raise RunError(str(err)) from None

    def _check_capacity(self) -> None:
        active = self.active()
        if len(active) >= self.max_active:
            names = ", ".join(run.name for run in active)
            raise RunError(
                f"{len(active)} run(s) already training ({names}); stop one first, or start the app with "
                f"--max-runs {self.max_active + 1} to train more at once"
            )

    def _launch(self, folder: Path, request: TrainRequest, flags: list[str]) -> Run:
        argv = [
            *self.command, "train", *flags, "--output-dir", str(folder),
            "--cache-dir", str(self.roots.runs / ".cache"), "--report-to", "tensorboard",
        ]
        Job.launch(folder, argv, RUN_LOG, meta={"request": asdict(request)})
        return Run(folder)


def _time_left(steps: list[int], walls: list[float], total: int, started: float | None) -> float | None:
    """Seconds left at the average pace since this launch started: steps done over the wall time they took.

    Losses reach the log in bursts (every few steps, all at once), so the pace between the last few points says
    nothing; the whole launch's pace does, start-up and checkpoints included. A run started from the command line
    (no launch time) is timed from its first logged step.
    """
    if started is None:
        since, base = walls[0], steps[0]
    else:  # a resumed launch: the steps logged before it are not its own
        since, base = started, max((s for s, w in zip(steps, walls, strict=True) if w < started), default=0)
    done, spent = steps[-1] - base, walls[-1] - since
    return (total - steps[-1]) * spent / done if done > 0 and spent > 0 else None


_SCALAR_CACHE: dict[Path, Any] = {}
_SCALAR_LOCK = threading.Lock()


def _scalars(logdir: Path) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, losses, wall times and images/s logged so far (the last value per step, after a resume)."""
    if not logdir.is_dir():
        return [], [], [], []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _SCALAR_LOCK:
        accumulator = _SCALAR_CACHE.get(logdir)
        if accumulator is None:
            accumulator = _SCALAR_CACHE[logdir] = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
        accumulator.Reload()  # incremental: reads only what was appended since the last call
        tags = accumulator.Tags()["scalars"]
        loss = {e.step: (e.value, e.wall_time) for e in accumulator.Scalars("loss")} if "loss" in tags else {}
        speed = {e.step: e.value for e in accumulator.Scalars("images_per_sec")} if "images_per_sec" in tags else {}
    steps = sorted(loss)
    return steps, [loss[s][0] for s in steps], [loss[s][1] for s in steps], [speed[s] for s in steps if s in speed]
