"""The Gradio page: a model picker, then Generate, Inpaint & reconstruct, Train and Evaluate tabs.

This module is the layout: which widgets each tab shows, and which event of each calls which handler in
`punkdiff.app.handlers` (the code that runs). `launch` serves the page.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref

import gradio as gr

from punkdiff import studio
from punkdiff.app.handlers import (
    NO_EVALUATION,
    EvalHandlers,
    GenerateHandlers,
    InpaintHandlers,
    Models,
    TrainHandlers,
)
from punkdiff.eval_runs import MAX_SAMPLES, EvalManager, eval_available
from punkdiff.jobs import stop_launched
from punkdiff.presets import DDIM_ETA, PRESETS
from punkdiff.roots import Roots
from punkdiff.runs import RunManager, suggest_dataset

TITLE = "punkdiff"
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#run-status h3 { margin-bottom: 0.2em; }
footer { display: none !important; }
"""
REFRESH_S = 2.0
_SERVED: weakref.WeakKeyDictionary[gr.Blocks, Roots] = weakref.WeakKeyDictionary()  # the folders each page serves


def build_app(roots: Roots, max_runs: int = 1) -> gr.Blocks:
    """The whole page for `roots`; at most `max_runs` trainings at a time. Serve it with `launch`."""
    # Gradio's copies of shown files go under the run root, like everything else the app writes.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(roots.runs / ".gradio"))
    models = Models(roots)
    generated = roots.runs / "generated"

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(
            "# punkdiff\nTrain, watch, sample, inpaint and evaluate diffusion models (MNIST digits, CryptoPunks, "
            "faces), unconditional or told what to draw. Models are Diffusers folders; everything runs on this machine."
        )
        with gr.Row():
            choices = models.choices()
            model = gr.Dropdown(
                choices, value=choices[0][1] if choices else None, label="Model",
                info="an exported model folder (a finished run's pipeline/), or a Hub id (owner/name) when online",
                allow_custom_value=True, scale=4, elem_id="model",
            )
            refresh_models = gr.Button("↻ Refresh", scale=0, min_width=100, size="sm")
        model_text = gr.Markdown(elem_id="model-info")
        refresh_models.click(models.refreshed, outputs=model)
        model.focus(models.refreshed, outputs=model, show_progress="hidden")
        model.change(models.describe, model, model_text)
        demo.load(models.describe, model, model_text)

        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(demo, model, GenerateHandlers(models, generated), models)
            with gr.Tab("Inpaint & reconstruct", id="inpaint"):
                _inpaint_tab(demo, model, InpaintHandlers(models, generated))
            with gr.Tab("Train", id="train"):
                _train_tab(TrainHandlers(roots, RunManager(roots, max_active=max_runs), models.dataset_choices))
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(demo, model, EvalHandlers(models, EvalManager(roots)), models)

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


def _generate_tab(demo: gr.Blocks, model, handlers: GenerateHandlers, models: Models) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            with gr.Column(visible=False, elem_id="condition") as condition:
                title = gr.Markdown(elem_id="condition-title")
                digit = gr.Radio([studio.ANY], value=studio.ANY, label="Digit", visible=False,
                                 info="the class to draw; (any) leaves it to the model", elem_id="digit-picker")
                kind = gr.Dropdown([studio.ANY], value=studio.ANY, label="Type", visible=False,
                                   info="one of its classes; (any) leaves it to the model", elem_id="punk-type")
                accessories = gr.CheckboxGroup([], label="Accessories", visible=False, elem_id="punk-accessories",
                                               info="exactly these; none ticked: none at all")
                model_chooses = gr.Checkbox(False, label="Let the model choose", visible=False,
                                            elem_id="punk-model-chooses")
                guidance = gr.Slider(0, 10, value=3, step=0.5, label="Guidance", elem_id="guidance",
                                     info="1: the conditional model alone; higher follows the request more closely")
            scheduler = gr.Dropdown(studio.sampler_choices(), value="ddim", label="Sampler", elem_id="gen-sampler",
                                    info="DDIM, DPM-Solver++ and UniPC need few steps; DDPM is the training process")
            steps = gr.Slider(1, 1000, value=50, step=1, label="Steps", elem_id="gen-steps")
            eta = gr.Slider(0, 1, value=DDIM_ETA, step=0.05, label="eta (DDIM only)", elem_id="gen-eta",
                            info="0: deterministic; 1: as noisy as DDPM")
            sampling_note = gr.Markdown(elem_id="gen-sampling-note")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="gen-seed")
                batch = gr.Slider(1, studio.MAX_BATCH, value=16, step=1, label="Images", elem_id="gen-images")
            run = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="Samples", type="pil", elem_id="gen-grid", elem_classes="pixelated",
                            buttons=["download", "fullscreen"], interactive=False)
            animation = gr.Image(label="Denoising: x_t (left) beside the predicted x_0 (right)", type="filepath",
                                 elem_id="gen-animation", elem_classes="pixelated", interactive=False)
            files = gr.File(label="Download the grid and the animation", file_count="multiple", interactive=False)

    run.click(handlers.generate,
              [model, scheduler, steps, eta, seed, batch, digit, kind, accessories, model_chooses, guidance],
              [grid, animation, files], concurrency_id="sampling", concurrency_limit=1)
    adapted = [scheduler, steps, eta, sampling_note, condition, title, digit, kind, accessories, model_chooses]
    model.change(handlers.adapt_to_model, [model, steps], adapted, show_progress="hidden")
    demo.load(handlers.adapt_to_model, [model, steps], adapted, show_progress="hidden")
    scheduler.change(models.eta_for, scheduler, eta, show_progress="hidden")


def _inpaint_tab(demo: gr.Blocks, model, handlers: InpaintHandlers) -> None:
    source = gr.State()  # the real image as loaded or uploaded, before the model's preparation
    gr.Markdown(
        "Pick a real image, **paint over** what the model should replace (a punk's hat, a digit's stroke), "
        "then press **Inpaint**: RePaint fills the painted part with the unconditional model and keeps the rest. "
        "Or reconstruct the whole image after noising it to step t."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            datasets = handlers.models.dataset_choices()
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
            rec_scheduler = gr.Dropdown(studio.sampler_choices(), value="ddim", label="Sampler")
            rec_steps = gr.Slider(1, 1000, value=50, step=1, label="Steps (over the whole schedule)")
            reconstruct = gr.Button("Reconstruct", elem_id="reconstruct-button")
        with gr.Column(scale=2):
            rebuilt = gr.Image(label="Original · reconstruction", type="pil", elem_classes="pixelated",
                               interactive=False)
            rec_text = gr.Markdown()
            rec_animation = gr.Image(label="x_t beside the predicted x_0, step by step", type="filepath",
                                     elem_classes="pixelated", interactive=False)

    pick.click(handlers.from_dataset, [model, dataset, index, split], [source, editor])
    lucky.click(handlers.random_index, [dataset, split], index).success(
        handlers.from_dataset, [model, dataset, index, split], [source, editor])
    upload.upload(handlers.from_upload, [model, upload], [source, editor])
    adapted = [t_start, dataset, editor, steps, rec_steps]
    model.change(handlers.adapt_to_model, [model, source, steps, rec_steps], adapted)
    demo.load(handlers.adapt_to_model, [model, source, steps, rec_steps], adapted)
    inpaint.click(handlers.inpaint, [model, source, editor, steps, jump, resample, fills, seed], inpainted,
                  concurrency_id="sampling", concurrency_limit=1)
    reconstruct.click(handlers.reconstruct, [model, source, t_start, rec_scheduler, rec_steps],
                      [rebuilt, rec_text, rec_animation], concurrency_id="sampling", concurrency_limit=1)


def _train_tab(handlers: TrainHandlers) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### New run")
            preset = gr.Dropdown(list(PRESETS), value="mnist-fast-16", label="Preset", elem_id="train-preset",
                                 info="`punkdiff presets` lists them")
            datasets = handlers.dataset_choices()
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
                run_names = handlers.run_names()
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

    outputs = [status, curve, latest, history, checkpoints, log, seen]
    preset.change(handlers.preset_defaults, preset, [batch, lr, warmup, dataset])
    start.click(handlers.start, [preset, dataset, name, max_steps, batch, lr, warmup, sample_every, checkpoint_every,
                                  max_images, seed, overrides], [run, seen])
    stop.click(handlers.stop, run, seen)
    resume.click(handlers.resume, [run, resume_steps], seen)
    run.change(lambda name: handlers.refresh(name, None), run, outputs, show_progress="hidden")
    run.focus(lambda: gr.update(choices=handlers.run_names()), outputs=run, show_progress="hidden")
    timer.tick(handlers.refresh, [run, seen], outputs, show_progress="hidden", concurrency_limit=None)


def _evaluate_tab(demo: gr.Blocks, model, handlers: EvalHandlers, models: Models) -> None:
    dataset_choices = models.dataset_choices
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
                scheduler = gr.Dropdown(studio.sampler_choices(), value="ddim", label="Sampler",
                                        elem_id="eval-sampler")
                steps = gr.Number(50, label="Steps", precision=0, elem_id="eval-steps")
            seed = gr.Number(0, label="Seed", precision=0, info="sample i uses seed + i")
            start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        with gr.Column(scale=2):
            names = handlers.names()
            with gr.Row():
                chosen = gr.Dropdown(names, value=names[0] if names else None, label="Evaluation", scale=4,
                                     elem_id="eval-select")
                stop = gr.Button("■ Stop", variant="stop", size="sm", scale=0, min_width=90, elem_id="eval-stop")
            status = gr.Markdown(NO_EVALUATION, elem_id="eval-status")
            report = gr.Markdown(elem_id="eval-report", elem_classes="pixelated")
            with gr.Accordion("metrics.json and log", open=False):
                metrics = gr.JSON(label="metrics.json")
                log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=6, autoscroll=True, elem_id="eval-log")
    seen = gr.State(None)  # what the page already shows, so an unchanged report is not sent again
    proposed = gr.State(None)  # the model's own reference, and why
    timer = gr.Timer(REFRESH_S)

    proposal = [reference, split, reference_note, proposed]
    model.change(handlers.propose_reference, model, proposal, show_progress="hidden")
    demo.load(handlers.propose_reference, model, proposal, show_progress="hidden")
    model.change(models.recommended, model, [scheduler, steps], show_progress="hidden")
    demo.load(models.recommended, model, [scheduler, steps], show_progress="hidden")
    reference.input(handlers.explain_reference, [reference, proposed], reference_note, show_progress="hidden")
    reference.focus(lambda: gr.update(choices=dataset_choices()), outputs=reference, show_progress="hidden")
    start.click(handlers.start, [model, reference, split, num, scheduler, steps, seed], chosen)
    outputs = [status, report, metrics, log, seen]
    stop.click(handlers.stop, chosen, seen)
    chosen.change(lambda name: handlers.refresh(name, None), chosen, outputs, show_progress="hidden")
    timer.tick(handlers.refresh, [chosen, seen], outputs, show_progress="hidden", concurrency_limit=None)


# --- helpers ------------------------------------------------------------------------------------------


def _close_on_sigterm(signum, frame) -> None:
    """SIGTERM closes the server as Ctrl-C does (Gradio closes on KeyboardInterrupt), so its jobs are stopped."""
    raise KeyboardInterrupt
