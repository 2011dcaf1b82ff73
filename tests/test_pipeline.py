"""PunkDiffPipeline: sampling, scheduler choice, exact DDIM, trajectories, reconstruction and inpainting."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from fake_hub import fake_hub
from tiny_models import DIGITS, PUNKS, digit_pipeline, punk_pipeline, tiny_pipeline, tiny_unet

from punkdiff import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import ExactDDIMScheduler, ExactRePaintScheduler

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "punkdiff_pipeline.py"


@pytest.fixture(scope="module")
def pipe() -> PunkDiffPipeline:
    return tiny_pipeline(channels=3)


@pytest.fixture(scope="module")
def gray_pipe() -> PunkDiffPipeline:
    return tiny_pipeline(channels=1)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++"])
def test_image_i_depends_only_on_its_generator(pipe, scheduler):
    kwargs = {"num_inference_steps": 8, "sampler": scheduler, "eta": 1.0, "output_type": "pt"}
    batch = pipe(batch_size=3, generator=generators(10, 11, 12), **kwargs).images
    single = pipe(batch_size=1, generator=generators(12), **kwargs).images
    other = pipe(batch_size=1, generator=generators(13), **kwargs).images
    # Batched and single convolutions may round differently in the last float32 bits, nothing more.
    torch.testing.assert_close(batch[2], single[0], atol=1e-5, rtol=0)
    assert (single - other).abs().max() > 1e-2


def test_output_types_shapes_and_ranges(pipe, gray_pipe):
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "sampler": "ddim"}
    pil = pipe(**kwargs, generator=generators(0, 1)).images
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (8, 8)
    arr = pipe(**kwargs, generator=generators(0, 1), output_type="np").images
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    pt = pipe(**kwargs, generator=generators(0, 1), output_type="pt").images
    assert pt.shape == (2, 3, 8, 8) and pt.dtype == torch.float32
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))

    gray = gray_pipe(**kwargs, generator=generators(0, 1)).images
    assert gray[0].mode == "L" and gray[0].size == (8, 8)
    assert gray_pipe(**kwargs, output_type="np").images.shape == (2, 8, 8, 1)
    images, *rest = gray_pipe(**kwargs, output_type="pt", return_dict=False)
    assert images.shape == (2, 1, 8, 8) and rest == []


def test_scheduler_choice_never_touches_the_saved_scheduler(pipe):
    saved = dict(pipe.scheduler.config)
    for name in ("ddim", "dpm++", "ddpm"):
        pipe(num_inference_steps=4, sampler=name, output_type="np")
    assert type(pipe.scheduler) is DDPMScheduler
    assert dict(pipe.scheduler.config) == saved
    assert pipe.scheduler.num_inference_steps is None  # not even its timesteps were set
    with pytest.raises(ValueError, match="Unknown sampler"):
        pipe(sampler="euler-ancestral-typo")


def test_ddim_eta_zero_is_deterministic_and_eta_is_used(pipe):
    def run(seed: int, eta: float) -> torch.Tensor:
        return pipe(
            generator=torch.Generator().manual_seed(seed),
            sampler="ddim",
            num_inference_steps=6,
            eta=eta,
            output_type="pt",
        ).images

    assert torch.equal(run(0, 0.0), run(0, 0.0))
    assert (run(0, 0.0) - run(0, 1.0)).abs().max() > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_exact_ddim_steps_to_the_next_scheduled_timestep(spacing):
    config = {"num_train_timesteps": 1000, "timestep_spacing": spacing, "clip_sample": False}
    sched, stock = ExactDDIMScheduler(**config), DDIMScheduler(**config)
    sched.set_timesteps(7)
    stock.set_timesteps(7)
    timesteps = sched.timesteps.tolist()
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    stock_differs = False
    for i, t in enumerate(timesteps):
        alpha_t = sched.alphas_cumprod[t]
        alpha_prev = sched.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        expected = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
        torch.testing.assert_close(sched.step(eps, t, x).prev_sample, expected, atol=1e-5, rtol=1e-5)
        stock_differs |= not torch.allclose(stock.step(eps, t, x).prev_sample, expected, atol=1e-5, rtol=1e-5)
    # The bug being fixed: stock diffusers is only right for "leading" spacing.
    assert stock_differs == (spacing != "leading")
    assert torch.equal(sched.alphas_cumprod, stock.alphas_cumprod)  # the temporary swap is undone


def test_exact_ddim_keeps_upstream_noise_draws():
    sched, stock = ExactDDIMScheduler(), DDIMScheduler()
    sched.set_timesteps(10)
    stock.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in sched.timesteps:
        ours = sched.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(int(t))).prev_sample
        theirs = stock.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(int(t))).prev_sample
        assert torch.equal(ours, theirs)


def test_exact_ddim_step_only_reads_the_scheduler_so_threads_can_share_it():
    from concurrent.futures import ThreadPoolExecutor

    sched = ExactDDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(7)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alone = {int(t): sched.step(eps, t, x).prev_sample for t in sched.timesteps}
    writes = []

    def record(self, name, value):
        writes.append(name)
        object.__setattr__(self, name, value)

    sched.__class__ = type("WatchedDDIM", (ExactDDIMScheduler,), {"__setattr__": record})
    order = [int(t) for t in sched.timesteps] * 20
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: (t, sched.step(eps, t, x).prev_sample), order))
    assert writes == []
    assert all(torch.equal(out, alone[t]) for t, out in together)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++"])
def test_trajectory_has_one_x_t_and_x0_per_step(pipe, scheduler):
    out = pipe(batch_size=2, num_inference_steps=5, sampler=scheduler, output_type="np", return_trajectory=True)
    assert len(out.trajectory) == len(out.pred_original_samples) == 5
    assert all(frame.shape == (2, 8, 8, 3) for frame in out.trajectory + out.pred_original_samples)
    np.testing.assert_array_equal(out.trajectory[-1], out.images)
    assert pipe(num_inference_steps=2, output_type="np").trajectory is None


def test_callback_sees_each_step_and_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].shape, tensors["pred_original_sample"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else {}

    out = pipe(
        num_inference_steps=4,
        sampler="ddim",
        output_type="np",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == [750, 500, 250, 0]
    assert all(s[2] == s[3] == (1, 3, 8, 8) for s in seen)
    np.testing.assert_allclose(out.images, 0.5)  # zeroed model-space latents are mid-grey
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(num_inference_steps=1, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_reconstruction_recovers_lightly_noised_images_only(pipe, scheduler):
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = 100 if scheduler == "ddpm" else 20

    def mse(t_start: int) -> float:
        out = pipe.reconstruct(
            image, t_start, generator=generators(0, 1), sampler=scheduler, num_inference_steps=steps, output_type="pt"
        ).images
        return float(((out - image) ** 2).mean())

    assert mse(10) < 5e-3
    assert mse(990) > 5e-2


def test_reconstruction_accepts_pil_and_checks_inputs(gray_pipe):
    image = PIL.Image.fromarray(np.full((8, 8), 200, dtype=np.uint8), mode="L")
    out = gray_pipe.reconstruct(image, 5, num_inference_steps=100, output_type="np").images
    assert out.shape == (1, 8, 8, 1) and abs(out.mean() - 200 / 255) < 0.05
    with pytest.raises(ValueError, match="shape"):
        gray_pipe.reconstruct(PIL.Image.new("L", (16, 16)), 5)
    with pytest.raises(ValueError, match="t_start"):
        gray_pipe.reconstruct(image, 1000)
    with pytest.raises(ValueError, match="one per image"):
        gray_pipe.reconstruct(image, 5, generator=generators(0, 1))


def test_inpainting_keeps_the_known_region_and_fills_the_mask(pipe):
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    out = pipe.inpaint(
        image,
        mask,
        num_inference_steps=10,
        jump_length=3,
        jump_n_sample=2,
        generator=generators(0, 1),
        output_type="pt",
    ).images
    assert out.shape == image.shape
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask), atol=1e-6, rtol=0)
    assert ((out - image).abs() * mask).sum() / (mask.sum() * 6) > 0.05


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_inpainting_with_every_step_matches_diffusers_repaint_pipeline(eta):
    """With n = T steps RePaint's schedule is the same in both: the same images as diffusers' RePaintPipeline (which
    takes the known region as its mask and images in [-1, 1]) for the same model and seed."""
    from diffusers import RePaintPipeline, RePaintScheduler

    pipe = PunkDiffPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=40))
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:5, 3:8] = 1.0
    kwargs = {"num_inference_steps": 40, "jump_length": 4, "jump_n_sample": 2, "eta": eta, "output_type": "np"}
    ours = pipe.inpaint(image, mask, generator=torch.Generator().manual_seed(7), **kwargs).images
    stock = RePaintPipeline(pipe.unet, RePaintScheduler.from_config(pipe.scheduler.config))
    theirs = stock(image * 2 - 1, 1 - mask, generator=torch.Generator().manual_seed(7), **kwargs).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.abs(ours - image.permute(0, 2, 3, 1).numpy()).max() > 0.05  # the masked region was generated


@pytest.mark.parametrize(("T", "n"), [(300, 250), (1000, 250), (1000, 7), (40, 40)])
def test_repaint_walk_starts_at_t_minus_one_and_ends_at_zero(T, n):
    from diffusers import RePaintScheduler

    ours = ExactRePaintScheduler(num_train_timesteps=T)
    ours.set_timesteps(n, jump_length=3, jump_n_sample=2)
    assert int(ours.timesteps[0]) == T - 1 and int(ours.timesteps[-1]) == int(ours.levels[0])
    assert ours._alpha_prod_prev(int(ours.levels[0])) == ours.final_alpha_cumprod  # the last step lands on x_0
    assert len(ours.levels) == n and sorted(set(ours.timesteps.tolist())) == ours.levels.tolist()
    upstream = RePaintScheduler(num_train_timesteps=T)
    upstream.set_timesteps(n, jump_length=3, jump_n_sample=2)
    # the same walk (jumps back included); upstream's levels reach T - 1 only when n = T
    assert len(upstream.timesteps) == len(ours.timesteps)
    assert (int(upstream.timesteps[0]) == T - 1) == (n == T)


def test_repaint_step_of_a_v_model_equals_the_step_of_its_epsilon():
    """A v output is converted, not refused: the step equals the epsilon step for eps = sqrt(ab) v + sqrt(1-ab) x_t."""
    g = torch.Generator().manual_seed(0)
    x_t, v, image = (torch.randn(2, 1, 8, 8, generator=g) for _ in range(3))
    keep = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    eps_sched, v_sched = (ExactRePaintScheduler(num_train_timesteps=50, clip_sample=False) for _ in range(2))
    v_sched.use_schedule_of(DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction"))
    for sched in (eps_sched, v_sched):
        sched.set_timesteps(10, jump_length=2, jump_n_sample=2)
    t = int(eps_sched.levels[6])
    ab = eps_sched.alphas_cumprod[t]
    eps = ab.sqrt() * v + (1 - ab).sqrt() * x_t
    ours = v_sched.step(v, t, x_t, image, keep, torch.Generator().manual_seed(1))
    theirs = eps_sched.step(eps, t, x_t, image, keep, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pred_original_sample, theirs.pred_original_sample, atol=1e-5, rtol=0)


def test_inpainting_a_zero_terminal_snr_v_model_walks_its_own_schedule():
    """Upstream's RePaint constructor ignores `rescale_betas_zero_snr`: the walk takes the model's own alpha_bar
    (0 at T - 1, where an epsilon formula would divide by zero) and keeps the known region exactly."""
    scheduler = DDPMScheduler(num_train_timesteps=40, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert scheduler.alphas_cumprod[-1] == 0
    pipe = PunkDiffPipeline(tiny_unet(), scheduler)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    out = pipe.inpaint(image, mask, num_inference_steps=10, jump_length=2, jump_n_sample=2,
                       generator=generators(0), output_type="pt").images
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask), atol=1e-6, rtol=0)
    assert ((out - image).abs() * mask).sum() / (mask.sum() * 3) > 0.05
    with pytest.raises(ValueError, match="epsilon- or v-prediction model, not 'sample'"):
        PunkDiffPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=40, prediction_type="sample")).inpaint(
            image, mask, num_inference_steps=4)


def test_repaint_jump_back_noises_to_the_level_above():
    """q(x_t | x_{t'}) over several training steps in one draw: mean sqrt(prod alpha), variance 1 - prod alpha."""
    sched = ExactRePaintScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    low, high = (int(t) for t in sched.levels[3:5])
    alpha = sched.alphas_cumprod[high] / sched.alphas_cumprod[low]
    x = torch.full((20000,), 0.5)
    out = sched.undo_step(x, high, torch.Generator().manual_seed(0))
    assert abs(out.mean() - 0.5 * alpha.sqrt()) < 0.02 and abs(out.var() - (1 - alpha)) < 0.03


def test_pipeline_file_imports_only_torch_diffusers_numpy_pil_and_stdlib():
    """The file travels with models (huggingface_hub is diffusers' own dependency)."""
    allowed = {"torch", "diffusers", "huggingface_hub", "numpy", "PIL"} | set(sys.stdlib_module_names)
    tree = ast.parse(PIPELINE_FILE.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    imported = {alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in imports if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= allowed
    assert PunkDiffPipeline.__module__ == "punkdiff.pipelines.punkdiff_pipeline"


def punkdiff_references(source: str) -> list[str]:
    """Every import of punkdiff in `source`, by statement or by name (`import_module("punkdiff.hub")`), and every
    relative import that leaves the `pipelines` package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "punkdiff"]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 0 and (node.module or "").split(".")[0] == "punkdiff"):
                found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__", "find_spec"
        ):
            found += [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("punkdiff")]
    return found


def test_no_module_under_pipelines_imports_punkdiff():
    """Export goes hub -> pipeline, never back: the pipeline package knows nothing of the rest of punkdiff."""
    modules = sorted(PIPELINE_FILE.parent.glob("**/*.py"))
    assert PIPELINE_FILE in modules
    assert {m.name: punkdiff_references(m.read_text()) for m in modules} == {m.name: [] for m in modules}
    planted = "import os\nfrom punkdiff import hub\nfrom .. import files\nimportlib.import_module('punkdiff.hub')\n"
    assert punkdiff_references(planted) == ["punkdiff", "..", "punkdiff.hub"]


def test_save_pretrained_is_loadable_by_stock_diffusers(pipe, tmp_path):
    """A plain `save_pretrained` (not only punkdiff's export) names DDPMPipeline and ships pipeline.py."""
    import json

    from diffusers import DDPMPipeline, DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (tmp_path / "pipeline.py").read_bytes() == PIPELINE_FILE.read_bytes()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    stock = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(stock) is DDPMPipeline
    ours = PunkDiffPipeline.from_pretrained(tmp_path)
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(ours.unet.state_dict()[name], tensor), name


PALETTE = torch.tensor([[99, 133, 150], [0, 0, 0], [255, 255, 255], [200, 30, 40]], dtype=torch.uint8)


def test_a_palette_snaps_every_final_image_and_travels_with_the_folder(tmp_path):
    """Pixel art: every output pixel is a palette colour (the nearest one), in samples, reconstructions and inpaints;
    `palette.json` is saved and loaded back, and stock diffusers still loads the folder."""
    from diffusers import DDPMPipeline

    from punkdiff.pipelines.punkdiff_pipeline import nearest_colour

    pipe = tiny_pipeline(channels=3)
    pipe.palette = PALETTE
    kwargs = dict(sampler="ddim", num_inference_steps=4, output_type="np")
    raw = pipe(batch_size=3, generator=generators(0, 1, 2), snap_to_palette=False, **kwargs).images
    snapped = pipe(batch_size=3, generator=generators(0, 1, 2), **kwargs).images
    colours = {tuple(c) for c in PALETTE.tolist()}
    assert {tuple(p) for p in (snapped * 255).round().astype(int).reshape(-1, 3).tolist()} <= colours
    expected = nearest_colour(torch.from_numpy(raw).permute(0, 3, 1, 2) * 2 - 1, PALETTE / 127.5 - 1)
    np.testing.assert_allclose(snapped, (expected.permute(0, 2, 3, 1).numpy() + 1) / 2, atol=1e-6)
    assert len({tuple(p) for p in (raw * 255).round().astype(int).reshape(-1, 3).tolist()}) > len(colours)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 1, 8, 8)
    for out in (pipe.reconstruct(image, t_start=500, generator=generators(0, 1), **kwargs).images,
                pipe.inpaint(image, mask, num_inference_steps=4, jump_length=1, jump_n_sample=1,
                             generator=generators(0, 1), output_type="np").images):
        assert {tuple(p) for p in (out * 255).round().astype(int).reshape(-1, 3).tolist()} <= colours

    pipe.save_pretrained(tmp_path)
    assert PunkDiffPipeline.from_pretrained(tmp_path).palette.tolist() == PALETTE.tolist()
    assert type(DDPMPipeline.from_pretrained(tmp_path)) is DDPMPipeline
    assert PunkDiffPipeline.from_pretrained(tmp_path).__call__(
        batch_size=3, generator=generators(0, 1, 2), **kwargs).images.tolist() == snapped.tolist()


def test_without_a_palette_nothing_is_snapped_or_saved(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "palette.json").exists()
    assert PunkDiffPipeline.from_pretrained(tmp_path).palette is None


def test_save_pretrained_push_to_hub_uploads_the_finished_folder(pipe, tmp_path, monkeypatch):
    """diffusers' own push inside save_pretrained would upload before `_class_name` and pipeline.py are fixed."""
    import json

    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    save_dir = tmp_path / "saved"
    with fake_hub(monkeypatch) as hub:
        pipe.save_pretrained(
            str(save_dir),  # a str: stock diffusers (the bug guarded against here) fails earlier on a Path
            push_to_hub=True,
            repo_id="someone/tiny",
            private=True,
            token="hf_test_token",
            commit_message="first",
        )
    [created] = hub.created
    assert created["organization"] == "someone" and created["name"] == "tiny"
    assert created.get("visibility") == "private" or created.get("private") is True
    [commit] = hub.commits
    assert commit["summary"] == "first" and not commit["create_pr"]
    assert json.loads(hub.uploaded["model_index.json"])["_class_name"] == "DDPMPipeline"
    assert hub.uploaded["pipeline.py"] == PIPELINE_FILE.read_bytes()
    assert {"README.md", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(
        hub.uploaded
    )
    assert {p.relative_to(save_dir).as_posix() for p in save_dir.rglob("*") if p.is_file()} == set(hub.uploaded)
    assert {r.headers.get("authorization") for r in hub.requests if r.url.path.startswith("/api/repos")} == {
        "Bearer hf_test_token"
    }
    # diffusers' own card: the pipeline knows nothing of punkdiff's (that one is written by punkdiff.hub's export)
    card = ModelCard(hub.uploaded["README.md"].decode())
    assert card.data.library_name == "diffusers" and "punkdiff" not in (card.data.tags or [])


def test_save_pretrained_writes_no_model_card(pipe, tmp_path):
    """The card is punkdiff.hub's (`export_pipeline`, `write_model_card`); a plain save writes the folder only."""
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model_index.json", "pipeline.py", "scheduler", "unet"}
    with pytest.raises(TypeError, match=r"writes no model card.*punkdiff\.hub\.write_model_card\(folder, info\)"):
        pipe.save_pretrained(tmp_path / "carded", model_card={"preset": "mnist-baseline-16"})
    assert not (tmp_path / "carded").exists()  # refused before anything was written


def test_push_to_hub_method_uploads_the_finished_folder_in_one_commit(pipe, tmp_path, monkeypatch):
    """diffusers' inherited `push_to_hub` saves through this class's `save_pretrained`: the same files as punkdiff's
    push of a saved folder, apart from the model card, in one commit."""
    from punkdiff.hub import push_to_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with fake_hub(monkeypatch) as by_method:
        pipe.push_to_hub("someone/tiny")
    pipe.save_pretrained(tmp_path / "saved")
    with fake_hub() as by_function:
        push_to_hub(tmp_path / "saved", "someone/tiny")
    assert [(c["organization"], c["name"]) for c in by_method.created] == [("someone", "tiny")]
    assert len(by_method.commits) == len(by_function.commits) == 1
    assert by_method.uploaded.keys() == by_function.uploaded.keys() | {"README.md"}
    for name in by_function.uploaded:
        assert by_method.uploaded[name] == by_function.uploaded[name], name


# ---- conditional models: labels, attributes, classifier-free guidance -------------------------------------------


def recorded_unet_calls(pipe: PunkDiffPipeline) -> list[tuple[int, torch.Tensor | None]]:
    """(batch size, class_labels) of every UNet forward from now on."""
    calls: list[tuple[int, torch.Tensor | None]] = []

    def hook(module, args, kwargs, output):
        labels = kwargs.get("class_labels")
        calls.append((args[0].shape[0], None if labels is None else labels.detach().clone()))

    pipe.unet.register_forward_hook(hook, with_kwargs=True)
    return calls


def manual_guided_ddim(pipe, condition, null, scale, seeds, steps=4) -> torch.Tensor:
    """Guided DDIM written out: two separate forwards per step, combined, then the exact DDIM step; images in [0, 1]."""
    encode = pipe.attribute_encoder or (lambda c: c)
    sched = ExactDDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn((1, *pipe._image_shape(1)[1:]), generator=g) for g in generators(*seeds)])
    for t in sched.timesteps:
        cond = pipe.unet(x, t, class_labels=encode(condition)).sample
        uncond = pipe.unet(x, t, class_labels=encode(null)).sample
        x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


DDIM4 = {"sampler": "ddim", "num_inference_steps": 4, "output_type": "pt"}


@pytest.fixture()
def digits() -> PunkDiffPipeline:
    return digit_pipeline()


@pytest.fixture()
def punks() -> PunkDiffPipeline:
    return punk_pipeline()


def test_guided_digits_take_one_doubled_forward_per_step_equal_to_two_separate_ones(digits):
    calls = recorded_unet_calls(digits)
    got = digits(labels=[3, 7], guidance_scale=3.0, generator=generators(0, 1), **DDIM4).images
    assert [n for n, _ in calls] == [4] * 4  # one forward of the doubled batch per step
    assert all(labels.tolist() == [3, 7, 10, 10] for _, labels in calls)  # the condition, then the null class
    with torch.no_grad():
        expected = manual_guided_ddim(digits, torch.tensor([3, 7]), torch.tensor([10, 10]), 3.0, (0, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    unguided = digits(labels=[3, 7], guidance_scale=1.0, generator=generators(0, 1), **DDIM4).images
    assert (got - unguided).abs().max() > 1e-3  # the guidance reaches the images


def test_guidance_scale_one_is_the_conditional_model_alone_and_zero_the_unconditional_one(digits):
    calls = recorded_unet_calls(digits)
    conditional = digits(labels=[3, 7], guidance_scale=1.0, generator=generators(0, 1), **DDIM4).images
    assert [(n, labels.tolist()) for n, labels in calls] == [(2, [3, 7])] * 4  # no doubled batch at w = 1
    with torch.no_grad():
        expected = manual_guided_ddim(digits, torch.tensor([3, 7]), torch.tensor([10, 10]), 1.0, (0, 1))
    torch.testing.assert_close(conditional, expected, atol=1e-6, rtol=0)
    calls.clear()
    unconditional = digits(labels=[3, 7], guidance_scale=0.0, generator=generators(0, 1), **DDIM4).images
    assert [(n, labels.tolist()) for n, labels in calls] == [(2, [10, 10])] * 4
    # a call without a condition samples the null class, unguided: the same images
    calls.clear()
    assert torch.equal(digits(batch_size=2, generator=generators(0, 1), **DDIM4).images, unconditional)
    assert [(n, labels.tolist()) for n, labels in calls] == [(2, [10, 10])] * 4
    assert (conditional - unconditional).abs().max() > 1e-3


def test_one_label_serves_the_whole_batch_and_names_equal_indices(digits):
    def run(**kwargs):
        return digits(guidance_scale=2.0, generator=generators(0, 1, 2), **kwargs, **DDIM4).images

    repeated = run(labels=7, batch_size=3)
    assert torch.equal(repeated, run(labels=[7, 7, 7]))
    assert torch.equal(repeated, run(labels=["7", "7", 7]))
    assert digits(labels=[1, 2, 3, 4], output_type="np", num_inference_steps=2, sampler="ddim").images.shape[0] == 4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_image_i_depends_only_on_its_generator(digits, sampler):
    kwargs = {"guidance_scale": 3.0, "num_inference_steps": 4, "sampler": sampler, "eta": 1.0, "output_type": "pt"}
    batch = digits(labels=[3, 7, 1], generator=generators(10, 11, 12), **kwargs).images
    single = digits(labels=[1], generator=generators(12), **kwargs).images
    torch.testing.assert_close(batch[2], single[0], atol=1e-5, rtol=0)
    other = digits(labels=[5], generator=generators(12), **kwargs).images
    assert (single - other).abs().max() > 1e-3  # and on its own label


def test_attributes_go_through_the_encoder_with_the_null_condition_as_zeros(punks):
    calls = recorded_unet_calls(punks)
    request = {"type": "Ape", "accessories": ["Cap", "3D Glasses"]}
    got = punks(attributes=request, batch_size=2, guidance_scale=2.5, generator=generators(0, 1), **DDIM4).images
    condition = PUNKS.encode_request(attributes=[request, request])
    assert condition[0].nonzero().flatten().tolist() == [1, 5, 6]  # Ape; 3D Glasses, Cap
    encoded = punks.attribute_encoder(torch.cat([condition, torch.zeros_like(condition)]))
    assert len(calls) == 4 and all(n == 4 and torch.equal(labels, encoded) for n, labels in calls)
    assert torch.equal(encoded[2:], torch.zeros(2, 64))  # the null condition adds nothing to the time embedding
    with torch.no_grad():
        expected = manual_guided_ddim(punks, condition, torch.zeros_like(condition), 2.5, (0, 1))
    # a random network at full scale amplifies the batched forward's float32 rounding over the steps, nothing more
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # a list asks for one request per image; a column left out is unspecified
    per_image = punks(attributes=[request, {"type": "Zombie"}], guidance_scale=2.5, generator=generators(0, 1),
                      **DDIM4).images
    torch.testing.assert_close(per_image[0], got[0], atol=1e-4, rtol=0)
    assert (per_image[1] - got[1]).abs().max() > 1e-3


def test_a_condition_is_checked_before_any_work(digits, punks, pipe):
    calls = recorded_unet_calls(digits) + recorded_unet_calls(punks)
    bad = [
        (punks, {"attributes": {"type": "Apex"}}, r"unknown type 'Apex'; closest: 'Ape'.*known type values \(5\): "
                                                    r"Alien, Ape, Zombie, Female, Male"),
        (punks, {"attributes": {"type": "Ape", "accessories": ["Capp"]}}, r"unknown accessories 'Capp'.*Cap"),
        (punks, {"attributes": {"hat": "Cap"}}, r"unknown attribute 'hat'; this model is conditioned on type "
                                                 r"\(single-label\), accessories \(multi-label\)"),
        (punks, {"labels": ["Bear"]}, r"unknown type 'Bear'"),  # labels name the one single-label column
        (digits, {"labels": [3, 12]}, r"label 12 is out of range: give an index in 0\.\.9 or a name"),
        (digits, {"labels": ["seven"]}, r"unknown label 'seven'.*known label values \(10\): 0, 1, 2"),
        (digits, {"labels": [3, 7], "batch_size": 3}, r"got 2 requests for a batch of 3 images; give one per image"),
        (digits, {"labels": [3], "guidance_scale": float("nan")}, r"guidance scale must be a finite number >= 0"),
        (digits, {"labels": [3], "guidance_scale": -1.0}, r"guidance scale must be a finite number >= 0"),
        (digits, {"guidance_scale": 3.0}, r"guidance_scale=3\.0 needs a condition to guide towards"),
        (digits, {"labels": [3], "attributes": {"label": 3}}, r"give either labels=\[\.\.\.\] or attributes"),
    ]
    for model, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            model(**kwargs, num_inference_steps=2, sampler="ddim")
    assert calls == []
    image = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"got 2 requests for a batch of 1 images"):
        digits.reconstruct(image, 100, labels=[3, 7])
    with pytest.raises(ValueError, match=r"label 10 is out of range"):
        digits.inpaint(image, torch.ones(1, 1, 8, 8), labels=10)
    assert calls == []
    for kwargs in ({"labels": [3]}, {"attributes": {"type": "Ape"}}):
        with pytest.raises(ValueError, match=r"this model is unconditional: it takes no labels= or attributes="):
            pipe(**kwargs)
    with pytest.raises(ValueError, match=r"guidance_scale=2\.0 needs a condition, and this model is unconditional"):
        pipe(guidance_scale=2.0)


def test_reconstruction_and_inpainting_denoise_towards_the_condition(digits, punks):
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = recorded_unet_calls(digits)
    kwargs = {"generator": generators(0, 1), **DDIM4}
    recon = digits.reconstruct(image, 600, labels=[3, 7], guidance_scale=3.0, **kwargs).images
    assert calls and all(n == 4 and labels.tolist() == [3, 7, 10, 10] for n, labels in calls)
    assert (recon - digits.reconstruct(image, 600, **kwargs).images).abs().max() > 1e-3
    # "give this punk a cap": the kept pixels stay, the masked ones follow the request
    punk = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :3, :] = 1.0
    calls = recorded_unet_calls(punks)
    inpaint = {"num_inference_steps": 6, "jump_length": 2, "jump_n_sample": 2, "output_type": "pt"}
    capped = punks.inpaint(punk, mask, attributes={"type": "Male", "accessories": ["Cap"]}, guidance_scale=3.0,
                           generator=generators(0), **inpaint).images
    encoded = punks.attribute_encoder(PUNKS.encode_request(attributes={"type": "Male", "accessories": ["Cap"]}))
    assert calls and all(n == 2 and torch.allclose(labels[:1], encoded, atol=1e-4) and not labels[1].any()
                         for n, labels in calls)
    torch.testing.assert_close(capped[..., 3:, :], punk[..., 3:, :], atol=1e-6, rtol=0)
    plain = punks.inpaint(punk, mask, generator=generators(0), **inpaint).images
    assert (capped[..., :3, :] - plain[..., :3, :]).abs().max() > 1e-3


def test_a_conditional_pipeline_refuses_parts_that_do_not_fit():
    from tiny_models import tiny_identity_unet, trained_looking_encoder

    with pytest.raises(ValueError, match=r"a condition of 10 classes needs a UNet with its own class embedding, "
                                         r"num_class_embeds=11.*got num_class_embeds=None"):
        PunkDiffPipeline(tiny_unet(1), DDPMScheduler(), condition=DIGITS)
    with pytest.raises(ValueError, match=r"needs an attribute_encoder and a UNet with class_embed_type='identity'"):
        PunkDiffPipeline(tiny_identity_unet(), DDPMScheduler(), condition=PUNKS)
    with pytest.raises(ValueError, match=r"the attribute_encoder takes 13 attributes but the condition is 12 wide"):
        PunkDiffPipeline(tiny_identity_unet(), DDPMScheduler(), trained_looking_encoder(13), PUNKS)
    bare = PunkDiffPipeline(tiny_unet(1, num_class_embeds=11), DDPMScheduler())
    with pytest.raises(ValueError, match=r"class-conditional but the pipeline has no condition vocabulary: put the "
                                         r"model's condition.json beside it"):
        bare(num_inference_steps=2)


def test_a_conditional_model_saves_its_vocabulary_and_loads_back_to_the_same_images(digits, punks, tmp_path):
    import json

    request = {"type": "Ape", "accessories": ["Cap"]}
    for name, model, kwargs in (("digits", digits, {"labels": [3, 7]}),
                                ("punks", punks, {"attributes": request, "batch_size": 2})):
        model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "condition.json").read_text() == model.condition.to_json() + "\n"
        loaded = PunkDiffPipeline.from_pretrained(tmp_path / name)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.condition == model.condition
        before = model(**kwargs, guidance_scale=3.0, generator=generators(0, 1), **DDIM4).images
        assert torch.equal(loaded(**kwargs, guidance_scale=3.0, generator=generators(0, 1), **DDIM4).images, before)
    half = PunkDiffPipeline.from_pretrained(tmp_path / "punks", dtype=torch.bfloat16)
    assert half.attribute_encoder.dtype == torch.bfloat16 == half.unet.dtype
    half.set_progress_bar_config(disable=True)
    assert half(attributes=request, guidance_scale=3.0, num_inference_steps=2, sampler="ddim",
                output_type="pt").images.isfinite().all()
    index = json.loads((tmp_path / "punks" / "model_index.json").read_text())
    assert index["attribute_encoder"] == ["punkdiff.pipelines.punkdiff_pipeline", "AttributeEncoder"]
    assert "attribute_encoder" not in json.loads((tmp_path / "digits" / "model_index.json").read_text())


def test_an_unconditional_folder_is_unchanged_by_the_conditional_parts(pipe, tmp_path):
    import json

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index == {"_class_name": "DDPMPipeline", "_diffusers_version": index["_diffusers_version"],
                     "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json", "pipeline.py", "scheduler", "unet"]
    loaded = PunkDiffPipeline.from_pretrained(tmp_path)
    assert loaded.condition is None and loaded.attribute_encoder is None


def test_stock_ddpm_pipeline_loads_a_conditional_model_and_stops_asking_for_class_labels(digits, punks, tmp_path):
    """Stock diffusers passes no class labels: its UNet says so before any image is made (no shape error)."""
    from diffusers import DDPMPipeline

    for name, model in (("digits", digits), ("punks", punks)):
        model.save_pretrained(tmp_path / name)
        stock = DDPMPipeline.from_pretrained(tmp_path / name)
        stock.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="class_labels should be provided when doing class conditioning"):
            stock(num_inference_steps=2)


# ---- named samplers, and the sampling a model recommends -----------------------------------------------------

NEW_SAMPLERS = ["ddim-trailing", "dpm++", "dpm++-karras", "unipc", "unipc-karras"]


def _count_unet_calls(pipe: PunkDiffPipeline) -> list[int]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    pipe.unet.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_each_named_sampler_samples_finite_images_with_one_network_call_per_step(sampler, steps):
    pipe = tiny_pipeline(channels=3)
    calls = _count_unet_calls(pipe)
    images = pipe(batch_size=2, generator=generators(0, 1), sampler=sampler, num_inference_steps=steps,
                  output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert calls[0] == steps  # network evaluations = the steps asked for


def _gaussian_pipeline(prediction_type: str) -> PunkDiffPipeline:
    """A pipeline whose "UNet" is the exact denoiser for x_0 ~ N(0, 0.5^2 I) (tiny_models.gaussian_denoiser)."""
    from types import SimpleNamespace

    from tiny_models import gaussian_denoiser

    scheduler = DDPMScheduler(clip_sample=False, prediction_type=prediction_type)
    model = gaussian_denoiser(scheduler.alphas_cumprod, prediction_type, data_std=0.5)
    unet = tiny_unet(channels=1)
    unet.forward = lambda x, t, *args, **kwargs: SimpleNamespace(sample=model(x, t))
    pipe = PunkDiffPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gap_to_exact(pipe: PunkDiffPipeline, sampler: str, steps: int) -> float:
    """Max |sample - exact| in [-1, 1]: for Gaussian data the probability-flow ODE from the first timestep t_0 maps
    x_{t_0} to x_0 = x_{t_0} * 0.5 / sqrt(0.25 ab + 1 - ab), ab = alpha_bar(t_0)."""
    from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

    sched = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    ab = pipe.scheduler.alphas_cumprod[int(sched.timesteps[0])]
    x_start = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = (x_start * 0.5 / (0.25 * ab + 1 - ab).sqrt()).clamp(-1, 1)
    got = pipe(batch_size=32, generator=torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=steps,
               eta=0.0, output_type="pt").images * 2 - 1
    return float((got - exact).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solvers_land_near_the_exact_answer_and_the_second_order_ones_nearer(prediction_type):
    """On the exact Gaussian denoiser, 20 steps of each deterministic sampler land near the exact ODE answer, the
    2nd-order solvers (DPM-Solver++ 2M, UniPC) several times nearer than DDIM; 4 steps are far from it."""
    pipe = _gaussian_pipeline(prediction_type)
    ddim = _gap_to_exact(pipe, "ddim-trailing", 20)
    assert ddim < 0.2
    for sampler in ("dpm++", "dpm++-karras", "unipc", "unipc-karras"):
        gap = _gap_to_exact(pipe, sampler, 20)
        assert gap < min(0.06, ddim / 2), (sampler, gap, ddim)
        assert _gap_to_exact(pipe, sampler, 4) > 0.2  # so the check above can fail
    assert _gap_to_exact(pipe, "dpm++", 50) < 0.01


def test_named_samplers_are_the_schedulers_they_say_whatever_the_saved_config():
    """DPM-Solver++ 2M / UniPC (Karras or not) start at t = T - 1 both for an in-memory scheduler and for one loaded
    from disk (from_config would otherwise drop the in-memory default "leading", but keep a saved one)."""
    import tempfile

    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

    fresh = DDPMScheduler()
    with tempfile.TemporaryDirectory() as folder:
        fresh.save_pretrained(folder)
        loaded = DDPMScheduler.from_pretrained(folder)
    for config in (fresh.config, loaded.config):
        dpm = SAMPLERS["dpm++-karras"].from_config(config)
        assert type(dpm) is DPMSolverMultistepScheduler and dpm.config.algorithm_type == "dpmsolver++"
        assert dpm.config.solver_order == 2 and dpm.config.use_karras_sigmas
        assert not SAMPLERS["dpm++"].from_config(config).config.use_karras_sigmas
        assert type(SAMPLERS["unipc-karras"].from_config(config)) is UniPCMultistepScheduler
        for name in ("dpm++", "dpm++-karras", "unipc", "unipc-karras", "ddim-trailing"):
            sched = SAMPLERS[name].from_config(config)
            sched.set_timesteps(4)
            assert int(sched.timesteps[0]) == 999 and len(sched.timesteps) == 4, name
        ddim = SAMPLERS["ddim"].from_config(config)
        ddim.set_timesteps(4)
        assert ddim.timesteps.tolist() == [750, 500, 250, 0]  # the saved config's spacing ("leading")
    assert [n for n, s in SAMPLERS.items() if s.uses_eta] == ["ddim", "ddim-trailing"]


def test_an_unknown_sampler_is_refused_with_the_names(pipe):
    from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

    with pytest.raises(ValueError, match="Unknown sampler 'dpm2'") as err:
        pipe(sampler="dpm2")
    assert all(name in str(err.value) for name in SAMPLERS)


def test_a_saved_recommendation_is_what_a_call_without_arguments_samples_with(tmp_path):
    from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig

    pipe = tiny_pipeline(channels=1)
    pipe.save_pretrained(tmp_path / "old")
    old = PunkDiffPipeline.from_pretrained(tmp_path / "old")
    assert old.sampling_config is None and not (tmp_path / "old" / "sampling.json").exists()
    calls = _count_unet_calls(old)
    old(num_inference_steps=None)  # no recommendation: today's default, every training step of DDPM
    assert calls[0] == 1000

    pipe.sampling_config = SamplingConfig("ddim-trailing", 3, 1.0)
    pipe.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "sampling.json").read_text()) == {
        "sampler": "ddim-trailing", "num_inference_steps": 3, "eta": 1.0}
    new = PunkDiffPipeline.from_pretrained(tmp_path / "new")
    assert new.sampling_config == SamplingConfig("ddim-trailing", 3, 1.0)
    calls = _count_unet_calls(new)

    def run(**kwargs):
        return new(batch_size=2, generator=generators(0, 1), output_type="pt", **kwargs).images

    default = run()
    assert calls[0] == 3
    assert torch.equal(default, run(sampler="ddim-trailing", num_inference_steps=3, eta=1.0))
    assert not torch.equal(default, run(eta=0.0))  # an explicit argument wins
    assert calls[0] == 9
    run(num_inference_steps=5)
    assert calls[0] == 14
    # another sampler keeps its own defaults (50 steps, eta 0), not those chosen with the recommended one
    run(sampler="ddim")
    assert calls[0] == 64
    assert torch.equal(run(sampler="ddim", num_inference_steps=3), run(sampler="ddim", num_inference_steps=3, eta=0.0))


def test_a_student_sampled_at_another_step_count_warns_once():
    import warnings

    from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig

    pipe = tiny_pipeline(channels=1)
    pipe.sampling_config = SamplingConfig("ddim-trailing", 2, 0.0, distilled_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipe()  # its own count: no warning
        pipe(sampler="dpm++", num_inference_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: each warning once
        for _ in range(3):
            pipe(num_inference_steps=4)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "distilled to sample in 2 steps" in messages[0] and "asks for 4" in messages[0]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "JSON object"),
        ({"sampler": "euler", "num_inference_steps": 50}, "sampler must be one of ddpm, ddim, ddim-trailing"),
        ({"sampler": ["ddim"], "num_inference_steps": 50}, "sampler must be one of ddpm, ddim, ddim-trailing"),
        ({"sampler": "ddim", "num_inference_steps": 0}, "num_inference_steps must be a positive integer, got 0"),
        ({"sampler": "ddim", "num_inference_steps": True}, "num_inference_steps must be a positive integer"),
        ({"sampler": "ddim", "num_inference_steps": 50, "eta": 1.5}, "eta must be a number in [0, 1], got 1.5"),
        ({"sampler": "ddim", "num_inference_steps": 50, "eta": "1"}, "eta must be a number in [0, 1]"),
        ({"sampler": "ddim", "num_inference_steps": 4, "distilled_steps": 4.0}, "distilled_steps must be a positive"),
        ({"sampler": "ddim", "num_inference_steps": 50, "steps": 4}, "unknown key 'steps'"),
    ],
)
def test_sampling_config_refuses_what_it_cannot_use(data, problem):
    from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig

    with pytest.raises(ValueError) as err:
        SamplingConfig.from_dict(data)
    assert problem in str(err.value)
