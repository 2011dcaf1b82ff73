"""Export, model card, every load route, refusal of bad folders, and push at the HTTP boundary."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, DiffusionPipeline
from fake_hub import fake_hub
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_models import tiny_pipeline, tiny_unet

from punkdiff import PunkDiffPipeline
from punkdiff.hub import (
    LOCAL_MODEL_REF,
    ModelCardInfo,
    ModelFolderError,
    export_pipeline,
    load_pipeline,
    push_to_hub,
    render_model_card,
    update_model_card,
    write_model_card,
)
from punkdiff.pipelines import punkdiff_pipeline

EXPORTED_FILES = {
    "README.md",
    "model_index.json",
    "pipeline.py",
    "sampling.json",
    "samples.png",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}
CARD = ModelCardInfo(
    preset="mnist", dataset="ylecun/mnist", training_steps=1234, license="cc-by-sa-3.0", metrics={"FID": 12.3456}
)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(channels=1)


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory) -> Path:
    grid = PIL.Image.new("L", (16, 16), color=128)
    return export_pipeline(
        unet, DDPMScheduler(), tmp_path_factory.mktemp("export") / "model", card=CARD, sample_grid=grid
    )


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    """A private copy of the export that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "model"))


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_export_is_safetensors_only_with_stock_metadata(exported, unet):
    assert files_in(exported) == EXPORTED_FILES
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    weights = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == unet.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    assert (exported / "pipeline.py").read_bytes() == Path(punkdiff_pipeline.__file__).read_bytes()
    assert not list(exported.parent.glob(".*"))  # no staging or backup folders left behind


def test_model_card_metadata_and_content(exported):
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "cc-by-sa-3.0" and card.data.datasets == ["ylecun/mnist"]
    assert {"diffusers", "ddpm", "punkdiff"} <= set(card.data.tags)
    for expected in ("![Samples](samples.png)", "`mnist`", "1234", "8x8, 1 channel", "| FID | 12.35 |"):
        assert expected in card.text
    assert "DDPMPipeline.from_pretrained" in card.text and "trust_remote_code=True" in card.text
    (result,) = card.data.eval_results  # the metrics in the YAML model-index too
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("FID", 12.3456, "ylecun/mnist")

    info = ModelCardInfo(dataset="sklearn-digits", resolution=64, channels=3, num_train_timesteps=1000)
    bare = ModelCard(render_model_card(info))
    assert "Not measured yet." in bare.text and "samples.png" not in bare.text and bare.data.eval_results is None
    assert bare.data.datasets is None and "| Dataset | sklearn-digits |" in bare.text  # not a Hub id: no metadata


def test_the_card_of_a_saved_pipeline_reads_what_info_leaves_out_from_its_configs(tmp_path):
    """`write_model_card` completes any `save_pretrained` folder, as `export_pipeline` does its own."""
    tiny_pipeline(channels=3).save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
    card = ModelCard.load(write_model_card(tmp_path / "plain"))
    assert card.data.library_name == "diffusers" and "punkdiff" in card.data.tags
    assert "8x8 RGB images" in card.text and "`DDPMScheduler`, 1000 steps" in card.text
    tiny_pipeline(channels=3).save_pretrained(tmp_path / "named")
    named = write_model_card(tmp_path / "named", {"preset": "punks-24", "dataset": "huggingnft/cryptopunks"})
    assert ModelCard.load(named).data.datasets == ["huggingnft/cryptopunks"] and "`punks-24`" in named.read_text()


def test_update_model_card_without_a_card_or_a_metrics_section(tmp_path):
    folder = export_pipeline(tiny_unet(channels=1), DDPMScheduler(), tmp_path / "model")
    (folder / "README.md").unlink()  # e.g. saved by plain diffusers: a card is written
    update_model_card(folder, {"swd": 12.5}, "/data/local/mnist")
    (result,) = ModelCard.load(folder / "README.md").data.eval_results
    assert (result.metric_name, result.metric_value, result.dataset_name) == ("swd", 12.5, "mnist")  # no local path
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My model\n\nMine.\n")  # a card of one's own
    update_model_card(folder, {"swd": 11.0, "fid": "not computed: weights unavailable"}, "ylecun/mnist")
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.text.startswith("\n# My model\n\nMine.")
    assert "## Metrics" in card.text and "| swd | 11 |" in card.text and "| fid | not computed" in card.text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("swd", 11.0)]


@pytest.mark.parametrize(
    "load",
    [
        DDPMPipeline.from_pretrained,
        DDIMPipeline.from_pretrained,
        DiffusionPipeline.from_pretrained,
        PunkDiffPipeline.from_pretrained,
        load_pipeline,
    ],
    ids=["DDPMPipeline", "DDIMPipeline", "DiffusionPipeline", "PunkDiffPipeline", "load_pipeline"],
)
def test_every_stock_and_punkdiff_load_route_makes_images(exported, load):
    pipe = load(exported)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert isinstance(pipe, PunkDiffPipeline) == (load in (PunkDiffPipeline.from_pretrained, load_pipeline))


def test_custom_pipeline_needs_explicit_trust(exported):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(exported, custom_pipeline=str(exported))


def test_custom_pipeline_route_works_without_punkdiff(exported, tmp_path):
    """A Hub user's view: punkdiff cannot be imported, the class comes from the exported pipeline.py."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class HidePunkdiff(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "punkdiff":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, HidePunkdiff())
        try:
            import punkdiff
            raise SystemExit("punkdiff is importable")
        except ModuleNotFoundError:
            pass
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=3, sampler="ddim", output_type="np").images
        recon = pipe.reconstruct(images, 5, num_inference_steps=3, sampler="ddim", output_type="np").images
        print(type(pipe).__name__, type(pipe).__module__, images.shape, recon.shape)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(exported)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, module, *shapes = result.stdout.split()
    assert name == "PunkDiffPipeline" and module.startswith("diffusers_modules.")
    assert shapes == ["(2,", "8,", "8,", "1)", "(2,", "8,", "8,", "1)"]


def test_reexport_replaces_only_complete_exports(exported, unet, tmp_path):
    target = Path(shutil.copytree(exported, tmp_path / "model"))
    before = {name: (target / name).read_bytes() for name in files_in(target)}

    class BrokenImage:
        def save(self, path):
            Path(path).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_pipeline(unet, DDPMScheduler(), target, card={"preset": "other"}, sample_grid=BrokenImage())
    assert {name: (target / name).read_bytes() for name in files_in(target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    export_pipeline(unet, DDPMScheduler(), target, card={"preset": "other"})
    assert files_in(target) == EXPORTED_FILES - {"samples.png"} and "`other`" in (target / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    not_an_export = tmp_path / "run"
    (not_an_export / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a model export"):
        export_pipeline(unet, DDPMScheduler(), not_an_export)
    assert (not_an_export / "checkpoints").is_dir()


class WritesMarker:
    """Unpickling this runs `open(marker, "w")`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _missing_weights(folder: Path) -> None:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def _truncated_weights(folder: Path) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _config_mismatch(folder: Path) -> None:
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 32]
    config_path.write_text(json.dumps(config))


def _missing_index(folder: Path) -> None:
    (folder / "model_index.json").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_missing_weights, "Missing weights"),
        (_truncated_weights, "not a readable safetensors file"),
        (_config_mismatch, r"does not match .*config says"),
        (_missing_index, "Missing .*model_index.json"),
    ],
)
def test_bad_folders_are_refused_with_a_clear_error(folder, damage, message):
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        load_pipeline(folder)
    with fake_hub() as hub, pytest.raises(ModelFolderError, match=message):
        push_to_hub(folder, "user/model")
    assert hub.requests == []


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(exported, folder, tmp_path):
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(WritesMarker(armed)))
    assert armed.exists()  # the payload really does run code when unpickled

    marker = tmp_path / "executed"
    _missing_weights(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(ModelFolderError, match=r"only pickle checkpoints \(unet/diffusion_pytorch_model.bin\)"):
        load_pipeline(folder)
    with pytest.raises(ModelFolderError, match="safe_serialization=True"):
        load_pipeline(folder)
    assert not marker.exists()

    shutil.copyfile(
        exported / "unet" / "diffusion_pytorch_model.safetensors",
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    assert isinstance(load_pipeline(folder), PunkDiffPipeline)  # with safetensors present, the .bin is ignored
    assert not marker.exists()


def test_push_uploads_exactly_the_export_with_the_login_token(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", "hf_punkdiff_test_token")
    with fake_hub() as hub:
        url = push_to_hub(exported, "someone/mnist-ddpm", private=True)
    assert url == "https://huggingface.co/someone/mnist-ddpm"
    [created] = hub.created
    assert created["organization"] == "someone" and created["name"] == "mnist-ddpm"
    assert created.get("visibility") == "private" or created.get("private") is True  # wire format varies by version
    assert set(hub.uploaded) == EXPORTED_FILES
    assert (
        hub.uploaded["unet/diffusion_pytorch_model.safetensors"]
        == (exported / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    card = ModelCard(hub.uploaded["README.md"].decode())
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert {r.headers.get("authorization") for r in hub.requests if r.url.path.startswith("/api/repos")} == {
        "Bearer hf_punkdiff_test_token"
    }
    written = [p for p in [*tmp_path.rglob("*"), *exported.rglob("*")] if p.is_file()]
    assert not any(b"hf_punkdiff_test_token" in p.read_bytes() for p in written)


def test_pushed_card_names_the_repo_in_one_commit_and_the_local_card_is_unchanged(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    local_readme = (exported / "README.md").read_bytes()
    assert local_readme.count(f'"{LOCAL_MODEL_REF}"'.encode()) == 3  # the export is for a local folder
    with fake_hub() as hub:
        push_to_hub(exported, "someone/mnist-ddpm")
    assert set(hub.uploaded) == files_in(exported) == EXPORTED_FILES
    assert [c["summary"] for c in hub.commits] == ["Upload punkdiff model"]  # weights and card together
    readme = hub.uploaded["README.md"].decode()
    assert LOCAL_MODEL_REF not in readme
    assert 'DDPMPipeline.from_pretrained("someone/mnist-ddpm")' in readme
    assert '"someone/mnist-ddpm", custom_pipeline="someone/mnist-ddpm", trust_remote_code=True' in readme
    assert readme == local_readme.decode().replace(LOCAL_MODEL_REF, "someone/mnist-ddpm")  # nothing else changed
    card = ModelCard(readme)
    assert card.data.library_name == "diffusers" and card.data.license == "cc-by-sa-3.0"
    assert (exported / "README.md").read_bytes() == local_readme
    for name in EXPORTED_FILES - {"README.md"}:
        assert hub.uploaded[name] == (exported / name).read_bytes(), name


def test_training_output_folder_points_to_its_pipeline(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported, run / "pipeline")
    with pytest.raises(ModelFolderError, match=f"did you mean {re.escape(str(run / 'pipeline'))}\\?"):
        load_pipeline(run)
    with fake_hub() as hub, pytest.raises(ModelFolderError, match="did you mean"):
        push_to_hub(run, "user/model")
    assert hub.requests == []


def test_push_refuses_folders_with_pickles(folder):
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even read")
    with fake_hub() as hub, pytest.raises(ModelFolderError, match="remove them before pushing"):
        push_to_hub(folder, "user/model")
    assert hub.requests == []


def test_grayscale_export_round_trips_images(exported):
    pipe = load_pipeline(exported)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(generator=torch.Generator().manual_seed(0), sampler="ddim", num_inference_steps=3).images[0]
    assert image.mode == "L" and np.asarray(image).shape == (8, 8)


def test_a_hub_id_downloads_only_configs_weights_card_and_samples(exported, tmp_path, monkeypatch):
    from punkdiff.hub import model_folder

    repo = Path(shutil.copytree(exported, tmp_path / "repo"))
    marker = tmp_path / "unpickled"
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    with fake_hub(monkeypatch, models={"someone/tiny": repo}) as hub:
        local = model_folder("someone/tiny")
        pipe = load_pipeline("someone/tiny")
    assert files_in(local) == EXPORTED_FILES - {"pipeline.py"}  # no pickle, no code
    fetched = {r.url.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.url.path}
    assert "diffusion_pytorch_model.bin" not in fetched and "pipeline.py" not in fetched
    assert isinstance(pipe, PunkDiffPipeline) and not marker.exists()
    original = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in original.items())


def test_an_unreachable_hub_id_says_what_to_pass_instead(tmp_path, monkeypatch):
    from punkdiff.hub import model_folder

    monkeypatch.chdir(tmp_path)  # no local folder of that name
    with pytest.raises(ModelFolderError, match="not a local folder, and the Hub model 'someone/absent' could not"):
        model_folder("someone/absent")  # HF_HUB_OFFLINE=1 in the test suite
    with pytest.raises(ModelFolderError, match="is not a folder"):
        model_folder("not/a/repo/id/either")


# --- hostile model folders: refused by the folder check, nothing from them executed -----------------------------


def _edit_json(relative: str, edit):
    def damage(folder: Path) -> None:
        path = folder / relative
        data = json.loads(path.read_text())
        path.write_text(json.dumps(edit(data)))

    return damage


def _set(key, value):
    return lambda data: {**data, key: value}


def _weights(transform):
    from safetensors.torch import save_file

    def damage(folder: Path) -> None:
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({k: transform(v) for k, v in load_file(path).items()}, path)

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_edit_json("model_index.json", lambda d: [d]), "must hold a JSON object"),
        (_edit_json("model_index.json", _set("unet", [])), "must list `unet`"),
        (_edit_json("model_index.json", _set("unet", 5)), "must list `unet`"),
        (_edit_json("model_index.json", _set("scheduler", None)), "must list `unet`"),
        (_edit_json("model_index.json", _set("unet", ["evil_lib", "UNet2DModel"])), "must list `unet`"),
        (_edit_json("model_index.json", _set("unet", ["../../tmp/evil", "UNet2DModel"])), "must list `unet`"),
        (_edit_json("model_index.json", _set("scheduler", ["diffusers", "StableDiffusionPipeline"])), "must list"),
        (_edit_json("model_index.json", _set("_class_name", "StableDiffusionPipeline")), "names the pipeline class"),
        (_edit_json("model_index.json", _set("text_encoder", ["transformers", "CLIPTextModel"])), "text_encoder"),
        (_edit_json("unet/config.json", _set("sample_size", 100000)), "sample_size must be an integer"),
        (_edit_json("unet/config.json", _set("sample_size", -8)), "sample_size must be an integer"),
        (_edit_json("unet/config.json", _set("sample_size", "8")), "sample_size must be an integer"),
        (_edit_json("unet/config.json", _set("sample_size", 1)), "sample_size 1 must be a multiple of"),  # hypothesis
        (_edit_json("unet/config.json", _set("sample_size", [8, 3])), r"sample_size \[8, 3\] must be a multiple"),
        (_edit_json("unet/config.json", _set("in_channels", None)), "in_channels must be an integer"),
        (_edit_json("unet/config.json", _set("block_out_channels", "wide")), "block_out_channels must be"),
        (_edit_json("unet/config.json", _set("norm_num_groups", True)), "norm_num_groups must be"),  # hypothesis
        (_edit_json("unet/config.json", _set("norm_num_groups", 3)), "norm_num_groups 3 must divide"),
        (_edit_json("unet/config.json", _set("layers_per_block", False)), "layers_per_block must be"),
        (_edit_json("scheduler/scheduler_config.json", _set("num_train_timesteps", 10**10)), "num_train_timesteps"),
        (_edit_json("scheduler/scheduler_config.json", _set("num_train_timesteps", 0)), "num_train_timesteps"),
        (_edit_json("scheduler/scheduler_config.json", _set("beta_schedule", "sigmoidal")), "beta_schedule"),
        (_edit_json("scheduler/scheduler_config.json", _set("prediction_type", "noise")), "prediction_type"),
        (_edit_json("scheduler/scheduler_config.json", _set("beta_end", "0.02")), "beta_end"),
        (_edit_json("scheduler/scheduler_config.json", lambda d: None), "must hold a JSON object"),
        (lambda f: (f / "palette.json").write_text('{"colors": ["#zz0000"]}'), "is not a palette"),
        (lambda f: (f / "palette.json").write_text('["#000000"]'), "is not a palette"),
        (lambda f: (f / "palette.json").write_text('{"colors": ["#00", "#000000"]}'), "is not a palette"),
        (lambda f: (f / "palette.json").write_text('{"colors": ["#0000"]}'), "2 channels; the UNet has"),
        (_weights(lambda v: torch.full_like(v, float("nan"))), "NaN or infinite"),
        (_weights(lambda v: v.to(torch.int8)), "not floating point"),
        (_weights(lambda v: v[..., :1].contiguous() if v.ndim else v), "does not match"),
    ],
)
def test_hostile_model_folders_are_refused_by_the_folder_check(folder, damage, message):
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        load_pipeline(folder)


def test_pickle_named_safetensors_and_pipeline_py_never_run(folder, tmp_path):
    """A pickle disguised as safetensors, and a pipeline.py that writes a marker on import: neither ever runs."""
    marker = tmp_path / "executed"
    (folder / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert isinstance(load_pipeline(folder), PunkDiffPipeline)
    assert isinstance(DiffusionPipeline.from_pretrained(folder), DDPMPipeline)  # the stock route ignores pipeline.py
    assert not marker.exists()

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(ModelFolderError, match="not a readable safetensors file"):
        load_pipeline(folder)
    assert not marker.exists()


@pytest.fixture(scope="module")
def fuzz_folder(exported, tmp_path_factory) -> Path:
    return Path(shutil.copytree(exported, tmp_path_factory.mktemp("fuzz") / "model"))


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.integers(-2, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["UNet2DModel", "diffusers", "DDIMScheduler", "../x", "linear", "epsilon", "sample"]),
    st.lists(st.one_of(st.integers(-2, 40), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_JSON_FILES = ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_JSON_FILES), st.text(max_size=3) | st.sampled_from([
    "_class_name", "unet", "scheduler", "sample_size", "in_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "num_train_timesteps", "beta_schedule", "prediction_type", "beta_start", "clip_sample",
]), _JSON_VALUES), min_size=1, max_size=3))
def test_fuzzed_model_configs_are_refused_or_sample_finite_images(exported, fuzz_folder, edits):
    """Any field of any config set to anything: a ModelFolderError, or a pipeline that samples finite images."""
    for name in _JSON_FILES:
        shutil.copyfile(exported / name, fuzz_folder / name)
    for name, key, value in edits:
        path = fuzz_folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    try:
        pipe = load_pipeline(fuzz_folder)
    except ModelFolderError as err:  # names the file and what to do about it
        assert str(fuzz_folder) in str(err), str(err)
        assert re.search(r"re-export|remove|delete|use a model folder|pass a folder|re-download", str(err), re.I), err
        return
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(images.images).all()


def test_card_names_a_local_dataset_without_its_machine_path(tmp_path):
    data = tmp_path / "secret-home" / "my-faces"
    data.mkdir(parents=True)
    card = render_model_card(ModelCardInfo(preset="celeba-64", dataset=str(data)))
    assert "my-faces" in card and "secret-home" not in card and str(tmp_path) not in card
    assert "huggingface.co/datasets/ylecun/mnist" in render_model_card(ModelCardInfo(dataset="ylecun/mnist"))


# --- sampling.json: how the model is meant to be sampled --------------------------------------------------------


def test_an_export_recommends_how_to_sample_it_and_loads_with_it(exported, unet, tmp_path):
    from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig
    from punkdiff.presets import RECOMMENDED_SAMPLING

    assert json.loads((exported / "sampling.json").read_text()) == RECOMMENDED_SAMPLING == {
        "sampler": "ddim", "num_inference_steps": 50, "eta": 1.0}  # what measured best (docs/results.md)
    assert load_pipeline(exported).sampling_config == SamplingConfig("ddim", 50, 1.0)
    student = {"sampler": "ddim-trailing", "num_inference_steps": 4, "eta": 0.0, "distilled_steps": 4}
    folder = export_pipeline(unet, DDPMScheduler(), tmp_path / "student", sampling=student)
    assert json.loads((folder / "sampling.json").read_text()) == student
    assert load_pipeline(folder).sampling_config == SamplingConfig("ddim-trailing", 4, 0.0, 4)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"


def test_a_folder_without_sampling_json_still_loads(folder):
    (folder / "sampling.json").unlink()
    assert load_pipeline(folder).sampling_config is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "sampling.json is not a usable sampling recommendation"),
        ('{"sampler": "euler", "num_inference_steps": 50}', "sampler must be one of ddpm, ddim, ddim-trailing"),
        ('{"sampler": "ddim", "num_inference_steps": "50"}', "num_inference_steps must be a positive integer"),
        ('{"sampler": "ddim", "num_inference_steps": 50, "eta": 2}', r"eta must be a number in \[0, 1\], got 2"),
        ('{"sampler": "ddim", "num_inference_steps": 5000}', "num_inference_steps 5000, more than the model's 1000"),
        ('{"sampler": "ddim", "num_inference_steps": 4, "distilled_steps": 1001}', "distilled_steps 1001, more"),
        ('{"sampler": "ddim", "num_inference_steps": 4, "stepz": 4}', "unknown key 'stepz'"),
    ],
)
def test_a_bad_sampling_json_is_refused_by_the_folder_check(folder, content, message):
    (folder / "sampling.json").write_text(content)
    with pytest.raises(ModelFolderError, match=message) as err:
        load_pipeline(folder)
    assert "fix or delete it" in str(err.value)
