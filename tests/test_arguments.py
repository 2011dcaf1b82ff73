"""Flags: every hostile value from the probe is refused before any data loads, with the flag named."""

from __future__ import annotations

import re

import pytest
from tiny_training import tiny_args

from punkdiff.scripts.train import main as train_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning-rate", "inf"], "train.learning_rate must be a finite number"),
        (["--learning-rate", "nan"], "train.learning_rate must be a finite number"),
        (["--set", "train.max_grad_norm=nan"], "train.max_grad_norm must be a finite number"),
        (["--set", "train.ema_power=.nan"], "train.ema_power must be a finite number"),
        (["--set", "train.ema_power=nan"], "train.ema_power must be a finite number"),
        (["--seed", "-1"], r"--seed must be in \[0, 4294967295\]"),
        (["--seed", str(2**32)], r"--seed must be in \[0, 4294967295\]"),
        (["--extend-schedule"], "--extend-schedule only applies with --resume-from-checkpoint"),
        (["--set", "model.norm_num_groups=0"], "norm_num_groups must be at least 1"),
        (["--set", "train.num_sample_images=200000"], "num_sample_images must be at most"),
        (["--set", "train.learning_rate=!!python/object/apply:os.system [true]"], "not valid YAML"),
    ],
)
def test_hostile_flags_are_refused_before_any_data_loads(tmp_path, capsys, extra, message):
    # the dataset does not exist: reaching the data stage would fail with another message
    assert train_main(tiny_args(tmp_path / "missing", tmp_path / "cache", tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()
