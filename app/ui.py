"""The Gradio page: a model picker, then Generate, Inpaint & reconstruct, Train and Evaluate tabs.

Each handler parses widget values, calls `punkdiff.studio`, `punkdiff.runs` or `punkdiff.eval_runs`, and
shapes the result for the page; a mistake (a path outside the app's folders, a number out of range, a run
that failed) becomes a message in the page, and the server goes on serving.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
import time
import traceback
import weakref
from pathlib import Path

import gradio as gr

from punkdiff import studio
from punkdiff.eval_runs import MAX_SAMPLES, EvalManager, EvalRequest, default_reference, eval_available
from punkdiff.jobs import STATUS_TEXT, stop_launched
from punkdiff.presets import DDIM_ETA, PRESETS
from punkdiff.roots import Roots, resolve_dataset
from punkdiff.runs import RunManager, TrainRequest, suggest_dataset
from punkdiff.visuals import loss_curve_figure

TITLE = "punkdiff"
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#run-status h3 { margin-bottom: 0.2em; }
footer { display: none !important; }
"""
REFRESH_S = 2.0
# what a mistake in the page raises (a path outside the roots, a missing folder, a number out of range)
_USER_ERRORS = (ValueError, PermissionError, FileNotFoundError, RuntimeError, OSError)
_NO_EVALUATION = "No evaluation yet: check the reference and press **Evaluate**."
_SERVED: weakref.WeakKeyDictionary[gr.Blocks, Roots] = weakref.WeakKeyDictionary()  # the folders each page serves


def build_app(roots: Roots, max_runs: int = 1) -> gr.Blocks:
    """The whole page for `roots`; at most `max_runs` trainings at a time. Serve it with `launch`."""
    # Gradio's copies of shown files go under the run root, like everything else the app writes.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(roots.runs / ".gradio"))
    models = studio.ModelCache()
    runs = RunManager(roots, max_active=max_runs)
    evaluations = EvalManager(roots)
    generated = roots.runs / "generated"

    def model_choices() -> list[tuple[str, str]]:
        return [(roots.relative_name(p, "models"), str(p)) for p in studio.find_models(roots)]

    def dataset_choices() -> list[tuple[str, str]]:
        found = [(roots.relative_name(p, "data"), str(p)) for p in studio.find_datasets(roots)]
        return found + [("sklearn-digits (built in)", "sklearn-digits")]

    def load(model_ref: str):
        return models.load(studio.resolve_model(model_ref, roots))

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(
            "# punkdiff\nTrain, watch, sample, inpaint and evaluate unconditional diffusion models "
            "(MNIST digits, CryptoPunks, faces). Models are Diffusers folders; everything runs on this machine."
        )
        with gr.Row():
            choices = model_choices()
            model = gr.Dropdown(
                choices, value=choices[0][1] if choices else None, label="Model",
                info="an exported model folder (a finished run's pipeline/), or a Hub id (owner/name) when online",
                allow_custom_value=True, scale=4, elem_id="model",
            )
            refresh_models = gr.Button("↻ Refresh", scale=0, min_width=100, size="sm")
        model_text = gr.Markdown(elem_id="model-info")

        def describe_model(model_ref: str) -> str:
            if not model_ref:
                return "No model yet: train one in the **Train** tab, then pick its `pipeline` folder here."
            try:
                _, info = load(model_ref)
            except _USER_ERRORS as err:  # said once, here; the tabs keep what they show until a model loads
                gr.Warning(str(err), title="Cannot use this model")
                return f"**Cannot use this model**: {err}"
            return f"**{roots.relative_name(info.path, 'models')}**: {info.describe()}"

        refresh_models.click(lambda: gr.update(choices=model_choices()), outputs=model)
        model.focus(lambda: gr.update(choices=model_choices()), outputs=model, show_progress="hidden")
        model.change(describe_model, model, model_text)
        demo.load(describe_model, model, model_text)

        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(demo, model, load, generated)
            with gr.Tab("Inpaint & reconstruct", id="inpaint"):
                _inpaint_tab(demo, model, load, roots, dataset_choices, generated)
            with gr.Tab("Train", id="train"):
                _train_tab(roots, runs, dataset_choices)
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(demo, model, roots, evaluations, dataset_choices)

        folders = ", ".join(f"`{p}`" for p in roots.of("models")) or "none"
        data = ", ".join(f"`{p}`" for p in roots.of("data")) or "none"
        gr.Markdown(
            f"<small>Models from {folders} · data from {data} · runs and images written to `{roots.runs}`. "
            "Paths outside these folders are refused.</small>"
        )
    _SERVED[demo] = roots
    return demo


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **kwargs):
    """Serve the page; `host` None means GRADIO_SERVER_NAME or 127.0.0.1 (Gradio's own default).

    Gradio serves the files the page shows (grids, animations, training samples) from the run root, wherever it
    is, and nothing from the decoded-data cache in it. The trainings and evaluations the page started are stopped
    when the server closes (Ctrl-C, or SIGTERM from a service manager): a training run saves a checkpoint first.
    """
    roots = _SERVED.get(demo)
    if roots is not None:
        kwargs.setdefault("allowed_paths", [str(roots.runs)])
        kwargs.setdefault("blocked_paths", [str(roots.runs / ".cache")])
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _close_on_sigterm)
    try:
        return demo.launch(
            server_name=host, server_port=port, share=share, theme=gr.themes.Default(), css=CSS,
            footer_links=[], run_history=False, show_error=True, **kwargs,
        )
    finally:
        if not kwargs.get("prevent_thread_lock"):  # the server has closed: nothing it started runs on unwatched
            stop_launched()


# --- tabs ---------------------------------------------------------------------------------------------


def _generate_tab(demo: gr.Blocks, model, load, generated: Path) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            scheduler = gr.Radio(list(studio.SCHEDULERS), value="DDIM", label="Sampler",
                                 info="DDIM and DPM-Solver++ need few steps; DDPM is the training process itself")
            steps = gr.Slider(1, 1000, value=50, step=1, label="Steps", elem_id="gen-steps")
            eta = gr.Slider(0, 1, value=DDIM_ETA, step=0.05, label="eta (DDIM only)",
                            info="0: deterministic; 1: as noisy as DDPM")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                batch = gr.Slider(1, studio.MAX_BATCH, value=16, step=1, label="Images")
            run = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="Samples", type="pil", elem_id="gen-grid", elem_classes="pixelated",
                            buttons=["download", "fullscreen"], interactive=False)
            animation = gr.Image(label="Denoising: x_t (left) beside the predicted x_0 (right)", type="filepath",
                                 elem_id="gen-animation", elem_classes="pixelated", interactive=False)
            files = gr.File(label="Download the grid and the animation", file_count="multiple", interactive=False)

    @_friendly
    def generate(model_ref, scheduler, steps, eta, seed, batch, progress=gr.Progress()):
        pipe, info = load(model_ref)
        progress(0, desc="loading")
        result = studio.sample(pipe, info, scheduler, steps, eta, seed, batch, generated,
                               progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        return result.grid, str(result.animation_path), [str(result.grid_path), str(result.animation_path)]

    run.click(generate, [model, scheduler, steps, eta, seed, batch], [grid, animation, files],
              concurrency_id="sampling", concurrency_limit=1)
    fit = functools.partial(_fit_steps, load)
    model.change(fit, [model, steps], steps, show_progress="hidden")
    demo.load(fit, [model, steps], steps, show_progress="hidden")


def _inpaint_tab(demo: gr.Blocks, model, load, roots: Roots, dataset_choices, generated: Path) -> None:
    source = gr.State()  # the real image as loaded or uploaded, before the model's preparation
    gr.Markdown(
        "Pick a real image, **paint over** what the model should replace (a punk's hat, a digit's stroke), "
        "then press **Inpaint**: RePaint fills the painted part with the unconditional model and keeps the rest. "
        "Or reconstruct the whole image after noising it to step t."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            datasets = dataset_choices()
            dataset = gr.Dropdown(datasets, value=datasets[0][1] if datasets else None, label="Dataset",
                                  allow_custom_value=True, elem_id="inpaint-dataset")
            with gr.Row():
                index = gr.Number(0, label="Image number", precision=0, minimum=0, elem_id="inpaint-index")
                split = gr.Textbox("train", label="Split")
            with gr.Row():
                pick = gr.Button("Load image", elem_id="load-image")
                lucky = gr.Button("Random image")
            upload = gr.Image(label="…or upload an image", type="pil", image_mode=None,
                              sources=["upload", "clipboard"], height=160)
        with gr.Column(scale=2):
            editor = gr.ImageEditor(
                label="Paint over what to replace", type="numpy", image_mode="RGBA", sources=(), transforms=(),
                layers=False, format="png", canvas_size=(384, 384), elem_id="mask-editor", elem_classes="pixelated",
                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
            )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            with gr.Accordion("RePaint settings", open=False):
                steps = gr.Slider(10, 1000, value=100, step=10, label="Steps", elem_id="inpaint-steps")
                jump = gr.Slider(1, 50, value=10, step=1, label="Jump length", elem_id="inpaint-jump",
                                 info="how far back in time each resampling jump goes")
                resample = gr.Slider(1, 20, value=5, step=1, label="Resampling", elem_id="inpaint-resample",
                                     info="jumps per segment: more harmonises better, costs more")
            with gr.Row():
                fills = gr.Slider(1, 8, value=4, step=1, label="Fills", elem_id="inpaint-fills")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            inpaint = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")
        with gr.Column(scale=2):
            inpainted = gr.Image(label="Original · what is replaced · fills", type="pil", elem_id="inpaint-result",
                                 elem_classes="pixelated", interactive=False, buttons=["download", "fullscreen"])
    gr.Markdown("### Reconstruct from step t")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            t_start = gr.Slider(0, 999, value=300, step=1, label="Noise to step t",
                                info="small t keeps the image, large t keeps only its rough layout")
            rec_scheduler = gr.Radio(list(studio.SCHEDULERS), value="DDIM", label="Sampler")
            rec_steps = gr.Slider(1, 1000, value=50, step=1, label="Steps (over the whole schedule)")
            reconstruct = gr.Button("Reconstruct", elem_id="reconstruct-button")
        with gr.Column(scale=2):
            rebuilt = gr.Image(label="Original · reconstruction", type="pil", elem_classes="pixelated",
                               interactive=False)
            rec_text = gr.Markdown()
            rec_animation = gr.Image(label="x_t beside the predicted x_0, step by step", type="filepath",
                                     elem_classes="pixelated", interactive=False)

    def editor_value(image, model_ref):
        _, info = load(model_ref)
        shown = studio.upscale(studio.prepare_image(image, info).convert("RGBA"), 384)
        return {"background": shown, "layers": [], "composite": shown}

    @_friendly
    def from_dataset(model_ref, dataset_ref, number, split_name):
        image = studio.dataset_image(resolve_dataset(roots, dataset_ref), number, split_name or "train")
        return image, editor_value(image, model_ref)

    @_friendly
    def random_index(dataset_ref, split_name):
        from punkdiff.data import load_image_dataset

        loaded, _ = load_image_dataset(resolve_dataset(roots, dataset_ref), split_name or "train")
        return random.randrange(len(loaded))

    @_friendly
    def from_upload(model_ref, image):
        if image is None:
            return gr.skip(), gr.skip()
        return image, editor_value(image, model_ref)

    def adapt_to_model(model_ref, image, inpaint_steps, reconstruct_steps):
        """A new model: its range of t and of steps, the dataset it was trained on, the image prepared for it."""
        try:
            _, info = load(model_ref)
        except _USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        last = info.num_train_timesteps - 1
        known = [v for _, v in dataset_choices()]
        return (
            gr.update(maximum=last, value=min(round(0.3 * last), last)),
            info.trained_on if info.trained_on in known else gr.skip(),
            editor_value(image, model_ref) if image is not None else gr.skip(),
            _fit_steps(load, model_ref, inpaint_steps),
            _fit_steps(load, model_ref, reconstruct_steps),
        )

    @_friendly
    def run_inpaint(model_ref, image, painted, steps, jump, resample, fills, seed,
                    progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise studio.StudioError("Load or upload an image first.")
        pipe, info = load(model_ref)
        real = studio.prepare_image(image, info)
        mask = studio.mask_from_layers((painted or {}).get("layers") or [], info.resolution)
        filled = studio.inpaint(pipe, real, mask, steps, jump, resample, seed, fills)
        return studio.side_by_side([real, studio.show_mask(real, mask), *filled], target=160)

    @_friendly
    def run_reconstruct(model_ref, image, t, scheduler, steps, progress=gr.Progress()):
        if image is None:
            raise studio.StudioError("Load or upload an image first.")
        pipe, info = load(model_ref)
        real = studio.prepare_image(image, info)
        result, mse, animation = studio.reconstruct(
            pipe, info, real, t, scheduler, steps, 0, generated,
            progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"),
        )
        text = f"Mean squared error to the original: **{mse:.4f}** (pixels in [0, 1]), from t = {int(t)}."
        return studio.side_by_side([real, result], target=192), text, str(animation)

    pick.click(from_dataset, [model, dataset, index, split], [source, editor])
    lucky.click(random_index, [dataset, split], index).success(
        from_dataset, [model, dataset, index, split], [source, editor])
    upload.upload(from_upload, [model, upload], [source, editor])
    adapted = [t_start, dataset, editor, steps, rec_steps]
    model.change(adapt_to_model, [model, source, steps, rec_steps], adapted)
    demo.load(adapt_to_model, [model, source, steps, rec_steps], adapted)
    inpaint.click(run_inpaint, [model, source, editor, steps, jump, resample, fills, seed], inpainted,
                  concurrency_id="sampling", concurrency_limit=1)
    reconstruct.click(run_reconstruct, [model, source, t_start, rec_scheduler, rec_steps],
                      [rebuilt, rec_text, rec_animation], concurrency_id="sampling", concurrency_limit=1)


def _train_tab(roots: Roots, runs: RunManager, dataset_choices) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### New run")
            preset = gr.Dropdown(list(PRESETS), value="mnist-fast-16", label="Preset", elem_id="train-preset",
                                 info="`punkdiff presets` lists them")
            datasets = dataset_choices()
            dataset = gr.Dropdown(datasets, value=suggest_dataset("mnist-fast-16", [v for _, v in datasets]),
                                  label="Dataset", info="a folder under the data roots, or a Hub id when online",
                                  allow_custom_value=True, elem_id="train-dataset")
            name = gr.Textbox(label="Run name", placeholder="default: preset and time", elem_id="train-name")
            defaults = PRESETS["mnist-fast-16"].train
            with gr.Row():
                max_steps = gr.Number(1000, label="Steps", precision=0, elem_id="train-steps")
                batch = gr.Number(defaults.batch_size, label="Batch size", precision=0, elem_id="train-batch")
            with gr.Row():
                lr = gr.Number(defaults.learning_rate, label="Learning rate")
                warmup = gr.Number(defaults.lr_warmup_steps, label="Warmup steps", precision=0, elem_id="train-warmup")
            with gr.Row():
                sample_every = gr.Number(250, label="Samples every", precision=0, elem_id="train-sample-every")
                checkpoint_every = gr.Number(250, label="Checkpoint every", precision=0,
                                             elem_id="train-checkpoint-every")
            with gr.Row():
                max_images = gr.Number(0, label="Use the first N images (0: all)", precision=0,
                                       elem_id="train-max-images")
                seed = gr.Number(0, label="Seed", precision=0)
            overrides = gr.Textbox(label="More overrides (one section.key=value per line)", lines=2,
                                   placeholder="train.ema_decay=0.999\nmodel.block_out_channels=[32,64,64]",
                                   elem_id="train-overrides")
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
        with gr.Column(scale=2):
            with gr.Row():
                run_names = [r.name for r in runs.runs()]
                run = gr.Dropdown(run_names, value=run_names[0] if run_names else None, label="Run",
                                  scale=3, elem_id="run-select")
                resume_steps = gr.Number(0, label="Resume up to step (0: same)", precision=0, scale=1,
                                         info="more steps re-plan the LR schedule over the new length",
                                         elem_id="resume-steps")
            with gr.Row():
                stop = gr.Button("■ Stop (keeps checkpoints)", variant="stop", size="sm", elem_id="train-stop")
                resume = gr.Button("▶ Resume from the latest checkpoint", size="sm", elem_id="train-resume")
            status = gr.Markdown("No run selected.", elem_id="run-status")
            with gr.Row():
                curve = gr.Plot(label="Training loss", format="png")
                latest = gr.Image(label="Latest samples (EMA weights, fixed seed)", type="filepath",
                                  elem_classes="pixelated", interactive=False, elem_id="latest-samples")
            with gr.Accordion("Samples over time, checkpoints and log", open=True):
                history = gr.Gallery(label="Samples over time", columns=6, height="auto", fit_columns=False,
                                     object_fit="contain", elem_classes="pixelated", elem_id="samples-over-time")
                checkpoints = gr.Markdown(elem_id="run-checkpoints")
                log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, autoscroll=True, elem_id="run-log")
    seen = gr.State(None)  # what the page already shows, so an unchanged run sends no images again
    timer = gr.Timer(REFRESH_S)

    @_friendly
    def start_run(preset, dataset, name, max_steps, batch, lr, warmup, sample_every, checkpoint_every,
                  max_images, seed, overrides):
        request = TrainRequest(
            name=(name or "").strip() or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
            preset=preset, dataset=resolve_dataset(roots, dataset), max_steps=_required(max_steps, "Steps"),
            batch_size=batch, learning_rate=lr, lr_warmup_steps=warmup, sample_every=sample_every,
            checkpoint_every=checkpoint_every, max_train_samples=max_images or None, seed=int(seed or 0),
            overrides=[line.strip() for line in (overrides or "").splitlines() if line.strip()],
        )
        started = runs.start(request)
        gr.Info(f"Started {started.name}.")
        return gr.update(choices=[r.name for r in runs.runs()], value=started.name), None

    @_friendly
    def stop_run(name, progress=gr.Progress()):
        progress(None, desc="stopping: waiting for the run to save and exit")
        status = runs.stop(name)
        kept = runs.get(name).checkpoints()
        where = f"; latest checkpoint: checkpoint-{kept[-1][0]}" if kept else "; it had no checkpoint yet"
        gr.Info(f"{name}: {STATUS_TEXT.get(status, status)}{where}.")
        return None

    @_friendly
    def resume_run(name, steps):
        runs.resume(name, int(steps) if steps else None)
        gr.Info(f"Resuming {name} from its latest checkpoint.")
        return None

    def refresh(name, seen_before):
        if not name:
            return "No run selected: start one on the left.", gr.skip(), gr.skip(), gr.skip(), "", "", seen_before
        try:
            view = runs.get(name)
        except Exception as err:  # a run deleted on disk, a bad name: say so, keep ticking
            return f"**{name}**: {err}", None, None, None, "", "", None
        progress = view.progress()
        state = view.status()
        samples = view.samples()
        signature = (name, progress.step, len(samples), state)
        text = _status_markdown(name, state, progress, view.error())
        kept = view.checkpoints()
        lines = [f"- `checkpoint-{step}`" for step, _ in reversed(kept)]
        ckpt = "**Checkpoints** (resume continues from the latest):\n" + "\n".join(lines) if lines else \
            "**Checkpoints:** none yet."
        if view.pipeline():
            ckpt += f"\n\n**Exported model:** `{roots.relative_name(view.pipeline(), 'models')}` (pick it above)."
        if signature == seen_before:
            return text, gr.skip(), gr.skip(), gr.skip(), ckpt, log_text(view), seen_before
        figure = loss_curve_figure(progress.steps, progress.losses, title=name) if progress.steps else None
        gallery = [(str(p), f"step {s}") for s, p in samples]
        return text, figure, str(samples[-1][1]) if samples else None, gallery, ckpt, log_text(view), signature

    def log_text(view) -> str:
        if not view.job.exists():
            return "(this run was started outside the app: its log was not captured)"
        return view.log_tail()

    def preset_defaults(name):
        train = PRESETS[name].train
        found = [v for _, v in dataset_choices()]
        return train.batch_size, train.learning_rate, train.lr_warmup_steps, suggest_dataset(name, found)

    outputs = [status, curve, latest, history, checkpoints, log, seen]
    preset.change(preset_defaults, preset, [batch, lr, warmup, dataset])
    start.click(start_run, [preset, dataset, name, max_steps, batch, lr, warmup, sample_every, checkpoint_every,
                            max_images, seed, overrides], [run, seen])
    stop.click(stop_run, run, seen)
    resume.click(resume_run, [run, resume_steps], seen)
    run.change(lambda name: refresh(name, None), run, outputs, show_progress="hidden")
    run.focus(lambda: gr.update(choices=[r.name for r in runs.runs()]), outputs=run, show_progress="hidden")
    timer.tick(refresh, [run, seen], outputs, show_progress="hidden", concurrency_limit=None)


def _evaluate_tab(demo: gr.Blocks, model, roots: Roots, evaluations: EvalManager, dataset_choices) -> None:
    if not eval_available():
        gr.Markdown(
            "### Evaluation is not available in this install\n"
            "This punkdiff has no `punkdiff eval` command yet, so there is nothing to run here. Once it is "
            "installed, this tab samples from the model above, scores the samples against a reference dataset "
            "and shows the report: each metric beside its real-vs-real floor, histograms and the "
            "nearest-neighbour sheet.",
            elem_id="eval-unavailable",
        )
        return
    gr.Markdown(
        "Sample from the model above and score the samples against real images: each metric is shown beside its "
        "**real-vs-real floor** (held-out real images scored the same way), with the class histogram and each "
        "sample beside its nearest training image. Runs in the background as `punkdiff eval`."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            reference = gr.Dropdown(dataset_choices(), value=None, label="Reference dataset",
                                    info="the real images the samples are scored against",
                                    allow_custom_value=True, elem_id="eval-reference")
            reference_note = gr.Markdown(elem_id="eval-reference-note")
            split = gr.Textbox("train", label="Split", info="the split the model was trained on",
                               elem_id="eval-split")
            num = gr.Number(1000, label="Samples", precision=0, elem_id="eval-samples",
                            info=f"images sampled and compared, as many real ones for the floor (1000, as "
                                 f"`punkdiff eval`; fewer is quicker, and noisier; at most {MAX_SAMPLES:,})")
            with gr.Row():
                scheduler = gr.Radio(["ddim", "ddpm", "dpm++"], value="ddim", label="Sampler")
                steps = gr.Number(50, label="Steps", precision=0, elem_id="eval-steps")
            seed = gr.Number(0, label="Seed", precision=0, info="sample i uses seed + i")
            start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        with gr.Column(scale=2):
            names = [e.name for e in evaluations.evaluations()]
            with gr.Row():
                chosen = gr.Dropdown(names, value=names[0] if names else None, label="Evaluation", scale=4,
                                     elem_id="eval-select")
                stop = gr.Button("■ Stop", variant="stop", size="sm", scale=0, min_width=90, elem_id="eval-stop")
            status = gr.Markdown(_NO_EVALUATION, elem_id="eval-status")
            report = gr.Markdown(elem_id="eval-report", elem_classes="pixelated")
            with gr.Accordion("metrics.json and log", open=False):
                metrics = gr.JSON(label="metrics.json")
                log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=6, autoscroll=True, elem_id="eval-log")
    seen = gr.State(None)  # what the page already shows, so an unchanged report is not sent again
    proposed = gr.State(None)  # the model's own reference, and why
    timer = gr.Timer(REFRESH_S)

    def propose_reference(model_ref):
        """The model's own training data as the reference when the app may read it; else why the user picks."""
        try:
            proposed = default_reference(roots, studio.resolve_model(model_ref, roots))
        except _USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip(), gr.skip(), "", None
        return proposed.dataset, proposed.split or gr.skip(), proposed.reason, proposed

    def explain_reference(chosen, proposed):
        return proposed.note_for(chosen) if proposed else ""

    @_friendly
    def start_eval(model_ref, reference, split, num, scheduler, steps, seed):
        folder = studio.resolve_model(model_ref, roots)
        request = EvalRequest(str(folder), resolve_dataset(roots, reference), split.strip() or None,
                              _required(num, "Samples"), scheduler, _required(steps, "Steps"), int(seed or 0))
        started = evaluations.start(request)
        gr.Info(f"Started {started.name}: sampling, then scoring; the report appears here when it is written.")
        return gr.update(choices=[e.name for e in evaluations.evaluations()], value=started.name)

    @_friendly
    def stop_eval(name, progress=gr.Progress()):
        if not name:
            raise ValueError("No evaluation selected: pick the one to stop")
        progress(None, desc="stopping")
        status = evaluations.stop(name)
        gr.Info(f"{name}: {STATUS_TEXT.get(status, status)}.")
        return None

    def refresh(name, seen_before):
        if not name:
            return _NO_EVALUATION, gr.skip(), gr.skip(), "", None
        try:
            view = evaluations.get(name)
        except FileNotFoundError as err:
            return str(err), None, None, "", None
        state = view.status()
        text = f"### {name}: {STATUS_TEXT.get(state, state)}"
        if state == "failed":
            text += f"\n\n**Error:** `{view.job.error_message()}`"
        elif state == "running":
            text += "\n\n" + (view.job.log_tail(max_lines=1) or "starting")
        signature = (name, state, view.written())
        if signature == seen_before:  # the report and its figures are in the page already
            return text, gr.skip(), gr.skip(), view.job.log_tail(), seen_before
        return text, view.report_markdown() or "", view.metrics(), view.job.log_tail(), signature

    model.change(propose_reference, model, [reference, split, reference_note, proposed], show_progress="hidden")
    demo.load(propose_reference, model, [reference, split, reference_note, proposed], show_progress="hidden")
    reference.input(explain_reference, [reference, proposed], reference_note, show_progress="hidden")
    reference.focus(lambda: gr.update(choices=dataset_choices()), outputs=reference, show_progress="hidden")
    start.click(start_eval, [model, reference, split, num, scheduler, steps, seed], chosen)
    outputs = [status, report, metrics, log, seen]
    stop.click(stop_eval, chosen, seen)
    chosen.change(lambda name: refresh(name, None), chosen, outputs, show_progress="hidden")
    timer.tick(refresh, [chosen, seen], outputs, show_progress="hidden", concurrency_limit=None)


# --- helpers ------------------------------------------------------------------------------------------


def _close_on_sigterm(signum, frame) -> None:
    """SIGTERM closes the server as Ctrl-C does (Gradio closes on KeyboardInterrupt), so its jobs are stopped."""
    raise KeyboardInterrupt


def _fit_steps(load, model_ref: str, steps):
    """A steps slider's range up to the model's T (more steps than the noise schedule has is an error)."""
    try:
        _, info = load(model_ref)
    except _USER_ERRORS:  # no model, or one the model line already reports
        return gr.skip()
    return gr.update(maximum=info.num_train_timesteps, value=min(steps or 1, info.num_train_timesteps))


def _status_markdown(name: str, state: str, progress, error: str | None) -> str:
    total = f" / {progress.total}" if progress.total else ""
    parts = [f"**Step {progress.step}{total}**"]
    if progress.images_per_sec:
        parts.append(f"{progress.images_per_sec:.0f} images/s")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eta_s is not None:
        parts.append(f"about {_duration(progress.eta_s)} left")
    text = f"### {name}: {STATUS_TEXT.get(state, state)}\n" + " · ".join(parts)
    if error:
        text += f"\n\n**Error:** `{error}`"
    return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _required(value, label: str) -> int:
    if value is None:
        raise ValueError(f"{label} is empty: enter a whole number")
    return value


def _friendly(handler):
    """Show a handler's failure as a message in the page (never a traceback), and keep serving."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except _USER_ERRORS as err:
            raise gr.Error(str(err), title="Cannot do that") from err
        except Exception as err:  # a bug, not a user mistake: still a message, with details in the server log
            traceback.print_exc()
            raise gr.Error(f"{type(err).__name__}: {err}", title="Something went wrong") from err

    return wrapped
