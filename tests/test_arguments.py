"""Flags: every hostile value from the probe is refused before any data loads, with the flag named."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
        (["--cache-budget", "inf"], r"--cache-budget must be a size in GB, 0 or more \(got inf\)"),
        (["--cache-budget", "nan"], r"--cache-budget must be a size in GB, 0 or more \(got nan\)"),
        (["--cache-budget", "-1"], r"--cache-budget must be a size in GB, 0 or more \(got -1.0\)"),
    ],
)
def test_hostile_flags_are_refused_before_any_data_loads(tmp_path, capsys, extra, message):
    # the dataset does not exist: reaching the data stage would fail with another message
    assert train_main(tiny_args(tmp_path / "missing", tmp_path / "cache", tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


_TRAIN_FLAGS = ["--max-steps", "--epochs", "--batch-size", "--learning-rate", "--lr-warmup-steps",
                "--gradient-accumulation-steps", "--mixed-precision", "--prediction-type", "--snr-gamma",
                "--checkpoint-every", "--checkpoints-total-limit", "--sample-every", "--seed", "--max-train-samples",
                "--resume-from-checkpoint", "--report-to", "--data-on-device", "--preset", "--split", "--cache-budget"]
_VALUES = st.one_of(
    st.integers(-3, 10).map(str), st.integers(-(2**70), 2**70).map(str), st.floats().map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e-4", "latest", "fp16", "v_prediction", "none", "punks-24", ""]),
    st.text(max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(flags=st.lists(st.tuples(st.sampled_from(_TRAIN_FLAGS), _VALUES), max_size=4),
       sets=st.lists(st.text(max_size=20), max_size=2))
def test_fuzzed_train_flags_end_in_a_message(tmp_path_factory, flags, sets):
    """Any flag values: refused with exit 2 and a message (the data does not exist, so nothing trains)."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("fuzz")
    argv = tiny_args(root / "missing", root / "cache", root / "out")
    argv += [item for flag, value in flags for item in (flag, value)]
    argv += [item for text in sets for item in ("--set", text)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train_main(argv)
    except SystemExit as exit_info:  # argparse: the usage line and the bad flag
        assert exit_info.code == 2 and "error: argument" in err.getvalue()
        return
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert code == 2 and "error: " in out.getvalue() + err.getvalue()
