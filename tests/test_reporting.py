"""What a run reports is what it did: the precision actually used, not the one asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate import Accelerator
from tiny_training import train_tiny

from punkdiff.precision import cpu_has_native_bf16
from punkdiff.training.reporting import precision_used

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(("requested", "used"), [("no", "no"), ("fp16", "no"), ("bf16", "bf16")])
def test_precision_used_on_cpu(requested, used):
    """Accelerate turns fp16 autocast off on a CPU (bf16 autocast works there)."""
    assert precision_used(Accelerator(cpu=True, mixed_precision=requested), requested) == used


def test_fp16_on_cpu_says_so_and_records_fp32(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_tiny(Path(mnist_dir), tmp_path / "cache", out, "--max-steps", "2", "--mixed-precision", "fp16") == 0
    assert "--mixed-precision fp16 is not available on cpu: training in no (float32)" in capsys.readouterr().out
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["mixed_precision"] == "no" and summary["config"]["train"]["mixed_precision"] == "fp16"


def test_bf16_on_cpu_runs_natively_or_says_float32(mnist_dir, tmp_path, capsys):
    """The loop asks for bf16 on a CPU only where it is native; the summary records what ran."""
    out = tmp_path / "run"
    assert train_tiny(Path(mnist_dir), tmp_path / "cache", out, "--max-steps", "2", "--mixed-precision", "bf16") == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"]["train"]["mixed_precision"] == "bf16"
    if cpu_has_native_bf16():
        assert summary["mixed_precision"] == "bf16" and "warning: --mixed-precision" not in capsys.readouterr().out
    else:
        assert summary["mixed_precision"] == "no" and "this CPU has no native bf16" in capsys.readouterr().out
