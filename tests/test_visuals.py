"""Sample grids, GIFs and loss curves are real images with the content they claim."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler
from tiny_models import tiny_pipeline

from punkdiff.visuals import (
    denoising_gif,
    display_scale,
    image_grid,
    noising_gif,
    plot_loss_curve,
    save_gif,
    to_pil,
)


def test_to_pil_maps_model_space_to_pixels():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    (image,) = to_pil(x)
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 128], [255, 255]]  # 0 -> 127.5 rounds to 128; clamped above
    assert to_pil(torch.zeros(2, 3, 4, 4))[1].mode == "RGB"


def test_grid_places_tiles_in_rows_and_scales_with_nearest():
    tiles = [PIL.Image.new("L", (4, 4), v) for v in (10, 20, 30, 40, 50)]
    grid = image_grid(tiles, cols=3, scale=2)
    assert grid.size == (3 * 4 * 2, 2 * 4 * 2)
    pixels = np.asarray(grid.convert("L"))
    assert pixels[0, 0] == 10 and pixels[0, 8] == 20 and pixels[8, 8] == 50
    assert pixels[8, 16] == 0  # the empty sixth slot
    assert set(np.unique(pixels)) == {0, 10, 20, 30, 40, 50}  # nearest: no blended values
    assert display_scale(16) == 6 and display_scale(128) == 1


def test_gif_loops_and_holds_the_last_frame(tmp_path):
    frames = [PIL.Image.new("L", (8, 8), v) for v in (0, 100, 200)]
    gif = PIL.Image.open(save_gif(frames, tmp_path / "a.gif", duration_ms=40, hold_last_ms=900))
    assert gif.n_frames == 3 and gif.info["loop"] == 0
    gif.seek(2)
    assert gif.info["duration"] == 900
    assert np.asarray(gif.convert("L"))[0, 0] == 200


def test_noising_gif_goes_from_the_image_to_noise(tmp_path):
    image = torch.ones(1, 1, 8, 8) * 0.8
    gif = PIL.Image.open(noising_gif(image, DDPMScheduler(), tmp_path / "n.gif", num_frames=5))
    assert gif.n_frames == 5
    tile = slice(1, 1 + 8 * display_scale(8))  # inside the first tile's 1-pixel border
    first = np.asarray(gif.convert("L"), dtype=float)[tile, tile]
    gif.seek(4)
    last = np.asarray(gif.convert("L"), dtype=float)[tile, tile]
    assert first.std() < 5 and last.std() > 30  # t=0 is the flat image; t=T-1 is noise


def test_denoising_gif_has_x_t_beside_predicted_x0(tmp_path):
    pipe = tiny_pipeline(channels=1, sample_size=8)
    gif = PIL.Image.open(denoising_gif(pipe, tmp_path / "d.gif", num_images=4, num_inference_steps=10))
    assert gif.n_frames == 10
    tile = 8 * display_scale(8, target=64) + 2  # a 1-pixel grey border around each tile
    assert gif.size == (2 * 2 * tile + 8, 2 * tile)
    gif.seek(gif.n_frames - 1)
    last = np.asarray(gif.convert("L"), dtype=float)
    left, right = last[:, : 2 * tile], last[:, 2 * tile + 8 :]
    # DDIM's last step lands on alpha_bar = 1: the final x_t *is* the predicted x_0 (GIF palette aside)
    assert np.abs(left - right).mean() < 3
    gif.seek(0)
    first = np.asarray(gif.convert("L"), dtype=float)
    assert np.abs(first[:, : 2 * tile] - first[:, 2 * tile + 8 :]).mean() > 20  # noise beside a prediction


def test_loss_curve_is_a_png(tmp_path):
    steps = list(range(1, 201))
    path = plot_loss_curve(steps, [1 / s for s in steps], tmp_path / "loss.png", title="t")
    image = PIL.Image.open(path)
    assert image.format == "PNG" and image.size == (700, 400)
    assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


def test_grid_gap_separates_tiles_with_grey():
    tiles = [PIL.Image.new("L", (4, 4), 255) for _ in range(4)]
    grid = np.asarray(image_grid(tiles, scale=2, gap=1).convert("L"))
    assert grid.shape == (2 * (8 + 2), 2 * (8 + 2))
    assert grid[0, 0] == 128 and grid[9, 5] == 128 and grid[10, 5] == 128  # borders between rows
    assert grid[1, 1] == 255 and grid[11, 11] == 255
