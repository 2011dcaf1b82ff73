"""One training run per output folder: the second of two runs started together fails at once and names the first;
the lock a killed run leaves behind is recognised and taken over."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from killable import TrainingProcess
from tiny_training import tiny_args

from punkdiff.training import run_lock


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_two_runs_started_together_the_second_fails_at_once_naming_the_first(mnist_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    argv = tiny_args(mnist_dir, cache_dir, out, "--max-steps", "100000", "--checkpoint-every", "100000")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [TrainingProcess(argv, logs[0]), TrainingProcess(argv, logs[1])]
    try:
        assert _wait_for(lambda: any(r.process.exitcode is not None for r in runs), 60), "neither run was refused"
        loser = next(i for i, r in enumerate(runs) if r.process.exitcode is not None)
        winner = runs[1 - loser]
        assert runs[loser].process.exitcode == 2
        assert winner.process.is_alive()
        text = logs[loser].read_text()
        assert "Traceback" not in text
        assert f"{out.absolute()} is in use by another training run (PID {winner.process.pid} on host " \
               f"{socket.gethostname()}, started " in text
        assert "choose another --output-dir" in text
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
        owner = run_lock.read_owner(out)
        assert owner["pid"] == winner.process.pid

        # the winner is killed (no clean-up runs): the next run finds the stale lock, says so and takes the folder
        winner.signal_group(signal.SIGKILL)
        winner.wait(30)
        assert run_lock.read_owner(out)["pid"] == winner.process.pid  # left behind
        again = TrainingProcess(tiny_args(mnist_dir, cache_dir, out, "--max-steps", "2", "--overwrite-output-dir"),
                                tmp_path / "c.log")
        assert again.wait(300) == 0, (tmp_path / "c.log").read_text()[-3000:]
        text = (tmp_path / "c.log").read_text()
        assert f"was held by a run that ended without releasing it (PID {winner.process.pid} on host " in text
        assert "taking it over" in text
        assert (out / "pipeline" / "model_index.json").is_file()
    finally:
        for r in runs:
            r.signal_group(signal.SIGKILL)


def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_a_live_one_refuses(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / run_lock.INFO_NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "argv": ["train"]}))
    try:
        assert run_lock.claim_output_dir(tmp_path) is None
        assert f"(PID {dead.pid} on host {socket.gethostname()}" in capsys.readouterr().err
        assert run_lock.read_owner(tmp_path)["pid"] == os.getpid()
        # while this process holds it, another process is refused, with this process named
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from punkdiff.training.run_lock import claim_output_dir; "
             f"print(claim_output_dir({str(tmp_path)!r}))"], capture_output=True, text=True, timeout=120)
        assert re.search(rf"in use by another training run \(PID {os.getpid()} on host ", probe.stdout), probe
    finally:
        run_lock._release(tmp_path.absolute())
    assert run_lock.read_owner(tmp_path) is None


@pytest.mark.parametrize("rank", ["1", "3"])
def test_only_the_main_process_claims_the_folder(tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    assert run_lock.claim_output_dir(tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


def test_a_killed_runs_leftover_child_holding_the_lock_is_waited_for(tmp_path, capsys):
    """A run killed with SIGKILL whose forked worker still holds the lock for two seconds: the next claim waits for
    it and takes the folder over, instead of calling the folder in use by a run that is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / run_lock.INFO_NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "argv": ["train"]}))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
        " time.sleep(2)"), str(tmp_path / run_lock.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        asked = time.monotonic()
        assert run_lock.claim_output_dir(tmp_path) is None
        assert time.monotonic() - asked > 1.0  # it waited for the holder to let go, not ran over it
        assert f"(PID {dead.pid} on host {socket.gethostname()}" in capsys.readouterr().err
    finally:
        run_lock._release(tmp_path.absolute())
        holder.wait()
