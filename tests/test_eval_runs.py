"""Evaluations from the app: requests checked, the `punkdiff eval` command line, the report read back for the page."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from punkdiff.eval_runs import EvalManager, EvalRequest, Evaluation, eval_available
from punkdiff.roots import Roots


def test_requests_are_checked_and_become_eval_flags(tmp_path):
    request = EvalRequest("/m/pipeline", "/d/mnist", split="test", num_samples=500, scheduler="dpm++", steps=20)
    assert request.check().flags(tmp_path / "out") == [
        "/m/pipeline", "--reference", "/d/mnist", "--split", "test", "--num-samples", "500", "--scheduler", "dpm++",
        "--steps", "20", "--seed", "0", "--out", str(tmp_path / "out"),
    ]
    for change, message in [({"scheduler": "euler"}, "scheduler must be one of"),
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
