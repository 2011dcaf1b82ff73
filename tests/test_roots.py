"""Path confinement: everything the app opens resolves, symlinks followed, inside the roots it was started with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from punkdiff.roots import ENV_DATA_ROOTS, ENV_MODEL_ROOTS, ENV_RUN_ROOT, PathOutsideRoots, Roots, resolve_dataset


@pytest.fixture
def roots(tmp_path) -> Roots:
    for name in ("models/a/pipeline", "data/mnist", "outside/secret"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "outside" / "secret" / "key.txt").write_text("no")
    return Roots(models=[tmp_path / "models"], data=[tmp_path / "data"], runs=tmp_path / "runs")


def test_relative_and_absolute_paths_inside_resolve(roots, tmp_path):
    assert roots.resolve("a/pipeline", "models") == (tmp_path / "models/a/pipeline").resolve()
    assert roots.resolve(str(tmp_path / "data" / "mnist"), "data") == (tmp_path / "data/mnist").resolve()
    assert roots.resolve("new-run", "runs", must_exist=False) == (tmp_path / "runs/new-run").resolve()
    # the run root is also where models are looked for (a finished run's pipeline/)
    (tmp_path / "runs" / "r1" / "pipeline").mkdir(parents=True)
    assert roots.resolve("r1/pipeline", "models") == (tmp_path / "runs/r1/pipeline").resolve()


@pytest.mark.parametrize(
    "path",
    ["../outside/secret", "mnist/../../outside/secret", "../../../../../../etc", "/etc/passwd", "~/"],
)
def test_escapes_are_refused(roots, path):
    with pytest.raises(PathOutsideRoots, match="outside the data folders"):
        roots.resolve(path, "data")


def test_absolute_path_outside_is_refused_even_if_it_exists(roots, tmp_path):
    with pytest.raises(PathOutsideRoots):
        roots.resolve(str(tmp_path / "outside" / "secret" / "key.txt"), "models")
    assert not roots.contains(tmp_path / "outside", "models")


def test_symlink_out_of_a_root_is_refused_and_not_walked(roots, tmp_path):
    os.symlink(tmp_path / "outside" / "secret", tmp_path / "data" / "link-out")
    os.symlink(tmp_path / "data" / "mnist", tmp_path / "data" / "link-in")
    with pytest.raises(PathOutsideRoots):
        roots.resolve("link-out", "data")
    with pytest.raises(PathOutsideRoots):
        roots.resolve("link-out/key.txt", "data")
    assert roots.resolve("link-in", "data") == (tmp_path / "data" / "mnist").resolve()
    walked = {p.name for p in roots.walk("data", 3)}
    assert "link-out" not in walked and "secret" not in walked and "mnist" in walked


def test_missing_paths_and_missing_roots_say_what_to_do(roots, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist in the data folders"):
        roots.resolve("nope", "data")
    with pytest.raises(FileNotFoundError, match="no data given"):
        roots.resolve("  ", "data")
    bare = Roots(runs=tmp_path / "r2")
    with pytest.raises(PathOutsideRoots, match="started without data folders.*--data-root"):
        bare.resolve("mnist", "data")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Roots(models=[tmp_path / "absent"], runs=tmp_path / "r3")


def test_roots_from_environment(tmp_path, monkeypatch):
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    monkeypatch.setenv(ENV_MODEL_ROOTS, f"{tmp_path / 'm1'}{os.pathsep}{tmp_path / 'm2'}")
    monkeypatch.setenv(ENV_DATA_ROOTS, "")
    monkeypatch.setenv(ENV_RUN_ROOT, str(tmp_path / "runs"))
    roots = Roots.from_env()
    expected = [(tmp_path / name).resolve() for name in ("m1", "m2", "runs")]
    assert roots.of("models") == expected
    assert roots.of("data") == [] and Path(roots.runs).is_dir()


def test_dataset_references(roots, tmp_path):
    assert resolve_dataset(roots, "mnist") == str((tmp_path / "data/mnist").resolve())
    assert resolve_dataset(roots, "sklearn-digits") == "sklearn-digits"  # built in, no path
    assert resolve_dataset(roots, "ylecun/mnist", offline=False) == "ylecun/mnist"
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_dataset(roots, "ylecun/mnist", offline=True)
    with pytest.raises(PathOutsideRoots):
        resolve_dataset(roots, "../outside/secret", offline=False)
    with pytest.raises(PathOutsideRoots):
        resolve_dataset(roots, str(tmp_path / "outside" / "secret"), offline=False)
