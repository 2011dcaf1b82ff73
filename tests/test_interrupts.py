"""Ctrl-C (SIGINT to the process group, as a terminal sends it) during `punkdiff sample`, `eval` and `train`: one
line saying what was kept, exit status 130, never a traceback."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusers import DDPMScheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_unet
from tiny_training import tiny_args

from punkdiff.cli import main
from punkdiff.hub import export_pipeline
from punkdiff.interrupts import INTERRUPTED, exit_on_interrupt, written_since

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path_factory.mktemp("m") / "m")


def interrupt(argv: list[str], log: Path, when, timeout: float = 180) -> tuple[int, str]:
    """Start `punkdiff argv`, wait until `when(log text)` holds, SIGINT its process group; (exit status, output)."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "punkdiff.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                   env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and not when(log.read_text(errors="replace")):
            time.sleep(0.05)
        assert process.poll() is None, f"ended before the interrupt: {log.read_text()[-2000:]}"
        os.killpg(process.pid, signal.SIGINT)
        return process.wait(120), log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_ctrl_c_during_sample_says_nothing_was_written_and_exits_130(model_dir, tmp_path):
    argv = ["sample", str(model_dir), "--scheduler", "ddpm", "--num-images", "64", "--out", str(tmp_path / "g.png"),
            "--device", "cpu"]
    code, text = interrupt(argv, tmp_path / "log", lambda t: "%|" in t)  # the progress bar: sampling has begun
    assert code == INTERRUPTED
    assert "punkdiff sample: interrupted (Ctrl-C); nothing was written" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not (tmp_path / "g.png").exists()


def test_ctrl_c_during_eval_exits_130_without_a_traceback(model_dir, mnist_dir, metrics_cache, tmp_path):
    argv = ["eval", str(model_dir), "--reference", str(mnist_dir), "--preset", "mnist-baseline-16", "--cache-dir",
            str(metrics_cache), "--num-samples", "2000", "--scheduler", "ddpm", "--steps", "1000",
            "--out", str(tmp_path / "eval"), "--device", "cpu"]
    code, text = interrupt(argv, tmp_path / "log", lambda t: "%|" in t)
    assert code == INTERRUPTED
    assert "punkdiff eval: interrupted (Ctrl-C); " in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def test_ctrl_c_during_train_names_the_last_checkpoint(mnist_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *tiny_args(mnist_dir, cache_dir, out, "--max-steps", "100000", "--checkpoint-every", "2")]
    code, text = interrupt(argv, tmp_path / "log", lambda t: (out / "checkpoints" / "checkpoint-2").is_dir())
    assert code == INTERRUPTED
    assert "punkdiff train: interrupted (Ctrl-C); the last good checkpoint " in text
    assert "continue with --resume-from-checkpoint latest" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def test_written_since_lists_only_this_commands_files(tmp_path):
    old = tmp_path / "old.png"
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert written_since([old, None, tmp_path / "missing"], time.time() - 60) == "nothing was written"
    (tmp_path / "out").mkdir()
    for i in range(5):
        (tmp_path / "out" / f"{i:04d}.png").write_bytes(b"x")
    said = written_since([old, tmp_path / "out"], time.time() - 60)
    assert said.startswith(f"kept what was written: {tmp_path / 'out' / '0000.png'}") and "and 2 more" in said


def test_a_second_ctrl_c_while_reporting_is_ignored(capsys):
    previous = signal.getsignal(signal.SIGINT)

    def kept() -> str:
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the message is written
        return "the grid so far"

    def work() -> int:
        raise KeyboardInterrupt

    assert exit_on_interrupt(work, "punkdiff sample", kept) == INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is previous  # Ctrl-C works again for whatever runs next
    assert capsys.readouterr().err == "punkdiff sample: interrupted (Ctrl-C); the grid so far\n"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delay=st.floats(0.01, 1.0))
def test_ctrl_c_at_any_moment_of_a_sample_run_is_130_never_a_traceback(model_dir, tmp_path, delay):
    """SIGINT from an interval timer at a random moment of an in-process `punkdiff sample` (parsing, loading,
    sampling, writing)."""
    out = tmp_path / f"g-{delay}.png"
    argv = ["sample", str(model_dir), "--scheduler", "ddpm", "--steps", "100", "--num-images", "4", "--out", str(out),
            "--out-dir", str(tmp_path / f"images-{delay}"), "--device", "cpu"]
    previous = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    err = io.StringIO()
    code = None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            signal.setitimer(signal.ITIMER_REAL, delay)
            code = main(argv)
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:  # the timer fired after the command had returned: not the command's to handle
        assert code == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert code in (0, INTERRUPTED)
    assert "Traceback" not in err.getvalue()
    if code == INTERRUPTED:
        assert "\npunkdiff sample: interrupted (Ctrl-C); " in "\n" + err.getvalue()  # after any progress bar
        assert ("nothing was written" in err.getvalue()) == (not out.exists())
    else:
        assert out.is_file()
