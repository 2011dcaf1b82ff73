"""The report: metrics.json, report.md with every metric beside its floor, and the figures it embeds."""

from __future__ import annotations

import json

import PIL.Image

from punkdiff.metrics.evaluation import evaluate
from punkdiff.metrics.report import write_report


def test_report_files_and_figures(tmp_path, mnist16, digit_classifier):
    result = evaluate(mnist16.heldout[:200], mnist16, classifier=digit_classifier, progress=False)
    study = {"t": [1, 500], "mse": [0.001, 0.2], "ssim": [0.99, 0.1],
             "noised": [mnist16.heldout[:8] / 255] * 2, "reconstructed": [mnist16.heldout[:8] / 255] * 2}
    report = write_report(result, tmp_path, training_images=mnist16.train, info={"model": "m", "seed": 0},
                          reconstruction=(study, mnist16.heldout[:8]))
    text = report.read_text()
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["model"] == "m" and data["reconstruction"]["t"] == [1, 500]
    for name, m in result.metrics.items():
        assert data["metrics"][name]["floor"] == m["floor"]
        assert f"| {name} |" in text
    # no Inception or DINOv2 weights given: said so, never a number
    assert "| fid | not computed: weights unavailable |" in text and "fid" not in data["metrics"]
    assert data["not_computed"]["fd_dinov2"] == "not computed: weights unavailable"
    for figure in ("samples.png", "class_histogram.png", "nearest_training_images.png", "reconstruction.png",
                   "reconstruction_curves.png"):
        assert f"({figure})" in text
        with PIL.Image.open(tmp_path / figure) as image:
            assert image.width > 100
    with PIL.Image.open(tmp_path / "nearest_training_images.png") as sheet:  # 16 pairs, 8 tiles a row
        assert sheet.width > sheet.height
