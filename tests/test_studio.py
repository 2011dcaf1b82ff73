"""What the app does with a model: find, load, sample, inpaint, reconstruct; tiny random models, real punks."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler
from fake_hub import fake_hub
from PIL import Image
from tiny_models import PUNK_ACCESSORIES, PUNK_TYPES, digit_pipeline, punk_pipeline, tiny_unet

from punkdiff import studio
from punkdiff.hub import ModelCardInfo, export_pipeline
from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS, SamplingConfig
from punkdiff.presets import DDIM_ETA, RECOMMENDED_SAMPLING, DataSpec
from punkdiff.roots import PathOutsideRoots, Roots
from punkdiff.sampling import generate


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Roots:
    base = tmp_path_factory.mktemp("studio")
    export_pipeline(tiny_unet(channels=3, sample_size=8), DDPMScheduler(num_train_timesteps=100),
                    base / "models" / "punky", card=ModelCardInfo(preset="punks-24", dataset="huggingnft/cryptopunks"))
    run = base / "runs" / "digits-run"
    export_pipeline(tiny_unet(channels=1, sample_size=8), DDPMScheduler(num_train_timesteps=50), run / "pipeline")
    data = {"dataset": "/data/mnist", "resolution": 16, "channels": 1, "background": "#000000",
            "resize_filter": "bilinear", "center_crop": False, "split": "train"}
    (run / "training_summary.json").write_text(json.dumps({"config": {"data": data}}))
    (base / "outside").mkdir()
    shutil.copytree(base / "models" / "punky", base / "outside" / "hidden")
    os.symlink(base / "outside", base / "models" / "link-out")
    return Roots(models=[base / "models"], runs=base / "runs")


@pytest.fixture(scope="module")
def punky(roots):
    return studio.ModelCache().load(studio.resolve_model("punky", roots))


def test_models_are_found_inside_the_roots_only(roots):
    found = studio.find_models(roots)
    assert [roots.relative_name(p, "models") for p in found] == ["models/punky", "runs/digits-run/pipeline"]
    with pytest.raises(PathOutsideRoots):
        studio.resolve_model("link-out/hidden", roots)
    with pytest.raises(PathOutsideRoots):
        studio.resolve_model("../outside/hidden", roots)
    with pytest.raises(studio.StudioError, match="offline"):
        studio.resolve_model("someone/not-here", roots, allow_hub=False)
    with pytest.raises(FileNotFoundError):
        studio.resolve_model("not-here", roots, allow_hub=False)


def test_a_model_whose_weights_link_out_of_the_roots_is_not_loaded(roots, tmp_path):
    """The folder lies inside the roots, its weight file does not: refused before anything reads the weights."""
    model = shutil.copytree(roots.resolve("punky", "models"), tmp_path / "models" / "linked")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "outside").mkdir()
    weights.rename(tmp_path / "outside" / weights.name)
    os.symlink(tmp_path / "outside" / weights.name, weights)
    linked = Roots(models=[tmp_path / "models"], runs=tmp_path / "runs")
    with pytest.raises(PathOutsideRoots, match=r"linked/unet/diffusion_pytorch_model\.safetensors leads to .*outside"):
        studio.resolve_model("linked", linked)


def test_a_model_asked_for_by_several_handlers_at_once_is_loaded_once(roots):
    # a page that opens asks for its model from several handlers in parallel threads
    cache, folder = studio.ModelCache(), studio.resolve_model("punky", roots)
    with ThreadPoolExecutor(3) as pool:
        pipes = list(pool.map(lambda _: cache.load(folder)[0], range(3)))
    assert pipes[0] is pipes[1] is pipes[2]


def test_a_hub_model_is_downloaded_inside_the_run_root(roots, monkeypatch):
    with fake_hub(monkeypatch, models={"someone/punky": roots.resolve("punky", "models")}):
        folder = studio.resolve_model("someone/punky", roots)
    assert roots.resolve(folder, "runs") == folder.resolve()  # inside the run root, not refused
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert folder in studio.find_models(roots)  # listed with the others from now on
    assert studio.model_info(folder).num_train_timesteps == 100


def test_model_info_knows_how_its_data_was_prepared(roots, punky):
    _, info = punky
    assert (info.resolution, info.channels, info.num_train_timesteps) == (8, 3, 100)
    # the card names punks-24: transparent punks go on the punks' blue-grey, resized with nearest
    assert info.data.background == "#638596" and info.data.resize_filter == "nearest"
    assert info.data.resolution == 8 and info.trained_on == "huggingnft/cryptopunks"
    digits = studio.model_info(roots.resolve("digits-run/pipeline", "models"))
    assert digits.data.background == "#000000" and digits.data.resolution == 8 and digits.channels == 1
    assert digits.trained_on == "/data/mnist" and "8x8 grayscale, T = 50" in digits.describe()


def test_sample_writes_a_grid_and_an_animation(punky, tmp_path):
    pipe, info = punky
    calls = []
    result = studio.sample(pipe, info, "DDIM", 4, DDIM_ETA, 3, 6, tmp_path,
                           progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(result.images) == 6 and result.grid_path.parent.parent == tmp_path
    scale = 96 // 8
    grid = Image.open(result.grid_path)
    assert grid.size == ((8 * scale + 2) * 3, (8 * scale + 2) * 2)  # 3x2 tiles of 96 px with a 1 px grey gap
    gif = Image.open(result.animation_path)
    assert gif.n_frames == 4 and gif.size[0] > 2 * gif.size[1]  # x_t beside the predicted x_0
    again = studio.sample(pipe, info, "ddim", 4, DDIM_ETA, 4, 2, tmp_path)  # image i uses seed + i, noise and all
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(result.images[1]))
    # the same images as `punkdiff sample` (punkdiff.sampling.generate) with the same seed and its default eta
    cli = generate(pipe, 2, seed=4, batch_size=1, sampler="ddim", num_inference_steps=4, progress=False)
    for ours, theirs in zip(again.images, cli, strict=True):
        assert np.abs(np.asarray(ours, int) - np.asarray(theirs, int)).max() <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("DDIM", 0, 0.0, 0, 4), "steps must be a whole number from 1 to 100"),
        (("DDIM", 101, 0.0, 0, 4), "steps must be a whole number from 1 to 100"),
        (("DDIM", "ten", 0.0, 0, 4), "steps must be a whole number"),
        (("DDIM", 4, 0.0, 0, 65), "batch size must be a whole number from 1 to 64"),
        (("DDIM", 4, 1.5, 0, 4), "eta must be between 0"),
        (("Euler", 4, 0.0, 0, 4), "unknown sampler 'Euler': choose one of ddpm, ddim, ddim-trailing"),
        (("DDIM", 4, 0.0, -1, 4), "seed must be"),
    ],
)
def test_nonsense_sampling_settings_are_refused(punky, tmp_path, args, message):
    pipe, info = punky
    with pytest.raises(studio.StudioError, match=message):
        studio.sample(pipe, info, *args, tmp_path)
    assert not any(tmp_path.iterdir())


def test_mask_from_painted_strokes():
    layer = np.zeros((96, 96, 4), np.uint8)
    layer[:24, :, 3] = 255  # the top quarter of the canvas: two rows of an 8 px model
    layer[24:26, :, 3] = 255  # a brush edge touching the third row: 2 of 12 px, under a quarter
    mask = np.asarray(studio.mask_from_layers([None, layer], 8))
    assert mask.shape == (8, 8) and set(np.unique(mask)) == {0, 255}
    assert (mask[:2] == 255).all() and (mask[2:] == 0).all()
    with pytest.raises(studio.StudioError, match="Nothing is painted"):
        studio.mask_from_layers([np.zeros((96, 96, 4), np.uint8)], 8)


def test_inpaint_keeps_every_unmasked_pixel(punky):
    pipe, info = punky
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[:3] = 255
    fills = studio.inpaint(pipe, image, Image.fromarray(mask), steps=10, jump_length=5, jump_n_sample=2, seed=0,
                           num_images=2)
    assert len(fills) == 2
    for fill in fills:
        diff = np.abs(np.asarray(fill, int) - np.asarray(image, int))
        assert diff[3:].max() <= 1  # kept (up to rounding), filled where masked
        assert diff[:3].mean() > 10
    assert not np.array_equal(np.asarray(fills[0]), np.asarray(fills[1]))  # seeds 0 and 1
    with pytest.raises(studio.StudioError, match="jump length"):
        studio.inpaint(pipe, image, Image.fromarray(mask), steps=10, jump_length=11, jump_n_sample=2, seed=0)


def test_reconstruct_from_small_t_stays_close(punky, tmp_path):
    pipe, info = punky
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    near, near_mse, gif = studio.reconstruct(pipe, info, image, 2, "DDIM", 50, 0, tmp_path)
    far, far_mse, _ = studio.reconstruct(pipe, info, image, 99, "DDIM", 50, 0, tmp_path)
    assert near.size == image.size and gif.suffix == ".gif" and Image.open(gif).n_frames >= 1
    assert near_mse < 0.01 < far_mse
    with pytest.raises(studio.StudioError, match="t must be a whole number from 0 to 99"):
        studio.reconstruct(pipe, info, image, 100, "DDIM", 50, 0, tmp_path)


def test_a_real_punk_is_prepared_as_in_training(punks_dir, punky):
    """The mirror's RGBA punk, composited on #638596 and resized with nearest to the model's size."""
    _, info = punky
    punk = studio.dataset_image(str(punks_dir), 0)
    assert punk.mode == "RGBA" and punk.size == (24, 24)
    prepared = studio.prepare_image(punk, info)
    assert prepared.mode == "RGB" and prepared.size == (8, 8)
    assert prepared.getpixel((0, 0)) == (0x63, 0x85, 0x96)  # the transparent corner became the background
    shown = studio.upscale(prepared, 384)
    assert shown.size == (384, 384) and shown.getpixel((47, 47)) == prepared.getpixel((0, 0))
    with pytest.raises(studio.StudioError, match="image index must be a whole number from 0 to 9999"):
        studio.dataset_image(str(punks_dir), 10_000)
    with pytest.raises(PathOutsideRoots):
        studio.dataset_image("relative/path", 0)


def test_pictures_for_the_page():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 8, 2))
    shown = studio.show_mask(image, mask)
    assert shown.getpixel((0, 0)) == (255, 0, 255) and shown.getpixel((0, 5)) == (10, 20, 30)
    strip = studio.side_by_side([image, shown], target=64, gap=8)
    assert strip.size == (64 * 2 + 8, 64)


def test_model_info_reads_the_cards_yaml_header_not_its_text(tmp_path, roots):
    """A model without its run: the preset and dataset come from the card's YAML header (`punkdiff:`), not from the
    Markdown table, which a person may rewrite; a header that is not YAML leaves the defaults, and the model loads."""
    folder = Path(shutil.copytree(roots.resolve("punky", "models"), tmp_path / "punky"))
    card = (folder / "README.md").read_text()
    assert "punkdiff:\n  preset: punks-24\n  dataset: huggingnft/cryptopunks\n" in card
    (folder / "README.md").write_text(card.replace("| Preset | `punks-24` |", "| Preset | `mnist-baseline-16` |"))
    info = studio.model_info(folder)
    assert info.data.background == "#638596" and info.trained_on == "huggingnft/cryptopunks"
    header_only = card.replace("preset: punks-24", "preset: celeba-64").split("\n---\n")[0] + "\n---\n# renamed\n"
    (folder / "README.md").write_text(header_only)
    assert studio.model_info(folder).data.center_crop  # celeba-64 prepares faces by a centre crop
    (folder / "README.md").write_text("---\npunkdiff: [unclosed\n---\n| Preset | `punks-24` |\n")
    info = studio.model_info(folder)
    assert (info.data.background, info.trained_on) == (DataSpec().background, None)


# --- samplers, a model's recommended sampling, conditional models ----------------------------------------------------


@pytest.fixture(scope="module")
def conditional_roots(tmp_path_factory) -> Roots:
    """A digit model that is a distilled student (DDIM trailing, 4 steps), a punk attribute model, as exported."""
    base = tmp_path_factory.mktemp("conditional")
    digits = digit_pipeline()
    export_pipeline(digits.unet, DDPMScheduler(num_train_timesteps=100), base / "models" / "digits",
                    condition=digits.condition,
                    sampling={"sampler": "ddim-trailing", "num_inference_steps": 4, "eta": 0.0, "distilled_steps": 4})
    punks = punk_pipeline()
    export_pipeline(punks.unet, DDPMScheduler(num_train_timesteps=100), base / "models" / "punks",
                    condition=punks.condition, attribute_encoder=punks.attribute_encoder)
    return Roots(models=[base / "models"], runs=base / "runs")


def _load(roots: Roots, name: str):
    return studio.ModelCache().load(studio.resolve_model(name, roots))


def test_every_sampler_of_the_pipeline_is_offered_by_a_readable_name(punky, tmp_path):
    choices = studio.sampler_choices()
    assert [name for _, name in choices] == list(SAMPLERS)
    labels = dict(choices)
    assert labels["DPM-Solver++ 2M, Karras"] == "dpm++-karras" and labels["DDIM, trailing steps"] == "ddim-trailing"
    assert studio.uses_eta("ddim-trailing") and studio.uses_eta("DDIM") and not studio.uses_eta("unipc-karras")
    pipe, info = punky
    # every sampler samples, by its name or by its label; trailing DDIM and UniPC differ from plain DDIM
    grids = {name: np.asarray(studio.sample(pipe, info, label, 3, 0.0, 0, 2, tmp_path).images[0])
             for label, name in choices}
    assert not np.array_equal(grids["ddim"], grids["ddim-trailing"])
    assert not np.array_equal(grids["ddim"], grids["unipc"])


def test_a_model_carries_its_recommended_sampling(punky, conditional_roots):
    _, info = punky  # exported without a recommendation: punkdiff's own, DDIM-50 with eta 1
    assert info.sampling == SamplingConfig.from_dict(RECOMMENDED_SAMPLING) and info.sampling.distilled_steps is None
    assert studio.sampling_note(info.sampling) == "Recommended for this model: DDIM, 50 steps, eta 1."
    _, student = _load(conditional_roots, "digits")
    assert (student.sampling.sampler, student.sampling.num_inference_steps, student.sampling.distilled_steps) == \
        ("ddim-trailing", 4, 4)
    note = studio.sampling_note(student.sampling)
    assert "distilled to sample in **4 steps**" in note and "only guaranteed at 4 steps" in note
    assert "distilled to 4 steps" in student.describe() and "conditioned on label" in student.describe()


def test_a_student_sampled_at_another_step_count_says_so(conditional_roots, tmp_path):
    pipe, info = _load(conditional_roots, "digits")
    assert studio.sample(pipe, info, "ddim-trailing", 4, 0.0, 0, 2, tmp_path, labels="3").notes == []
    notes = studio.sample(pipe, info, "ddim-trailing", 8, 0.0, 0, 2, tmp_path, labels="3").notes
    assert len(notes) == 1 and "distilled to sample in 4 steps" in notes[0] and "asks for 8" in notes[0]


def test_the_digit_picker_asks_for_a_digit(conditional_roots, tmp_path):
    pipe, info = _load(conditional_roots, "digits")
    form = studio.ConditionForm.of(info.condition)
    assert (form.kind, form.choice_column, form.choices, form.set_column) == ("labels", "label", tuple("0123456789"),
                                                                                None)
    request = form.request("7", guidance_scale=3.0)
    assert request == {"labels": "7", "guidance_scale": 3.0}
    sevens = studio.sample(pipe, info, "ddim-trailing", 4, 0.0, 5, 3, tmp_path, **request)
    # the same images as the library's own sampling of label 7 with these seeds, and not those of another digit
    expected = generate(pipe, 3, seed=5, batch_size=3, sampler="ddim-trailing", num_inference_steps=4, eta=0.0,
                        labels=7, guidance_scale=3.0, progress=False)
    for ours, theirs in zip(sevens.images, expected, strict=True):
        assert np.abs(np.asarray(ours, int) - np.asarray(theirs, int)).max() <= 1
    threes = studio.sample(pipe, info, "ddim-trailing", 4, 0.0, 5, 3, tmp_path, **form.request("3", guidance_scale=3))
    assert not np.array_equal(np.asarray(threes.images[0]), np.asarray(sevens.images[0]))
    # "any" asks for nothing: the unconditional samples, and guidance, which cannot apply, is said to be ignored
    anything = studio.sample(pipe, info, "ddim-trailing", 4, 0.0, 5, 1, tmp_path,
                             **form.request(studio.ANY, guidance_scale=3.0))
    assert anything.notes and "guidance does not apply" in anything.notes[0]
    unconditional = generate(pipe, 1, seed=5, batch_size=1, sampler="ddim-trailing", num_inference_steps=4, eta=0.0,
                             progress=False)
    assert np.abs(np.asarray(anything.images[0], int) - np.asarray(unconditional[0], int)).max() <= 1


def test_the_punk_builder_asks_for_a_type_and_accessories(conditional_roots, tmp_path):
    pipe, info = _load(conditional_roots, "punks")
    form = studio.ConditionForm.of(info.condition)
    assert (form.kind, form.choice_column, form.set_column, form.others) == ("attributes", "type", "accessories", ())
    assert form.choices == PUNK_TYPES and form.set_names == PUNK_ACCESSORIES
    assert form.request("Ape", ["Cap", "Pipe"], guidance_scale=2.0) == {
        "attributes": {"type": "Ape", "accessories": ["Cap", "Pipe"]}, "guidance_scale": 2.0}
    assert form.request("Ape", []) == {"attributes": {"type": "Ape", "accessories": []}, "guidance_scale": 1.0}
    assert form.request(studio.ANY, [], model_chooses_set=True) == {"attributes": None, "guidance_scale": 1.0}
    assert form.request("Zombie", model_chooses_set=True)["attributes"] == {"type": "Zombie"}
    with pytest.raises(studio.StudioError, match="Cap ticked, but the model is to choose the accessories"):
        form.request("Ape", ["Cap"], model_chooses_set=True)
    capped = studio.sample(pipe, info, "ddim", 3, 0.0, 0, 2, tmp_path, **form.request("Ape", ["Cap"], False, 2.0))
    expected = generate(pipe, 2, seed=0, batch_size=2, sampler="ddim", num_inference_steps=3, eta=0.0,
                        attributes={"type": "Ape", "accessories": ["Cap"]}, guidance_scale=2.0, progress=False)
    for ours, theirs in zip(capped.images, expected, strict=True):
        assert np.abs(np.asarray(ours, int) - np.asarray(theirs, int)).max() <= 1
    bare = studio.sample(pipe, info, "ddim", 3, 0.0, 0, 2, tmp_path, **form.request("Ape", [], False, 2.0))
    assert not np.array_equal(np.asarray(bare.images[0]), np.asarray(capped.images[0]))
    assert studio.ConditionForm.of(None) == studio.ConditionForm() and studio.ConditionForm().request("Ape") == {}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"attributes": {"type": "Ape", "accessories": ["Cape"]}, "guidance_scale": 2.0},
         r"unknown accessories 'Cape'; closest: 'Cap'.*known accessories values \(6\)"),
        ({"attributes": {"type": "Gorilla"}}, r"unknown type 'Gorilla'.*Alien, Ape, Zombie, Female, Male"),
        ({"attributes": {"type": "Ape"}, "guidance_scale": float("nan")}, "guidance scale must be a finite number"),
        ({"attributes": {"type": "Ape"}, "guidance_scale": -1.0}, "guidance scale must be a finite number >= 0"),
        ({"attributes": {"hat": "Cap"}}, "unknown attribute 'hat'; this model is conditioned on type"),
    ],
)
def test_a_bad_request_is_refused_before_any_work(conditional_roots, tmp_path, request_, message):
    pipe, info = _load(conditional_roots, "punks")
    with pytest.raises(studio.StudioError, match=message):
        studio.sample(pipe, info, "ddim", 3, 0.0, 0, 2, tmp_path, **request_)
    assert not any(tmp_path.iterdir())


def test_an_unconditional_model_takes_no_condition(punky, tmp_path):
    pipe, info = punky
    assert info.condition is None and studio.ConditionForm.of(info.condition).kind is None
    with pytest.raises(studio.StudioError, match="this model is unconditional"):
        studio.sample(pipe, info, "ddim", 3, 0.0, 0, 2, tmp_path, labels="7")
    with pytest.raises(studio.StudioError, match="guidance_scale=3.0 needs a condition"):
        studio.sample(pipe, info, "ddim", 3, 0.0, 0, 2, tmp_path, guidance_scale=3.0)
    assert not any(tmp_path.iterdir())
