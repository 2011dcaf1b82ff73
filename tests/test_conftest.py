"""The dataset-mirror fixtures: a missing mirror skips a test, except where the run says it must have them (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(("required", "outcome"), [(None, "1 skipped"), ("1", "1 error")])
def test_a_missing_mirror_skips_unless_datasets_are_required(tmp_path, required, outcome):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_needs_mnist.py").write_text("def test_it(mnist_dir):\n    assert mnist_dir.is_dir()\n")
    env = {k: v for k, v in os.environ.items() if k != "PUNKDIFF_REQUIRE_DATASETS"}
    env["PUNKDIFF_SHARED_DATASETS"] = str(tmp_path / "no-such-folder")
    if required:
        env["PUNKDIFF_REQUIRE_DATASETS"] = required
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "--rootdir", tmp_path, tmp_path],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert (result.returncode != 0) == bool(required)  # a required mirror that is absent fails the run
    assert f"dataset mirror {tmp_path / 'no-such-folder' / 'mnist'} is absent" in result.stdout
    if required:
        assert "PUNKDIFF_REQUIRE_DATASETS=1" in result.stdout
