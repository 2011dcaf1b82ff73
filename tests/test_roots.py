"""Path confinement: everything the app opens resolves, symlinks followed, inside the roots it was started with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

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
    with pytest.raises(PathOutsideRoots):
        roots.resolve(tmp_path / "outside", "models")


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


def test_a_model_whose_files_link_out_of_the_roots_is_refused(roots, tmp_path):
    """Only the folder was checked before: a weight file, config or run summary linked from elsewhere is refused."""
    model = tmp_path / "models" / "a" / "pipeline"
    (model / "unet").mkdir()
    secret = tmp_path / "outside" / "secret" / "weights.safetensors"
    secret.write_bytes(b"not read")
    (model / "unet" / "config.json").write_text("{}")
    (tmp_path / "models" / "shared.json").write_text("{}")
    os.symlink(tmp_path / "models" / "shared.json", model / "scheduler.json")  # a link inside the roots is fine
    assert roots.check_model(roots.resolve("a/pipeline", "models")) == model.resolve()

    os.symlink(secret, model / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(PathOutsideRoots) as err:
        roots.check_model(roots.resolve("a/pipeline", "models"))
    assert "diffusion_pytorch_model.safetensors" in str(err.value) and str(secret) in str(err.value)
    assert "outside the model folders" in str(err.value) and "--model-root" in str(err.value)

    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    os.symlink(tmp_path / "outside" / "secret" / "key.txt", model.parent / "training_summary.json")
    with pytest.raises(PathOutsideRoots, match="training_summary.json"):
        roots.check_model(model)


def test_a_dataset_with_an_image_linked_from_outside_is_refused(roots, tmp_path):
    images = tmp_path / "data" / "mnist"
    (images / "0.png").write_bytes(b"png")
    (images / "nested").mkdir()
    os.symlink(images, images / "nested" / "loop")  # a loop inside the roots ends, and is allowed
    assert resolve_dataset(roots, "mnist") == str(images.resolve())
    os.symlink(tmp_path / "outside" / "secret" / "key.txt", images / "nested" / "1.png")
    with pytest.raises(PathOutsideRoots, match=r"nested/1\.png leads to .*key\.txt, outside the data folders"):
        resolve_dataset(roots, "mnist")


_LINK_TARGETS = {  # name -> (target relative to tmp_path, leads outside the data roots)
    "inside file": ("data/other/0.png", False), "inside folder": ("data/other", False),
    "the dataset itself": ("data/ds", False), "dangling inside": ("data/missing.png", False),
    "outside file": ("outside/secret/key.txt", True), "outside folder": ("outside/secret", True),
    "dangling outside": ("outside/missing.png", True), "folder with a link out": ("data/dirty", True),
    "parent of the roots": (".", True),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(links=st.lists(st.tuples(st.sampled_from(["", "a", "a/b"]), st.sampled_from(sorted(_LINK_TARGETS)),
                                st.booleans()), max_size=4))
def test_generated_links_inside_a_dataset_are_refused_exactly_when_one_leads_out(tmp_path_factory, links):
    """Links in any folder of a dataset, to files, folders, loops, other links or nothing: refused iff one of them
    (or a folder it leads to) reaches outside the data roots, and the message names that link."""
    base = tmp_path_factory.mktemp("links")
    for name in ("data/ds/a/b", "data/other", "data/dirty", "outside/secret", "runs"):
        (base / name).mkdir(parents=True)
    (base / "data/other/0.png").write_bytes(b"png")
    (base / "outside/secret/key.txt").write_text("no")
    os.symlink(base / "outside/secret/key.txt", base / "data/dirty/1.png")
    roots = Roots(data=[base / "data"], runs=base / "runs")
    outside = []
    for i, (where, target, relative) in enumerate(links):
        destination, leads_out = _LINK_TARGETS[target]
        link = base / "data/ds" / where / f"link{i}"
        os.symlink(os.path.relpath(base / destination, link.parent) if relative else base / destination, link)
        if leads_out:
            outside.append(link)
    if not outside:
        assert resolve_dataset(roots, "ds") == str((base / "data/ds").resolve())
        event("accepted: every link stays inside")
        return
    event("refused: a link leads out")
    with pytest.raises(PathOutsideRoots) as err:
        resolve_dataset(roots, "ds")
    assert "outside the data folders" in str(err.value)
    assert any(str(link) in str(err.value) for link in outside) or "dirty" in str(err.value)
