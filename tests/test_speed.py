"""Speed settings follow the hardware: bf16 is asked for on a CPU only where the CPU computes it natively."""

from __future__ import annotations

import pytest
import torch

from punkdiff.precision import cpu_has_native_bf16
from punkdiff.presets import TrainSpec
from punkdiff.training.speed import build_optimizer, precision_for


def test_bf16_on_a_cpu_only_where_native():
    precision, why = precision_for("bf16", torch.device("cpu"))
    if cpu_has_native_bf16():
        assert (precision, why) == ("bf16", None)
    else:
        assert precision == "no" and "no native bf16" in why and "float32" in why


@pytest.mark.parametrize("requested", ["no", "fp16"])
def test_other_precisions_pass_through(requested):
    """fp16 on a CPU is Accelerate's to refuse (`reporting.precision_used` reports it); nothing is changed here."""
    assert precision_for(requested, torch.device("cpu")) == (requested, None)


def test_bf16_kept_on_gpus():
    assert precision_for("bf16", torch.device("cuda")) == ("bf16", None)


def test_adamw_is_fused_on_cuda_only():
    net = torch.nn.Linear(2, 2)
    assert build_optimizer(net.parameters(), TrainSpec(), torch.device("cpu")).defaults["fused"] is None
    # the decision only (PyTorch also fuses on CPU since 2.4, so this builds without a GPU)
    assert build_optimizer(net.parameters(), TrainSpec(), torch.device("cuda")).defaults["fused"] is True
