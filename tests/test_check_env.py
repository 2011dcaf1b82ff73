"""`benchmarks/check_env.py` and the commands `benchmarks/gpu.sh` runs (without running any benchmark)."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Imports a script of benchmarks/ by its module name."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_unmet_requirements_names_each_requirement_the_installed_versions_miss(bench, tmp_path, monkeypatch):
    check_env = bench("check_env")
    info = tmp_path / "fake_bench_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("\n".join([
        "Metadata-Version: 2.1", "Name: fake-bench-dist", "Version: 1.0",
        "Requires-Dist: numpy<1", "Requires-Dist: numpy>=1", "Requires-Dist: no-such-dist-for-the-check>=2",
        'Requires-Dist: numpy<0.1; extra == "dev"', 'Requires-Dist: numpy<0.1; python_version < "3"',
    ]) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    numpy = metadata.version("numpy")
    assert check_env.unmet_requirements("fake-bench-dist") == [
        f"fake-bench-dist needs numpy<1: numpy {numpy} is installed",
        "fake-bench-dist needs no-such-dist-for-the-check>=2: no-such-dist-for-the-check is not installed",
    ]


def test_check_env_records_the_stack_and_stops_on_a_missing_package(bench, tmp_path, monkeypatch, capsys):
    check_env = bench("check_env")
    out = tmp_path / "env.json"
    assert check_env.main(["--device", "cpu", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    assert found["versions"]["diffusers"] == metadata.version("diffusers")
    assert found["versions"]["punkdiff"] == metadata.version("punkdiff")
    assert found["accelerator"]["requested"] == "cpu" and set(found["import_errors"]) <= set(check_env.OPTIONAL)

    monkeypatch.setitem(check_env.REQUIRED, "no-such-dist-for-the-check", "no_such_module_for_the_check")
    assert check_env.main(["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "no-such-dist-for-the-check does not import" in err and "make gpu-bundle" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal where no GPU is visible")
def test_check_env_refuses_cuda_where_no_gpu_is_visible(bench, capsys):
    check_env = bench("check_env")
    assert check_env.main(["--device", "cuda"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err


def run_gpu_sh(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """gpu.sh with a stand-in Python that records its arguments: the commands it would run, in order."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    record = shlex.quote(str(calls))
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {record}\necho >> {record}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, [shlex.split(line) for line in lines]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_gpu_sh_runs_every_figure_with_arguments_the_benchmarks_accept(bench, tmp_path, device):
    bench_train, bench_sample = bench("bench_train"), bench("bench_sample")
    done, calls = run_gpu_sh(tmp_path, "--device", device)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [c for c in calls if c[0].startswith("benchmarks/")]
    assert [c[0] for c in runs] == ["benchmarks/check_env.py", "benchmarks/bench_train.py",
                                    "benchmarks/bench_train.py", "benchmarks/bench_sample.py",
                                    "benchmarks/bench_sample.py"]
    train = [bench_train.parse_args(c[1:]) for c in runs[1:3]]
    sample = [bench_sample.parse_args(c[1:]) for c in runs[3:]]
    assert [a.presets for a in train] == [["celeba-64"], ["punks-32"]]
    assert sample[0].presets == ["celeba-64", "punks-32"] and sample[1].contenders == ["punkdiff", "bare"]
    assert all(a.device == device and a.bf16 and a.channels_last for a in train + sample[:1])
    assert all(a.compile == (device == "cuda") for a in train + sample)
    assert train[0].memory == (device == "cuda") and sample[1].count >= sample[1].batch_sizes[0]
    outs = [a.out for a in train + sample]
    assert len(set(outs)) == 4 and all(o.parent == tmp_path / "out" and device in o.name for o in outs)
    log = (tmp_path / "out" / f"gpu-{device}.log").read_text()
    for name in ("check-env", "train-celeba-64", "train-punks-32", "sample", "sample-mnist10k"):
        assert f"== {name}: ok after" in log


def test_gpu_sh_refuses_an_unknown_device_before_doing_anything(tmp_path):
    done, calls = run_gpu_sh(tmp_path, "--device", "tpu")
    assert done.returncode == 2 and "--device takes cuda or cpu, not 'tpu'" in done.stderr
    assert calls == [] and not (tmp_path / "out").exists()
