"""What an evaluation leaves on disk: `metrics.json`, `report.md` and the PNG figures it embeds.

Every metric is printed beside its real-vs-real floor; a metric that could not be computed says why instead of
showing a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from punkdiff.files import write_json, write_text
from punkdiff.metrics.evaluation import Evaluation
from punkdiff.visuals import display_scale, image_grid


def _pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 `[N, C, H, W]` (or float in [0, 1]) -> PIL images."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    hwc = np.moveaxis(images, 1, -1)
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in hwc]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grid(samples: np.ndarray, path: Path, count: int = 64) -> Path:
    """The first `count` samples in a square grid, upscaled so pixel art stays crisp."""
    image_grid(_pil(samples[:count]), scale=display_scale(samples.shape[-1], 64), gap=1).save(path)
    return path


def nearest_sheet(samples: np.ndarray, training: np.ndarray, nearest_index: np.ndarray, path: Path,
                  count: int = 16) -> Path:
    """Pairs of columns: a sample, then its nearest training image (pixel space)."""
    tiles = [image for i in range(min(count, len(samples)))
             for image in _pil(np.stack([samples[i], training[nearest_index[i]]]))]
    image_grid(tiles, cols=8, scale=display_scale(samples.shape[-1], 64), gap=1).save(path)
    return path


def histogram_figure(histograms: dict[str, Any], path: Path) -> Path:
    """Predicted class shares of the samples beside the held-out real images' and the true held-out shares."""
    plt = _pyplot()
    names = histograms["class_names"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3.5), dpi=100)
    bars = [("model", "samples (predicted)"), ("floor", "held-out real (predicted)"),
            ("heldout_true", "held-out real (true labels)")]
    for offset, (key, label) in zip((-0.27, 0, 0.27), bars, strict=True):
        ax.bar(x + offset, histograms[key], width=0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of images")
    ax.set_title("class histogram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reconstruction_figures(study: dict[str, Any], originals: np.ndarray, folder: Path, count: int = 8) -> list[Path]:
    """`reconstruction_curves.png` (MSE and SSIM against t) and `reconstruction.png` (for each t, rows of
    original / noised / reconstructed)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    left.plot(study["t"], study["mse"], marker="o")
    left.set(xlabel="t (noise level)", ylabel="MSE (pixels in [0, 1])", title="reconstruction error")
    right.plot(study["t"], study["ssim"], marker="o", color="tab:green")
    right.set(xlabel="t (noise level)", ylabel="SSIM", title="structural similarity", ylim=(0, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    curves = folder / "reconstruction_curves.png"
    fig.savefig(curves)
    plt.close(fig)
    rows = []
    for noised, reconstructed in zip(study["noised"], study["reconstructed"], strict=True):
        rows += _pil(originals[:count]) + _pil(noised[:count]) + _pil(reconstructed[:count])
    sheet = folder / "reconstruction.png"
    image_grid(rows, cols=count, scale=display_scale(originals.shape[-1], 48), gap=1).save(sheet)
    return [curves, sheet]


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_metrics(evaluation: Evaluation) -> str:
    """The metrics as a plain-text table for a terminal: name, model, floor, which way is better."""
    lines = [f"{'metric':<30}{'model':>12}{'floor':>12}  better"]
    for name, m in evaluation.metrics.items():
        lines.append(f"{name:<30}{_format(m['model']):>12}{_format(m['floor']):>12}  {m['better']}")
    lines += [f"{name:<30}  {reason}" for name, reason in evaluation.not_computed.items()]
    return "\n".join(lines)


_CONDITIONAL_SCORES = (("accuracy", "requested class drawn (accuracy)", "higher"),
                       ("label_recall", "requested labels found (recall)", "higher"),
                       ("spurious_per_image", "labels found, not requested, per image", "lower"))


def format_conditional(conditional: dict[str, Any]) -> str:
    """A conditional model's scores (requests as the data) beside the held-out floor, for a terminal."""
    generated, floor = conditional["generated"], conditional["floor"]
    lines = [f"{'asked vs drawn (guidance ' + format(conditional['guidance_scale'], 'g') + ')':<42}"
             f"{'model':>10}{'floor':>10}  better"]
    lines += [f"{label:<42}{_format(generated[key]):>10}{_format(floor[key]):>10}  {better}"
              for key, label, better in _CONDITIONAL_SCORES if generated[key] is not None]
    return "\n".join(lines)


def conditional_lines(conditional: dict[str, Any]) -> list[str]:
    """The report's section for a conditional model: overall scores, per class and per label, beside the floor
    (every held-out real image against its true condition)."""
    generated, floor, balanced = conditional["generated"], conditional["floor"], conditional.get("balanced")
    lines = ["", f"## Conditional: what was asked against what was drawn (guidance {conditional['guidance_scale']:g})",
             "", "Requests drawn as the data (training rows' conditions); the floor is the classifier on held-out",
             "real images with their true conditions (what it gets right itself).", "",
             f"| score | model ({generated['num_images']} images) | floor ({floor['num_images']} images) | better |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {_format(generated[key])} | {_format(floor[key])} | {better} |"
              for key, label, better in _CONDITIONAL_SCORES if generated[key] is not None]
    if generated["unscored_labels"]:
        lines.append(f"\n{generated['unscored_labels']} requested labels are unknown to the classifier and left out.")
    classes = list(dict.fromkeys([*floor["per_class"], *generated["per_class"], *(balanced or {}).get("per_class",
                                                                                                      {})]))
    if classes:
        lines += ["", "### Per class", "",
                  "`as the data`: requests drawn as the data; `balanced`: the same number of requests per class.", "",
                  "| class | requested (as the data) | accuracy | requested (balanced) | accuracy (balanced) | "
                  "floor: held-out images | floor accuracy |", "|---|---|---|---|---|---|---|"]
        for name in classes:
            cells = [_cell(side, name, "accuracy") for side in (generated, balanced, floor)]
            lines.append(f"| {name} | {' | '.join(c for pair in cells for c in pair)} |")
    labels = list(dict.fromkeys([*floor["per_label_recall"], *generated["per_label_recall"]]))
    if labels:
        lines += ["", "### Per label (recall)", "",
                  "| label | requested | recall | floor: held-out images | floor recall |", "|---|---|---|---|---|"]
        for name in sorted(labels, key=lambda n: -generated["per_label_recall"].get(n, {}).get("requested", 0)):
            cells = [_cell(side, name, "recall", "per_label_recall") for side in (generated, floor)]
            lines.append(f"| {name} | {' | '.join(c for pair in cells for c in pair)} |")
    return lines


def _cell(scores: dict[str, Any] | None, name: str, key: str, table: str = "per_class") -> tuple[str, str]:
    """(requested count, score) of one class or label in one set of scores; `0`, `n/a` where it was not asked."""
    entry = (scores or {}).get(table, {}).get(name)
    return ("0", "n/a") if entry is None else (str(entry["requested"]), _format(entry[key]))


def write_report(
    evaluation: Evaluation,
    folder: str | Path,
    *,
    training_images: np.ndarray,
    info: dict[str, Any],
    reconstruction: tuple[dict[str, Any], np.ndarray] | None = None,
    conditional: dict[str, Any] | None = None,
) -> Path:
    """Write `metrics.json`, `report.md` and the figures into `folder`; returns the report's path.

    `info` (model, reference, sampler, timings ...) goes into both files as it is; `reconstruction` is the study
    and the original images it used; `conditional` a conditional model's scores
    (`punkdiff.metrics.conditional.conditional_evaluation`), under `"conditional"` in `metrics.json`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"samples": sample_grid(evaluation.samples, folder / "samples.png"),
               "nearest": nearest_sheet(evaluation.samples, training_images, evaluation.nearest_index,
                                        folder / "nearest_training_images.png")}
    if evaluation.histograms:
        figures["histogram"] = histogram_figure(evaluation.histograms, folder / "class_histogram.png")
    data = {**info, **evaluation.to_json()}
    if reconstruction is not None:
        study, originals = reconstruction
        figures["curves"], figures["reconstruction"] = reconstruction_figures(study, originals, folder)
        data["reconstruction"] = {k: study[k] for k in ("t", "mse", "ssim")}
    if conditional is not None:
        data["conditional"] = conditional
    write_json(folder / "metrics.json", data)

    lines = ["# punkdiff evaluation", ""]
    lines += [f"- **{k}**: {_format(v)}" for k, v in info.items() if not isinstance(v, dict)]
    lines += [f"- **images compared**: {evaluation.num_images} per set",
              f"- **feature space**: {evaluation.feature_space}"]
    if evaluation.palette_size:
        lines.append(f"- **pixel art**: samples snapped to the {evaluation.palette_size}-colour training palette")
    if evaluation.classifier_scores:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.classifier_scores.items())
        lines.append(f"- **classifier, on held-out real images**: {scores}")
    lines += ["", "## Metrics", "",
              "The floor is the same metric for held-out real images in place of the samples (what a model that",
              "draws new images from the data distribution would score).", "",
              "| metric | model | real-vs-real floor | better |", "|---|---|---|---|"]
    lines += [f"| {name} | {_format(m['model'])} | {_format(m['floor'])} | {m['better']} |"
              for name, m in evaluation.metrics.items()]
    lines += [f"| {name} | {reason} | | |" for name, reason in evaluation.not_computed.items()]
    if conditional is not None:
        lines += conditional_lines(conditional)
    if reconstruction is not None:
        study = reconstruction[0]
        lines += ["", "## Reconstruction (noise to t, denoise back)", "", "| t | MSE | SSIM |", "|---|---|---|"]
        lines += [f"| {t} | {mse:.4g} | {ssim:.4f} |" for t, mse, ssim in zip(study["t"], study["mse"], study["ssim"],
                                                                              strict=True)]
    lines += ["", "## Figures", ""]
    captions = {"samples": "Samples", "histogram": "Class histogram: samples vs real",
                "nearest": "Each sample (left) beside its nearest training image (right)",
                "curves": "Reconstruction error against t",
                "reconstruction": "For each t: originals, noised, reconstructed"}
    lines += [f"**{captions[k]}**\n\n![{captions[k]}]({p.name})\n" for k, p in figures.items()]
    report = folder / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report
