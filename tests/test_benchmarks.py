"""A smoke of the benchmark harness (`benchmarks/`): tiny configurations, a few steps, no timing asserted.

The benchmarks themselves are not tests (their figures live in `benchmarks/results/` and the README); this only
keeps the scripts runnable and checks what they assert besides speed: the contenders train and sample the same
configuration, punkdiff's DDIM images equal stock `DDIMPipeline`'s from the same noise, and the data paths agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_data
    import bench_sample
    import bench_train

    yield bench_train, bench_sample, bench_data
    sys.path.remove(str(BENCHMARKS))


def test_bench_train_runs_every_contender_on_the_same_config(benchmarks, mnist_dir, tmp_path):
    bench_train, _, _ = benchmarks
    out = tmp_path / "train.json"
    assert bench_train.main(["--presets", "mnist-32-tiny", "--contenders", "punkdiff", "recipe", "bare",
                             "--warmup-steps", "1", "--steps", "2", "--repeats", "1", "--threads", "0",
                             "--max-load", "1000", "--datasets-root", str(mnist_dir.parent), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["config"] == "mnist-32-tiny" and result["batch_size"] == 16 and result["images"] == 256
    contenders = result["contenders"]
    assert set(contenders) == {"punkdiff", "recipe", "bare"}
    assert all(c["images_per_s"]["median"] > 0 for c in contenders.values())
    assert len({c["gflop_per_image_fwd_bwd"] for c in contenders.values()}) == 1  # one UNet for all three
    assert "ratio_over_bare" in contenders["punkdiff"] and "ratio_over_recipe" in contenders["punkdiff"]
    assert {"date", "platform", "versions", "loadavg_start"} <= set(report["machine"])


def test_bench_sample_punkdiff_gives_stock_ddim_images(benchmarks, tmp_path):
    _, bench_sample, _ = benchmarks
    out = tmp_path / "sample.json"
    assert bench_sample.main(["--presets", "mnist-32-tiny", "--batch-sizes", "2", "--steps", "3", "--repeats", "1",
                              "--contenders", "punkdiff", "bare", "stock", "--threads", "0", "--max-load", "1000",
                              "--count", "5", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["max_abs_diff_punkdiff_vs_stock"] < 1e-5  # same noise, same model: the same images
    assert set(result["contenders"]) == {"punkdiff", "bare", "stock"}
    assert result["count"]["images"] == 6  # whole batches of 2 until 5 exist


def test_bench_sample_runs_stock_ddim_with_a_bf16_unet(benchmarks, tmp_path):
    _, bench_sample, _ = benchmarks
    out = tmp_path / "sample.json"
    assert bench_sample.main(["--presets", "mnist-32-tiny", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
                              "--contenders", "punkdiff", "stock", "--bf16", "--threads", "0", "--max-load", "1000",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["options"]["bf16"] and result["max_abs_diff_punkdiff_vs_stock"] is None  # compared in fp32 only
    assert result["contenders"]["stock"]["images_per_s"]["median"] > 0


def test_bench_data_paths_agree_and_decode_memory_is_measured(benchmarks, mnist_dir, tmp_path):
    _, _, bench_data = benchmarks
    out = tmp_path / "data.json"
    assert bench_data.main(["--quick", "--presets", "mnist-baseline-16", "--repeats", "1", "--batches", "2",
                            "--datasets-root", str(mnist_dir.parent), "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["tensor_shape"] == [500, 1, 16, 16]
    assert result["check"]["first_batch_mean_abs_diff"] < 0.05  # MNIST: both resize bilinearly
    assert result["punkdiff_prep_peak_pss_bytes"] >= result["punkdiff_prep_peak_anon_bytes"] > 0
    assert result["punkdiff_prep_images_per_s"] > 0
