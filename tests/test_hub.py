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
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_models import PUNKS, punk_pipeline, tiny_pipeline, tiny_unet

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
from punkdiff.presets import PRESETS

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


def run_without_punkdiff(script: str, folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` (with the model folder as `sys.argv[1]`) in a fresh, isolated Python where punkdiff cannot be
    imported: a Hub user's view of an exported model."""
    hide = textwrap.dedent(
        """
        import importlib.abc, sys

        class HidePunkdiff(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "punkdiff":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, HidePunkdiff())
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-I", "-c", hide + script, str(folder)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


def test_custom_pipeline_route_works_without_punkdiff(exported, tmp_path):
    """A Hub user's view: punkdiff cannot be imported, the class comes from the exported pipeline.py."""
    script = textwrap.dedent(
        """
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
    result = run_without_punkdiff(script, exported, tmp_path)
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
        # what the samplers compute from the schedule, not only each field's type
        (_edit_json("scheduler/scheduler_config.json", _set("trained_betas", [float("nan")] * 1000)), "trained_betas"),
        (_edit_json("scheduler/scheduler_config.json", _set("trained_betas", [1.0] * 1000)), "trained_betas"),
        (_edit_json("scheduler/scheduler_config.json", _set("trained_betas", [0.01] * 999)), "trained_betas must"),
        (_edit_json("scheduler/scheduler_config.json", _set("trained_betas", "0.01")), "trained_betas must"),
        (_edit_json("scheduler/scheduler_config.json", lambda d: {**d, "beta_start": 0.5, "beta_end": 0.9}),
         r"alpha_bar .*must lie in \(0, 1\)"),
        (_edit_json("scheduler/scheduler_config.json", lambda d: {**d, "beta_start": 1e-12, "beta_end": 1e-12}),
         r"alpha_bar .*spans \[1, 1\] in float32: the first betas round to 0"),
        (_edit_json("scheduler/scheduler_config.json", _set("trained_betas", [0.01] * 500 + [1e-12] * 500)),
         "alpha_bar must strictly decrease, but steps 499 and 500"),
        (_edit_json("scheduler/scheduler_config.json", lambda d: {**d, "num_train_timesteps": 100_000}),
         r"alpha_bar .*must lie in \(0, 1\)"),
        (_edit_json("scheduler/scheduler_config.json", _set("clip_sample_range", 0)), "clip_sample_range must be"),
        (_edit_json("scheduler/scheduler_config.json", _set("clip_sample_range", float("inf"))), "clip_sample_range"),
        (_edit_json("scheduler/scheduler_config.json", _set("timestep_spacing", "cubic")), "timestep_spacing must"),
        (_edit_json("scheduler/scheduler_config.json", _set("steps_offset", 10**9)), r"steps_offset must .*\[0, 100\)"),
        (_edit_json("scheduler/scheduler_config.json", _set("steps_offset", -1)), "steps_offset must"),
        (_edit_json("scheduler/scheduler_config.json", _set("beta_end", float("nan"))), "beta_end must"),
        (lambda f: (f / "model_index.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda f: (f / "palette.json").write_text('{"colors": ' + "[" * 100_000 + "]" * 100_000 + "}"),
         "is not a palette .*RecursionError"),
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


def _shard(folder: Path, shards: int = 2, *, transform=None, names=None, keep_single: bool = False) -> list[Path]:
    """Split the UNet weights into `shards` safetensors files and an index, as diffusers writes a large model."""
    from safetensors.torch import save_file

    single = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(single)
    names = names or [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    keys = sorted(tensors)
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for i, name in enumerate(names):
        part = {k: tensors[k] for k in keys if weight_map[k] == name}
        if transform is not None and i == len(names) - 1:  # damage only the last shard
            part = {k: transform(v) for k, v in part.items()}
        save_file(part, folder / "unet" / name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    if not keep_single:
        single.unlink()
    return [folder / "unet" / name for name in names]


def test_a_sharded_unet_loads_and_every_shard_is_checked(folder):
    """diffusers prefers the index over the single file, so the index's shards are what the check must read."""
    expected = load_pipeline(folder)(batch_size=1, num_inference_steps=2, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images
    _shard(folder, 3, keep_single=True)
    images = load_pipeline(folder)(batch_size=1, num_inference_steps=2, output_type="np",
                                   generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(images, expected)

    # a NaN last shard, with the good single file still beside the index: refused, naming the shard
    shards = _shard(folder, 2, transform=lambda v: torch.full_like(v, float("nan")), keep_single=True)
    with pytest.raises(ModelFolderError, match=re.escape(shards[-1].name) + ": tensor .* holds NaN or infinite"):
        load_pipeline(folder)


def test_a_sharded_index_naming_a_pickle_shard_is_refused_unopened(folder, tmp_path):
    marker = tmp_path / "executed"
    _shard(folder, 2)
    index_path = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    (folder / "unet" / "evil.bin").write_bytes(pickle.dumps(WritesMarker(marker)))
    for shard in ("evil.bin", "../evil.safetensors", "sub/evil.safetensors"):
        index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: shard}}))
        with pytest.raises(ModelFolderError, match="every shard must be a .safetensors file beside the index"):
            load_pipeline(folder)
    assert not marker.exists()
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: "gone.safetensors"}}))
    with pytest.raises(ModelFolderError, match="names shards that are missing: gone.safetensors"):
        load_pipeline(folder)
    index_path.write_text(json.dumps({"weight_map": index["weight_map"]}))  # diffusers needs the metadata too
    with pytest.raises(ModelFolderError, match="must hold"):
        load_pipeline(folder)


def test_update_card_never_writes_through_a_linked_readme(folder, tmp_path):
    """A README.md that links elsewhere: refused, the link and the file it points to both unchanged."""
    target = tmp_path / "someone-elses-file.md"
    target.write_text("precious\n")
    (folder / "README.md").unlink()
    os.symlink(target, folder / "README.md")
    with pytest.raises(ModelFolderError, match=r"README.md is a symbolic link .*never edits a card through a link"):
        update_model_card(folder, {"swd": 1.0}, "ylecun/mnist")
    assert target.read_text() == "precious\n" and (folder / "README.md").is_symlink()


@pytest.mark.parametrize("header", ["license: [mit\n", "- a list\n", "model-index: 5\n", "a: *undefined\n"])
def test_update_card_refuses_a_card_whose_yaml_header_does_not_parse(folder, header):
    card = f"---\n{header}---\n\n# Mine\n"
    (folder / "README.md").write_text(card)
    with pytest.raises(ModelFolderError, match=r"README.md has a metadata header .* cannot be read"):
        update_model_card(folder, {"swd": 1.0}, "ylecun/mnist")
    assert (folder / "README.md").read_text() == card


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


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_presets_noise_schedule_passes_the_folder_check(preset, tmp_path):
    """What training can export, the folder check accepts (zero terminal SNR included)."""
    scheduler = DDPMScheduler(**PRESETS[preset].scheduler.ddpm_config())
    folder = export_pipeline(tiny_unet(channels=1), scheduler, tmp_path / "model")
    assert load_pipeline(folder).scheduler.config.num_train_timesteps == PRESETS[preset].scheduler.num_train_timesteps


_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-0.1, 1.1),
                    st.floats(1e-12, 0.05), st.sampled_from([0, 1, -1, 1e-4, 0.02, 0.999, 1e-9]))
_SCHEDULES = st.fixed_dictionaries({}, optional={
    "num_train_timesteps": st.one_of(st.integers(-1, 2000), st.sampled_from([10, 1000, 100_000])),
    "beta_start": _FLOATS, "beta_end": _FLOATS,
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    "trained_betas": st.one_of(st.none(), st.lists(_FLOATS, min_size=1, max_size=12)),
    "clip_sample": st.booleans(), "clip_sample_range": _FLOATS,
    "timestep_spacing": st.sampled_from(["leading", "linspace", "trailing", "cubic", "", "LEADING"]),
    "steps_offset": st.one_of(st.integers(-2, 5), st.sampled_from([99, 100, 10**9])),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample"]),
    "rescale_betas_zero_snr": st.booleans(),
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=_SCHEDULES, steps=st.integers(1, 4), sampler=st.sampled_from(["ddpm", "ddim", "dpm++"]))
def test_generated_scheduler_configs_are_refused_or_give_a_usable_schedule(exported, fuzz_folder, schedule, steps,
                                                                            sampler):
    """Any schedule: a ModelFolderError naming scheduler_config.json (or sampling.json, whose steps a short schedule
    cannot take), or an alpha_bar that is finite, strictly decreasing inside (0, 1), and a few sampling steps of
    every sampler that give finite images."""
    name = "scheduler/scheduler_config.json"
    if isinstance(schedule.get("trained_betas"), list) and schedule.get("num_train_timesteps", 1000) in range(2, 2001):
        betas = schedule["trained_betas"]  # stretch to the schedule's length, so the values are what is tested
        schedule["trained_betas"] = (betas * (schedule.get("num_train_timesteps", 1000) // len(betas) + 1))[
            : schedule.get("num_train_timesteps", 1000)]
    for restored in _JSON_FILES:  # the folder is shared with the other generators, which leave edits behind
        shutil.copyfile(exported / restored, fuzz_folder / restored)
    (fuzz_folder / name).write_text(json.dumps({**json.loads((exported / name).read_text()), **schedule}))
    try:
        pipe = load_pipeline(fuzz_folder)
    except ModelFolderError as err:  # the schedule itself, or one shorter than the steps the export recommends
        assert "scheduler_config.json is not a usable noise schedule" in str(err) or (
            "sampling.json asks for num_inference_steps" in str(err) and "training timesteps" in str(err))
        event("refused")
        return
    event("accepted and sampled")
    alpha_bar = pipe.scheduler.alphas_cumprod.double()
    if pipe.scheduler.config.rescale_betas_zero_snr:  # zero terminal SNR: the last step is pure noise, by design
        assert alpha_bar[-1] == 0
        alpha_bar = alpha_bar[:-1]
    assert torch.isfinite(alpha_bar).all() and alpha_bar.min() > 0 and alpha_bar.max() < 1
    assert (alpha_bar.diff() < 0).all()
    steps = min(steps, pipe.scheduler.config.num_train_timesteps // 10 or 1)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=steps, sampler=sampler, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(images).all()


_SHARD_DAMAGE = {
    "none": None,
    "nan": lambda f: _rewrite_shard(f, lambda v: torch.full_like(v, float("nan"))),
    "inf": lambda f: _rewrite_shard(f, lambda v: torch.full_like(v, float("-inf"))),
    "integer": lambda f: _rewrite_shard(f, lambda v: v.to(torch.int32)),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "pickle suffix": lambda f: f.rename(f.with_suffix(".bin")),
    "missing": lambda f: f.unlink(),
}


def _rewrite_shard(path: Path, transform) -> None:
    from safetensors.torch import save_file

    save_file({k: transform(v) for k, v in load_file(path).items()}, path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shards=st.integers(1, 4), damage=st.sampled_from(sorted(_SHARD_DAMAGE)), which=st.integers(0, 3),
       keep_single=st.booleans())
@example(shards=3, damage="none", which=0, keep_single=False)
@example(shards=2, damage="none", which=1, keep_single=True)
def test_generated_sharded_unets_are_refused_exactly_when_a_shard_is_bad(exported, tmp_path_factory, shards, damage,
                                                                          which, keep_single):
    """1 to 4 shards, one of them damaged or not, the single weights file beside them or not: a damaged shard is
    refused (the message names it) even when the single file is good; intact shards load the same model."""
    folder = Path(shutil.copytree(exported, tmp_path_factory.mktemp("shards") / "model"))
    files = _shard(folder, shards, keep_single=keep_single)
    shard = files[which % shards]
    event(f"shard damage: {damage}")
    if _SHARD_DAMAGE[damage] is None:
        assert load_pipeline(folder).unet.state_dict().keys() == load_pipeline(exported).unet.state_dict().keys()
        return
    _SHARD_DAMAGE[damage](shard)
    if damage == "pickle suffix":  # the index names the renamed file, as a hostile index would
        index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(index.read_text().replace(shard.name, shard.with_suffix(".bin").name))
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(folder)
    assert shard.stem in str(err.value)


def test_card_names_a_local_dataset_without_its_machine_path(tmp_path):
    data = tmp_path / "secret-home" / "my-faces"
    data.mkdir(parents=True)
    card = render_model_card(ModelCardInfo(preset="celeba-64", dataset=str(data)))
    assert "my-faces" in card and "secret-home" not in card and str(tmp_path) not in card
    assert "huggingface.co/datasets/ylecun/mnist" in render_model_card(ModelCardInfo(dataset="ylecun/mnist"))


# ---- conditional models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_punks(tmp_path_factory) -> Path:
    punks = punk_pipeline()
    return export_pipeline(punks.unet, punks.scheduler, tmp_path_factory.mktemp("punks") / "model", card=CARD,
                           condition=punks.condition, attribute_encoder=punks.attribute_encoder)


def test_a_conditional_export_carries_its_vocabulary_encoder_and_card(exported_punks):
    assert files_in(exported_punks) == EXPORTED_FILES - {"samples.png"} | {
        "condition.json", "attribute_encoder/config.json", "attribute_encoder/diffusion_pytorch_model.safetensors",
        "attribute_encoder/punkdiff.pipelines.punkdiff_pipeline.py"}
    assert json.loads((exported_punks / "condition.json").read_text()) == json.loads(PUNKS.to_json())
    card = ModelCard.load(exported_punks / "README.md")
    assert "class-conditional-image-generation" in card.data.tags
    assert "## Condition" in card.text and PUNKS.markdown() in card.text
    assert "- `type`: one of 5: Alien (9), Ape (24), Zombie (88), Female (3,840), Male (6,039)" in card.text
    assert 'custom_pipeline="path/to/this/folder", trust_remote_code=True' in card.text
    assert "attributes={'type': 'Alien', 'accessories': ['3D Glasses']}, batch_size=4, guidance_scale=3.0" in card.text
    assert "class_labels should be provided" in card.text  # what stock DDPMPipeline says, and what to do instead
    assert "pipe = DDPMPipeline.from_pretrained" not in card.text
    loaded = load_pipeline(exported_punks)
    assert loaded.condition == PUNKS and loaded.attribute_encoder is not None
    plain = ModelCard.load(write_model_card(Path(shutil.copytree(exported_punks, exported_punks.parent / "copy"))))
    assert PUNKS.markdown() in plain.text  # the card of any folder reads its condition.json


def _corrupt_condition(folder: Path) -> None:
    (folder / "condition.json").write_text('{"format": "something-else"}')


def _no_condition(folder: Path) -> None:
    (folder / "condition.json").unlink()


def _foreign_encoder(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["attribute_encoder"] = ["evil_module", "AttributeEncoder"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _no_encoder_weights(folder: Path) -> None:
    (folder / "attribute_encoder" / "diffusion_pytorch_model.safetensors").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt_condition, r"condition.json is not a condition vocabulary \(not a punkdiff condition"),
        (_no_condition, r"has an attribute_encoder but no condition.json"),
        (_foreign_encoder, r"lists attribute_encoder as \['evil_module', 'AttributeEncoder'\]; punkdiff loads only"),
        (_no_encoder_weights, r"describes a multi_hot condition, which needs an attribute_encoder with "
                              r"attribute_encoder/diffusion_pytorch_model.safetensors"),
    ],
)
def test_bad_conditional_folders_are_refused_with_a_clear_error(exported_punks, tmp_path, damage, message):
    folder = Path(shutil.copytree(exported_punks, tmp_path / "model"))
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        load_pipeline(folder)


def test_custom_pipeline_route_samples_a_conditional_model_without_punkdiff(exported_punks, tmp_path):
    """A Hub user's view of a conditional model: the vocabulary and the encoder come without punkdiff installed."""
    script = textwrap.dedent(
        """
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(attributes={"type": "Ape", "accessories": ["Cap"]}, batch_size=2, guidance_scale=3.0,
                      num_inference_steps=3, sampler="ddim", output_type="np").images
        try:
            pipe(attributes={"type": "Apex"})
        except ValueError as err:
            print("refused:", str(err).split(";")[0])
        print(type(pipe).__name__, pipe.condition.columns, type(pipe.attribute_encoder).__name__, images.shape)
        """
    )
    result = run_without_punkdiff(script, exported_punks, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "refused: unknown type 'Apex'",
        "PunkDiffPipeline ('type', 'accessories') AttributeEncoder (2, 8, 8, 3)",
    ]


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
