"""Training runs from the app: real `punkdiff train` processes on a slice of MNIST, started, watched, stopped,
resumed, and a crash shown with its error."""

from __future__ import annotations

import json
import time

import pytest

from punkdiff.roots import Roots
from punkdiff.runs import RunError, RunManager, TrainRequest, suggest_dataset

# a tiny UNet on 64 digits: a step takes tens of milliseconds, the process start dominates
TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "train.num_sample_images=4",
        "train.sample_inference_steps=3"]


def request(name: str, dataset: str, **kwargs) -> TrainRequest:
    settings = dict(max_steps=100_000, batch_size=8, max_train_samples=64, checkpoint_every=3, sample_every=5,
                    lr_warmup_steps=0, overrides=TINY)
    return TrainRequest(name, "mnist-fast-16", dataset, **{**settings, **kwargs})


def wait_for(predicate, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_requests_are_checked_before_anything_starts():
    ok = request("run-1", "/data/mnist", learning_rate=1e-3)
    assert ok.check() is ok
    flags = ok.train_flags()
    assert flags[:6] == ["--preset", "mnist-fast-16", "--dataset", "/data/mnist", "--max-steps", "100000"]
    assert "--learning-rate" in flags and flags[flags.index("--learning-rate") + 1] == "0.001"
    assert flags.count("--set") == len(TINY)
    bad = [
        (dict(name="../escape"), "run name"),
        (dict(name="generated"), "run name"),
        (dict(max_steps=0), "max steps must be a whole number of at least 1"),
        (dict(batch_size=-4), "batch size"),
        (dict(learning_rate=3.0), "learning rate"),
        (dict(overrides=["rm -rf /"]), "section.key=value"),
        (dict(overrides=["data.dataset=/etc"]), "Dataset field"),
    ]
    for change, message in bad:
        with pytest.raises(RunError, match=message):
            request(**{"name": "r", "dataset": "/d", **change}).check()


def test_suggested_dataset_matches_the_preset():
    found = ["/x/celeba-faces", "/x/cryptopunks", "/x/mnist"]
    assert suggest_dataset("mnist-fast-16", found) == "/x/mnist"
    assert suggest_dataset("punks-24", found) == "/x/cryptopunks"
    assert suggest_dataset("imagefolder-128", found) == "/x/celeba-faces"
    assert suggest_dataset("punks-24", []) is None


@pytest.mark.slow
def test_start_watch_stop_resume_and_a_crash(mnist_dir, tmp_path):
    roots = Roots(data=[mnist_dir.parent], runs=tmp_path / "runs")
    manager = RunManager(roots)
    run = manager.start(request("digits", str(mnist_dir), checkpoint_every=1000))
    assert run.status() == "running" and run.request().name == "digits"

    wait_for(lambda: run.progress().step >= 4, what="a few steps")
    progress = run.progress()
    assert progress.total == 100_000 and progress.loss > 0 and progress.steps[-1] == progress.step
    assert progress.images_per_sec > 0 and progress.eta_s > 0
    with pytest.raises(RunError, match="already training.*--max-runs 2"):  # one at a time by default
        manager.start(request("second", str(mnist_dir)))
    with pytest.raises(RunError, match="already exists"):
        manager.start(request("digits", str(mnist_dir)))

    # Stop: SIGTERM to the run's process group; the loop finishes its step, checkpoints it and exits (no scheduled
    # checkpoint before step 1000, so the one kept is the stop's own)
    assert manager.stop("digits") == "stopped"
    kept = run.checkpoints()
    assert [step for step, _ in kept] == [run.progress().step] and "stopped by SIGTERM" in run.log_tail()
    assert [r.name for r in manager.runs()] == ["digits"] and not manager.active()

    # Resume to a few steps past the last checkpoint: it continues there, finishes and exports.
    last = kept[-1][0]
    with pytest.raises(RunError, match=f"set max steps above {last}"):
        manager.resume("digits", max_steps=last)
    manager.resume("digits", max_steps=last + 2)
    wait_for(lambda: run.status() in ("finished", "failed"), what="the resumed run to end")
    assert run.status() == "finished", run.log_tail()
    assert run.pipeline() is not None and run.summary()["steps"] == last + 2
    assert run.summary()["resumed_from"].endswith(f"checkpoint-{last}")
    assert run.progress().step == last + 2 and run.samples()[-1][0] == last + 2
    assert len(run.job.launches()) == 2

    # A dataset that fails to load: the run fails, and says why.
    (tmp_path / "empty").mkdir()
    broken = manager.start(request("broken", str(tmp_path / "empty")))
    wait_for(lambda: broken.status() != "running", what="the broken run to end")
    assert broken.status() == "failed"
    assert broken.error().startswith("error:") and "empty" in broken.error()


def test_runs_started_elsewhere_are_listed(tmp_path):
    roots = Roots(runs=tmp_path / "runs")
    cli_run = tmp_path / "runs" / "from-cli"
    (cli_run / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    (cli_run / "checkpoints" / "checkpoint-6" / "training_state.json").write_text(
        json.dumps({"config": {"train": {"max_steps": 9}}}))
    (cli_run / "checkpoints" / ".tmp-checkpoint-9").mkdir()  # an interrupted save is not a checkpoint
    for name in ("generated", "evaluations", "notes"):
        (tmp_path / "runs" / name).mkdir()
    manager = RunManager(roots)
    [run] = manager.runs()
    assert run.name == "from-cli" and run.status() == "incomplete" and run.request() is None
    assert [step for step, _ in run.checkpoints()] == [6] and run.progress().total == 9
    with pytest.raises(RunError, match="not started from this app"):
        manager.resume("from-cli")
    with pytest.raises(RunError, match="not running"):
        manager.stop("from-cli")


def test_time_left_is_the_launchs_average_pace_not_the_last_burst():
    """Losses arrive in bursts: 30 steps logged at once every 60 s of a 30-minute, 900-step run."""
    from punkdiff.runs import _time_left

    started = 1000.0
    steps, walls = [], []
    for burst in range(1, 6):  # 5 minutes in: 150 steps done
        steps += list(range(30 * burst - 29, 30 * burst + 1))
        walls += [started + 60.0 * burst] * 30
    assert _time_left(steps, walls, 900, started) == pytest.approx(750 * 300 / 150)  # 25 minutes
    # resumed at step 150: only this launch's steps count, at its own pace (twice as fast)
    resumed = started + 1000
    more = list(range(151, 211))
    assert _time_left(steps + more, walls + [resumed + 60.0] * 60, 900, resumed) == pytest.approx(690 * 60 / 60)
    # a command-line run: timed from its first logged step; nothing done yet: no estimate
    assert _time_left(steps, walls, 900, None) == pytest.approx(750 * 240 / 149)  # steps 1..150 over 240 s
    assert _time_left([30] * 1, [started + 60], 900, started + 60) is None
