"""Kill it anywhere, lose nothing: real training runs SIGKILLed at random moments (several mid-checkpoint and
mid-export), each resumed with `--resume-from-checkpoint latest`, must end with the uninterrupted run's weights.
SIGTERM (preemption) checkpoints before it exits.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from killable import TrainingProcess
from tiny_training import exported_weights, max_diff, tiny_args

from punkdiff.hub import validate_model_folder
from punkdiff.training.checkpoints import checkpoint_problem, find_checkpoint, list_checkpoints

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and forkserver: Linux only")

STEPS = 40
RUN = ["--max-steps", str(STEPS), "--checkpoint-every", "2", "--checkpoints-total-limit", "2",
       "--lr-warmup-steps", "5", "--set", "model.dropout=0.1", "--seed", "3"]


@pytest.fixture(scope="module")
def straight(mnist_dir, cache_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert TrainingProcess(tiny_args(mnist_dir, cache_dir, out, *RUN), out.parent / "log").wait() == 0
    return out


def _exists(folder: Path, pattern: str):
    return lambda: any(folder.glob(pattern))


def _random_moment(out: Path, target: int, delay: float):
    """True from `delay` seconds after the run has a checkpoint at or past step `target` (at once, during start-up,
    when the resumed run already has one), so a kill lands at a random moment of the run on a fast or a loaded
    machine alike."""
    seen = []

    def due() -> bool:
        reached = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")]
        if not seen and max(reached, default=0) >= target:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() >= seen[0] + delay

    return due


def _last_complete_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out) if checkpoint_problem(p) is None]
    return max(steps, default=0)


def test_sigkill_at_random_moments_then_resume_matches_the_uninterrupted_run(straight, mnist_dir, tmp_path, capsys):
    rng = random.Random(20261123)
    out, cache, log = tmp_path / "run", tmp_path / "cache", tmp_path / "log"
    # what each kill waits for: a random moment, a checkpoint being written, or the export being written
    plan = ["random", "checkpoint", "random", "checkpoint", "random", "checkpoint", "random", "checkpoint",
            "random", "checkpoint", "export", "export"]
    # the random kills' steps, drawn up front and in order over the first two thirds of the run, so the kills
    # after them (each a few steps on) still land before the end on any machine
    targets = sorted(rng.sample(range(0, 2 * STEPS // 3, 2), plan.count("random")))
    kills, phases, last_step = 0, [], 0
    while plan:
        resume = ["--resume-from-checkpoint", "latest"] if kills else []
        run = TrainingProcess(tiny_args(mnist_dir, cache, out, *RUN, *resume), log)
        mode = plan[0]
        if mode == "random":  # a random moment inside the run, however fast the machine: after a random step
            killed = run.kill_when(_random_moment(out, targets.pop(0), rng.uniform(0.0, 0.3)), timeout=60)
        elif mode == "checkpoint":
            time.sleep(rng.uniform(0, 0.3))  # not always the first checkpoint after a start
            killed = run.kill_when(_exists(out / "checkpoints", ".tmp-checkpoint-*"), timeout=60)
        else:
            killed = run.kill_when(_exists(out, ".pipeline.staging-*"), timeout=60)
        code = run.wait()
        if not killed:  # the run ended before the moment came: it must have succeeded
            assert code == 0, log.read_text()[-3000:]
            if mode != "export":  # a finished run is re-exported on resume, so an export can always be caught
                plan.pop(0)
            continue
        assert code == -signal.SIGKILL
        kills += 1
        phases.append(mode)
        plan.pop(0)
        # nothing finished is lost, nothing half-written is trusted
        latest = find_checkpoint(out, "latest")
        step = int(latest.name.split("-")[1]) if latest else 0
        assert step == _last_complete_step(out) >= last_step
        last_step = step
        if (out / "pipeline").exists():
            validate_model_folder(out / "pipeline")  # a kill mid-export leaves the previous good export
        for cached in cache.glob("*.npy"):  # a kill mid-cache-write leaves no cache, or a complete one
            assert np.load(cached).shape == (64, 1, 16, 16)

    assert TrainingProcess(tiny_args(mnist_dir, cache, out, *RUN, "--resume-from-checkpoint", "latest"),
                           log).wait() == 0, log.read_text()[-3000:]
    difference = max_diff(exported_weights(straight), exported_weights(out))
    with capsys.disabled():
        print(f"\ncrash/resume: {kills} SIGKILLs ({phases.count('checkpoint')} mid-checkpoint, "
              f"{phases.count('export')} mid-export), final export max |diff| vs uninterrupted {difference:.1e}")
    assert kills >= 10 and phases.count("checkpoint") >= 3 and phases.count("export") >= 2
    assert difference == 0.0
    assert (out / "samples.png").read_bytes() == (straight / "samples.png").read_bytes()
    assert not list(out.glob(".pipeline.*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_checkpoints_then_exits_and_resume_matches(straight, mnist_dir, cache_dir, tmp_path):
    """Preemption: SIGTERM mid-run saves a checkpoint at the step reached and exits with 1."""
    out, log = tmp_path / "run", tmp_path / "log"
    args = tiny_args(mnist_dir, cache_dir, out, *RUN, "--checkpoint-every", "8", "--checkpoints-total-limit", "1")
    run = TrainingProcess(args, log)
    # the first scheduled checkpoint proves the loop (and its SIGTERM handler) is running, whatever the load
    assert run.kill_when(_exists(out / "checkpoints", "checkpoint-8"), timeout=120, sig=signal.SIGTERM), log.read_text()
    assert run.wait() == 1, log.read_text()[-2000:]
    text = log.read_text()
    (checkpoint,) = list_checkpoints(out)
    step = int(checkpoint.name.split("-")[1])
    assert 8 <= step < STEPS and f"stopped by SIGTERM at step {step};" in text, text[-2000:]
    assert checkpoint_problem(checkpoint) is None
    assert "--resume-from-checkpoint latest" in text
    assert TrainingProcess([*args, "--resume-from-checkpoint", "latest"], log).wait() == 0
    assert max_diff(exported_weights(straight), exported_weights(out)) == 0.0
