"""Background jobs: real child processes (plain Python, no torch) started, watched, failed and stopped."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import psutil

from punkdiff.jobs import JOB_FILE, Job


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_finished_job_records_its_exit_and_its_log(tmp_path):
    job = Job.launch(tmp_path / "j", python("import sys; print('hello'); print('progress 1\\rprogress 2')"), "out.log",
                     meta={"request": {"x": 1}})
    wait_for(lambda: job.status() == "finished")
    launch = job.latest()
    assert launch["returncode"] == 0 and launch["meta"] == {"request": {"x": 1}}
    assert launch["ended"] >= launch["started"]
    tail = job.log_tail()
    assert tail.splitlines()[-2:] == ["hello", "progress 2"]  # a progress bar shows its last state
    assert job.error_message() is None


def test_a_failed_job_shows_the_error_it_printed(tmp_path):
    job = Job.launch(tmp_path / "j", python("""
        import sys
        print('loading...')
        print('error: dataset folder is empty: add images', file=sys.stderr)
        sys.exit(2)
    """), "out.log")
    wait_for(lambda: job.status() == "failed")
    assert job.latest()["returncode"] == 2
    assert job.error_message() == "error: dataset folder is empty: add images"
    crash = Job.launch(tmp_path / "k", python("raise KeyError('boom')"), "out.log")
    wait_for(lambda: crash.status() == "failed")
    assert crash.error_message() == "KeyError: 'boom'"
    cli = Job.launch(tmp_path / "l", python("""
        import sys
        print("punkdiff eval: dataset 'd' has no split 'test'; available splits: train", file=sys.stderr)
        sys.exit(2)
    """), "out.log")
    wait_for(lambda: cli.status() == "failed")
    assert cli.error_message() == "punkdiff eval: dataset 'd' has no split 'test'; available splits: train"


def test_stop_sends_sigterm_to_the_whole_group_and_waits(tmp_path):
    # the leader starts a grandchild; both write a file when SIGTERM reaches them, as a checkpointing loop would
    worker = """
        import signal, sys, time, pathlib
        def bye(*_):
            pathlib.Path(sys.argv[1]).write_text('saved'); sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print('ready', flush=True)
        while True: time.sleep(0.05)
    """
    (tmp_path / "worker.py").write_text(textwrap.dedent(worker))
    leader = f"""
        import subprocess, sys, signal, time, pathlib
        child = subprocess.Popen([sys.executable, {str(tmp_path / 'worker.py')!r}, {str(tmp_path / 'child.txt')!r}])
        def bye(*_):
            child.wait(); pathlib.Path({str(tmp_path / 'leader.txt')!r}).write_text('saved'); sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        while True: time.sleep(0.05)
    """
    job = Job.launch(tmp_path / "j", python(leader), "out.log")
    wait_for(lambda: job.log_tail().endswith("\nready"))
    assert job.status() == "running" and job.is_running()
    assert job.stop(timeout=30) == "stopped"
    assert (tmp_path / "child.txt").read_text() == "saved" and (tmp_path / "leader.txt").read_text() == "saved"
    assert not job.is_running()


def test_stop_kills_a_job_that_ignores_sigterm(tmp_path):
    job = Job.launch(tmp_path / "j", python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        while True: time.sleep(0.05)
    """), "out.log")
    wait_for(lambda: job.log_tail().endswith("\nready"))
    started = time.time()
    assert job.stop(timeout=1.0) == "stopped"
    assert 1.0 <= time.time() - started < 20
    assert not job.is_running() and job.latest()["returncode"] == -9  # SIGKILL


def test_a_job_found_after_a_restart(tmp_path):
    """A new `Job` object (a restarted app) reads the state from the folder; a pid reused by another process,
    or one that vanished without a recorded exit, is not taken for the job."""
    folder = tmp_path / "j"
    folder.mkdir()
    me = psutil.Process()
    record = {"argv": ["x"], "log": "out.log", "pid": me.pid, "create_time": me.create_time() - 100,
              "started": time.time(), "ended": None, "returncode": None, "stop_requested": False, "meta": {}}
    (folder / JOB_FILE).write_text(json.dumps({"launches": [record]}))
    job = Job(folder)
    assert not job.is_running() and job.status() == "lost"  # same pid, another process
    record["create_time"] = me.create_time()
    (folder / JOB_FILE).write_text(json.dumps({"launches": [record]}))
    assert job.is_running() and job.status() == "running"
    assert Job(Path(tmp_path / "never")).status() is None


def test_jobs_end_with_the_process_that_launched_them(tmp_path):
    """A server (here a plain Python process) launches a job that would run for an hour, then exits: the job is
    stopped (SIGTERM, recorded as a stop) by the time the server has exited, and a SIGTERM to the server does too."""
    server = f"""
        import sys, time
        from punkdiff.jobs import Job
        job = Job.launch({str(tmp_path / 'j')!r}, [sys.executable, "-c", "import time; time.sleep(3600)"], "out.log")
        print(job.latest()["pid"], flush=True)
    """
    import subprocess

    done = subprocess.run(python(server), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    job = Job(tmp_path / "j")
    assert job.status() == "stopped" and job.latest()["returncode"] is not None


def test_stop_launched_stops_every_running_job_at_once_and_leaves_finished_ones(tmp_path):
    from punkdiff.jobs import _launched, stop_launched

    sleeper = python("import time; time.sleep(3600)")
    jobs = [Job.launch(tmp_path / f"j{i}", sleeper, "out.log") for i in range(2)]
    done = Job.launch(tmp_path / "done", python("pass"), "out.log")
    wait_for(lambda: done.status() == "finished")
    started = time.time()
    stop_launched(timeout=20)
    assert time.time() - started < 15  # SIGTERM to all at once, not one timeout after another
    assert [j.status() for j in jobs] == ["stopped", "stopped"] and done.status() == "finished"
    _launched.clear()
