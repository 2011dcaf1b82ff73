"""Evaluations from the app: requests checked, the `punkdiff eval` command line, the report read back for the page."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from punkdiff.eval_runs import (
    EvalManager,
    EvalRequest,
    Evaluation,
    default_reference,
    eval_available,
)
from punkdiff.roots import Roots


def test_requests_are_checked_and_become_eval_flags(tmp_path):
    request = EvalRequest("/m/pipeline", "/d/mnist", split="test", num_samples=500, scheduler="dpm++", steps=20)
    assert request.check().flags(tmp_path / "out") == [
        "/m/pipeline", "--reference", "/d/mnist", "--split", "test", "--num-samples", "500", "--scheduler", "dpm++",
        "--steps", "20", "--seed", "0", "--out", str(tmp_path / "out"),
    ]
    for name in ("ddim-trailing", "dpm++-karras", "unipc"):  # every sampler of the pipeline
        assert EvalRequest("/m", "/d", scheduler=name).check().flags(tmp_path)[5:7] == ["--scheduler", name]
    for change, message in [({"scheduler": "euler"}, "scheduler must be one of ddpm, ddim, ddim-trailing, dpm"),
                            ({"num_samples": 1}, "number of samples"), ({"steps": 2.5}, "steps")]:
        with pytest.raises(ValueError, match=message):
            EvalRequest("/m", "/d", **change).check()


def test_the_report_embeds_only_its_own_figures(tmp_path):
    folder = tmp_path / "evaluations" / "e1"
    folder.mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(folder / "hist.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    (folder / "report.md").write_text(
        "# Report\n![histogram](hist.png)\n![outside](../../secret.png)\n<img src='link.png'>\n![gone](none.png)\n"
    )
    (folder / "metrics.json").write_text(json.dumps({"fid": 12.5}))
    evaluation = Evaluation(folder)
    report = evaluation.report_markdown()
    embedded = base64.b64encode((folder / "hist.png").read_bytes()).decode()
    assert f"![histogram](data:image/png;base64,{embedded})" in report
    # a link out of the folder, a symlink out of it and a missing file stay links: nothing else is read
    assert "![outside](../../secret.png)" in report and "<img src='link.png'>" in report and "(none.png)" in report
    assert evaluation.metrics() == {"fid": 12.5} and evaluation.status() == "finished"
    assert [p.name for p in evaluation.figures()] == ["hist.png", "link.png"]
    assert Evaluation(tmp_path / "nothing").report_markdown() is None


def test_evaluations_are_listed_and_an_absent_command_is_said(tmp_path):
    roots = Roots(runs=tmp_path / "runs")
    manager = EvalManager(roots)
    assert manager.evaluations() == []
    (Path(roots.runs) / "evaluations" / "e1").mkdir(parents=True)
    assert [e.name for e in manager.evaluations()] == ["e1"]
    with pytest.raises(FileNotFoundError, match="no evaluation named"):
        manager.get("../e1")
    if not eval_available():
        with pytest.raises(RuntimeError, match="no `punkdiff eval`"):
            manager.start(EvalRequest("/m", "/d"))


def _model_folder(run: Path, dataset: str | None, timesteps: int = 100) -> Path:
    """The JSON side of an exported model (what the app reads without loading it), and its run's summary."""
    model = run / "pipeline"
    (model / "unet").mkdir(parents=True)
    (model / "scheduler").mkdir()
    (model / "unet" / "config.json").write_text(json.dumps({"sample_size": 16, "in_channels": 1}))
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": timesteps}))
    if dataset is not None:
        (run / "training_summary.json").write_text(json.dumps({"config": {"data": {"dataset": dataset,
                                                                                    "split": "train"}}}))
    return model


def test_the_reference_is_the_models_own_data_when_the_app_may_read_it(tmp_path, mnist_dir):
    roots = Roots(data=[mnist_dir.parent], runs=tmp_path / "runs")
    own = default_reference(roots, _model_folder(tmp_path / "runs" / "a", str(mnist_dir)))
    assert (own.dataset, own.split) == (str(mnist_dir.resolve()), "train")
    assert "the data this model was trained on" in own.reason and own.note_for(own.dataset) == own.reason
    assert f"Not the data this model was trained on (`{mnist_dir}`)" in own.note_for("/elsewhere/faces")
    # a name relative to a data root is the folder there
    assert default_reference(roots, _model_folder(tmp_path / "runs" / "b", "mnist")).dataset == own.dataset
    assert default_reference(roots, _model_folder(tmp_path / "runs" / "c", "sklearn-digits")).dataset == \
        "sklearn-digits"
    # a Hub id, or a folder outside the data roots, is not proposed: the page says why and the user picks
    for trained_on in ("ylecun/mnist", str(tmp_path)):
        other = default_reference(roots, _model_folder(tmp_path / "runs" / Path(trained_on).name, trained_on))
        assert other.dataset is None and f"trained on `{trained_on}`, which is not a dataset under" in other.reason
        assert str(mnist_dir.parent.resolve()) in other.reason  # the roots as the app resolved them
    unknown = default_reference(roots, _model_folder(tmp_path / "runs" / "d", None))
    assert unknown.dataset is None and "does not say what it was trained on" in unknown.reason


@pytest.mark.skipif(not eval_available(), reason="this punkdiff has no `punkdiff eval`")
def test_more_steps_than_the_noise_schedule_are_refused_before_anything_starts(tmp_path):
    roots = Roots(runs=tmp_path / "runs")
    model = _model_folder(tmp_path / "runs" / "a", None, timesteps=100)
    with pytest.raises(ValueError, match="steps must be at most 100, the length of this model's noise schedule"):
        EvalManager(roots).start(EvalRequest(str(model), "/d", steps=101))
    assert EvalManager(roots).evaluations() == []


def test_the_sample_count_is_capped_with_a_message():
    from punkdiff.eval_runs import MAX_SAMPLES

    assert EvalRequest("/m", "/d", num_samples=MAX_SAMPLES).check().num_samples == 50_000
    for too_many in (MAX_SAMPLES + 1, 10**12):
        with pytest.raises(ValueError, match=rf"number of samples must be at most 50,000 .* got {too_many:,}: run "
                                             r"`punkdiff eval` from the command line for more"):
            EvalRequest("/m", "/d", num_samples=too_many).check()


@pytest.mark.skipif(not eval_available(), reason="this punkdiff has no `punkdiff eval`")
def test_a_running_evaluation_stops_and_neither_a_stopped_a_dead_nor_a_finished_one_blocks_the_next(tmp_path):
    """A stand-in for `punkdiff eval` (a Python process that sleeps, or exits) through the manager's command."""
    import signal
    import sys
    import time

    roots = Roots(runs=tmp_path / "runs")
    model = _model_folder(tmp_path / "runs" / "a", None)
    sleeper = EvalManager(roots, command=[sys.executable, "-c", "import time; time.sleep(3600)", "--"])
    first = sleeper.start(EvalRequest(str(model), "/d"))
    with pytest.raises(RuntimeError, match=f"an evaluation is already running \\({first.name}\\)"):
        sleeper.start(EvalRequest(str(model), "/d"))
    assert sleeper.stop(first.name) == "stopped"
    with pytest.raises(ValueError, match=f"{first.name} is not running \\(stopped by you\\)"):
        sleeper.stop(first.name)
    time.sleep(1.1)  # evaluation folders are named by the second
    dead = sleeper.start(EvalRequest(str(model), "/d"))
    os.killpg(dead.job.latest()["pid"], signal.SIGKILL)  # killed from outside: it ends as failed, never blocks
    deadline = time.time() + 30
    while dead.job.is_running() and time.time() < deadline:
        time.sleep(0.05)
    assert dead.status() == "failed"
    time.sleep(1.1)
    finisher = EvalManager(roots, command=[sys.executable, "-c", "pass", "--"])
    finished = finisher.start(EvalRequest(str(model), "/d"))
    while finished.job.is_running() and time.time() < deadline:
        time.sleep(0.05)
    assert finished.status() == "finished"
    time.sleep(1.1)
    assert sleeper.start(EvalRequest(str(model), "/d")).job.is_running()
    from punkdiff.jobs import stop_launched

    stop_launched(timeout=10)


