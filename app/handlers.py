"""What the page's buttons and timers do: one class per tab, each method one event, the layout in `ui.py`.

Each handler parses widget values, calls `punkdiff.studio`, `punkdiff.runs` or `punkdiff.eval_runs`, and shapes the
result for the page; a mistake (a path outside the app's folders, a number out of range, a run that failed) becomes
a message in the page (`friendly`), and the server goes on serving.

Example:
    >>> models = Models(roots)
    >>> GenerateHandlers(models, roots.runs / "generated").generate("runs/mnist/pipeline", "DDIM", 50, 0.0, 0, 16)
"""

from __future__ import annotations

import functools
import random
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from punkdiff import studio
from punkdiff.eval_runs import EvalManager, EvalRequest, default_reference
from punkdiff.jobs import STATUS_TEXT
from punkdiff.presets import PRESETS
from punkdiff.roots import Roots, resolve_dataset
from punkdiff.runs import RunManager, TrainRequest, suggest_dataset
from punkdiff.visuals import loss_curve_figure

# what a mistake in the page raises (a path outside the roots, a missing folder, a number out of range)
USER_ERRORS = (ValueError, PermissionError, FileNotFoundError, RuntimeError, OSError)
NO_EVALUATION = "No evaluation yet: check the reference and press **Evaluate**."


def friendly(handler):
    """Show a handler's failure as a message in the page (never a traceback), and keep serving."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as err:
            raise gr.Error(str(err), title="Cannot do that") from err
        except Exception as err:  # a bug, not a user mistake: still a message, with details in the server log
            traceback.print_exc()
            raise gr.Error(f"{type(err).__name__}: {err}", title="Something went wrong") from err

    return wrapped


class Models:
    """The model picker's side: the models and datasets under the roots, loaded once each (a small cache)."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.cache = studio.ModelCache()

    def choices(self) -> list[tuple[str, str]]:
        return [(self.roots.relative_name(p, "models"), str(p)) for p in studio.find_models(self.roots)]

    def dataset_choices(self) -> list[tuple[str, str]]:
        found = [(self.roots.relative_name(p, "data"), str(p)) for p in studio.find_datasets(self.roots)]
        return found + [("sklearn-digits (built in)", "sklearn-digits")]

    def load(self, model_ref: str):
        return self.cache.load(studio.resolve_model(model_ref, self.roots))

    def refreshed(self):
        return gr.update(choices=self.choices())

    def describe(self, model_ref: str) -> str:
        if not model_ref:
            return "No model yet: train one in the **Train** tab, then pick its `pipeline` folder here."
        try:
            _, info = self.load(model_ref)
        except USER_ERRORS as err:  # said once, here; the tabs keep what they show until a model loads
            gr.Warning(str(err), title="Cannot use this model")
            return f"**Cannot use this model**: {err}"
        return f"**{self.roots.relative_name(info.path, 'models')}**: {info.describe()}"

    def fit_steps(self, model_ref: str, steps):
        """A steps slider's range up to the model's T (more steps than the noise schedule has is an error)."""
        try:
            _, info = self.load(model_ref)
        except USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip()
        return gr.update(maximum=info.num_train_timesteps, value=min(steps or 1, info.num_train_timesteps))

    def recommended(self, model_ref):
        """A sampler and a step count set to how the model is meant to be sampled (its `sampling.json`)."""
        try:
            _, info = self.load(model_ref)
        except USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip(), gr.skip()
        return info.sampling.sampler, info.sampling.num_inference_steps

    @staticmethod
    def eta_for(sampler):
        """eta only matters to the DDIM samplers: greyed out for the others."""
        return gr.update(interactive=studio.uses_eta(sampler))


class GenerateHandlers:
    def __init__(self, models: Models, generated: Path) -> None:
        self.models, self.generated = models, generated

    @friendly
    def generate(self, model_ref, scheduler, steps, eta, seed, batch, digit, kind, chosen, model_chooses, guidance,
                 progress=gr.Progress()):
        pipe, info = self.models.load(model_ref)
        form = studio.ConditionForm.of(info.condition)
        choice = digit if form.kind == "labels" else kind  # the digit picker's choice, or the punk builder's type
        request = form.request(choice, chosen, model_chooses, guidance)
        progress(0, desc="loading")
        result = studio.sample(pipe, info, scheduler, steps, eta, seed, batch, self.generated,
                               progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"), **request)
        for note in result.notes:
            gr.Warning(note)
        return result.grid, str(result.animation_path), [str(result.grid_path), str(result.animation_path)]

    def adapt_to_model(self, model_ref, steps):
        """A new model: its recommended sampler, steps and eta (a student's step count), what it can be asked for.

        Picking a model sets these; what the user changes afterwards is what is sampled.
        """
        try:
            _, info = self.models.load(model_ref)
        except USER_ERRORS:  # no model, or one the model line already reports
            return (gr.skip(),) * 10
        config, form = info.sampling, studio.ConditionForm.of(info.condition)
        choices = [studio.ANY, *form.choices]
        column, last = (form.choice_column or "").capitalize(), info.num_train_timesteps
        return (
            config.sampler,
            gr.update(maximum=last, value=min(config.num_inference_steps, last)),
            gr.update(value=config.eta, interactive=studio.uses_eta(config.sampler)),
            studio.sampling_note(config),
            gr.update(visible=form.kind is not None),
            {"labels": "### Digit picker", "attributes": "### Punk builder"}.get(form.kind, ""),
            gr.update(visible=form.kind == "labels", choices=choices, value=studio.ANY, label=column),
            gr.update(visible=form.kind == "attributes" and bool(form.choice_column), choices=choices,
                      value=studio.ANY, label=column),
            gr.update(visible=form.kind == "attributes" and bool(form.set_column), choices=list(form.set_names),
                      value=[], label=(form.set_column or "").capitalize()),
            gr.update(visible=form.kind == "attributes" and bool(form.set_column), value=False,
                      label=f"Let the model choose the {form.set_column}" if form.set_column else None),
        )


class InpaintHandlers:
    def __init__(self, models: Models, generated: Path) -> None:
        self.models, self.roots, self.generated = models, models.roots, generated

    def editor_value(self, image, model_ref):
        _, info = self.models.load(model_ref)
        shown = studio.upscale(studio.prepare_image(image, info).convert("RGBA"), 384)
        return {"background": shown, "layers": [], "composite": shown}

    @friendly
    def from_dataset(self, model_ref, dataset_ref, number, split_name):
        image = studio.dataset_image(resolve_dataset(self.roots, dataset_ref), number, split_name or "train")
        return image, self.editor_value(image, model_ref)

    @friendly
    def random_index(self, dataset_ref, split_name):
        from punkdiff.data import load_image_dataset

        loaded, _ = load_image_dataset(resolve_dataset(self.roots, dataset_ref), split_name or "train")
        return random.randrange(len(loaded))

    @friendly
    def from_upload(self, model_ref, image):
        if image is None:
            return gr.skip(), gr.skip()
        return image, self.editor_value(image, model_ref)

    def adapt_to_model(self, model_ref, image, inpaint_steps, reconstruct_steps):
        """A new model: its range of t and of steps, the dataset it was trained on, the image prepared for it."""
        try:
            _, info = self.models.load(model_ref)
        except USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        last = info.num_train_timesteps - 1
        known = [v for _, v in self.models.dataset_choices()]
        return (
            gr.update(maximum=last, value=min(round(0.3 * last), last)),
            info.trained_on if info.trained_on in known else gr.skip(),
            self.editor_value(image, model_ref) if image is not None else gr.skip(),
            self.models.fit_steps(model_ref, inpaint_steps),
            self.models.fit_steps(model_ref, reconstruct_steps),
        )

    @friendly
    def inpaint(self, model_ref, image, painted, steps, jump, resample, fills, seed,
                progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise studio.StudioError("Load or upload an image first.")
        pipe, info = self.models.load(model_ref)
        real = studio.prepare_image(image, info)
        mask = studio.mask_from_layers((painted or {}).get("layers") or [], info.resolution)
        filled = studio.inpaint(pipe, real, mask, steps, jump, resample, seed, fills)
        return studio.side_by_side([real, studio.show_mask(real, mask), *filled], target=160)

    @friendly
    def reconstruct(self, model_ref, image, t, scheduler, steps, progress=gr.Progress()):
        if image is None:
            raise studio.StudioError("Load or upload an image first.")
        pipe, info = self.models.load(model_ref)
        real = studio.prepare_image(image, info)
        result, mse, animation = studio.reconstruct(
            pipe, info, real, t, scheduler, steps, 0, self.generated,
            progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"),
        )
        text = f"Mean squared error to the original: **{mse:.4f}** (pixels in [0, 1]), from t = {int(t)}."
        return studio.side_by_side([real, result], target=192), text, str(animation)


class TrainHandlers:
    def __init__(self, roots: Roots, runs: RunManager, dataset_choices: Callable[[], list[tuple[str, str]]]) -> None:
        self.roots, self.runs, self.dataset_choices = roots, runs, dataset_choices

    def run_names(self) -> list[str]:
        return [r.name for r in self.runs.runs()]

    @friendly
    def start(self, preset, dataset, name, max_steps, batch, lr, warmup, sample_every, checkpoint_every,
              max_images, seed, overrides):
        request = TrainRequest(
            name=(name or "").strip() or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
            preset=preset, dataset=resolve_dataset(self.roots, dataset), max_steps=required(max_steps, "Steps"),
            batch_size=batch, learning_rate=lr, lr_warmup_steps=warmup, sample_every=sample_every,
            checkpoint_every=checkpoint_every, max_train_samples=max_images or None, seed=int(seed or 0),
            overrides=[line.strip() for line in (overrides or "").splitlines() if line.strip()],
        )
        started = self.runs.start(request)
        gr.Info(f"Started {started.name}.")
        return gr.update(choices=self.run_names(), value=started.name), None

    @friendly
    def stop(self, name, progress=gr.Progress()):
        progress(None, desc="stopping: waiting for the run to save and exit")
        status = self.runs.stop(name)
        kept = self.runs.get(name).checkpoints()
        where = f"; latest checkpoint: checkpoint-{kept[-1][0]}" if kept else "; it had no checkpoint yet"
        gr.Info(f"{name}: {STATUS_TEXT.get(status, status)}{where}.")
        return None

    @friendly
    def resume(self, name, steps):
        self.runs.resume(name, int(steps) if steps else None)
        gr.Info(f"Resuming {name} from its latest checkpoint.")
        return None

    def refresh(self, name, seen_before):
        """Status, loss curve, latest samples, samples over time, checkpoints, log, and what the page now shows."""
        if not name:
            return "No run selected: start one on the left.", gr.skip(), gr.skip(), gr.skip(), "", "", seen_before
        try:
            view = self.runs.get(name)
        except Exception as err:  # a run deleted on disk, a bad name: say so, keep ticking
            return f"**{name}**: {err}", None, None, None, "", "", None
        progress = view.progress()
        state = view.status()
        samples = view.samples()
        signature = (name, progress.step, len(samples), state)
        text = status_markdown(name, state, progress, view.error())
        kept = view.checkpoints()
        lines = [f"- `checkpoint-{step}`" for step, _ in reversed(kept)]
        ckpt = "**Checkpoints** (resume continues from the latest):\n" + "\n".join(lines) if lines else \
            "**Checkpoints:** none yet."
        if view.pipeline():
            ckpt += f"\n\n**Exported model:** `{self.roots.relative_name(view.pipeline(), 'models')}` (pick it above)."
        log = view.log_tail() if view.job.exists() else \
            "(this run was started outside the app: its log was not captured)"
        if signature == seen_before:
            return text, gr.skip(), gr.skip(), gr.skip(), ckpt, log, seen_before
        figure = loss_curve_figure(progress.steps, progress.losses, title=name) if progress.steps else None
        gallery = [(str(p), f"step {s}") for s, p in samples]
        return text, figure, str(samples[-1][1]) if samples else None, gallery, ckpt, log, signature

    def preset_defaults(self, name):
        train = PRESETS[name].train
        found = [v for _, v in self.dataset_choices()]
        return train.batch_size, train.learning_rate, train.lr_warmup_steps, suggest_dataset(name, found)


class EvalHandlers:
    def __init__(self, models: Models, evaluations: EvalManager) -> None:
        self.roots, self.evaluations = models.roots, evaluations

    def names(self) -> list[str]:
        return [e.name for e in self.evaluations.evaluations()]

    def propose_reference(self, model_ref):
        """The model's own training data as the reference when the app may read it; else why the user picks."""
        try:
            proposed = default_reference(self.roots, studio.resolve_model(model_ref, self.roots))
        except USER_ERRORS:  # no model, or one the model line already reports
            return gr.skip(), gr.skip(), "", None
        return proposed.dataset, proposed.split or gr.skip(), proposed.reason, proposed

    @staticmethod
    def explain_reference(chosen, proposed):
        return proposed.note_for(chosen) if proposed else ""

    @friendly
    def start(self, model_ref, reference, split, num, scheduler, steps, seed):
        folder = studio.resolve_model(model_ref, self.roots)
        request = EvalRequest(str(folder), resolve_dataset(self.roots, reference), split.strip() or None,
                              required(num, "Samples"), scheduler, required(steps, "Steps"), int(seed or 0))
        started = self.evaluations.start(request)
        gr.Info(f"Started {started.name}: sampling, then scoring; the report appears here when it is written.")
        return gr.update(choices=self.names(), value=started.name)

    @friendly
    def stop(self, name, progress=gr.Progress()):
        if not name:
            raise ValueError("No evaluation selected: pick the one to stop")
        progress(None, desc="stopping")
        status = self.evaluations.stop(name)
        gr.Info(f"{name}: {STATUS_TEXT.get(status, status)}.")
        return None

    def refresh(self, name, seen_before):
        """Status, report (with a conditional model's per-class scores), metrics.json, log, what the page shows."""
        if not name:
            return NO_EVALUATION, gr.skip(), gr.skip(), "", None
        try:
            view = self.evaluations.get(name)
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
        metrics = view.metrics()
        return text, view.report_markdown() or "", metrics, view.job.log_tail(), signature


# --- formatting -----------------------------------------------------------------------------------------


def status_markdown(name: str, state: str, progress, error: str | None) -> str:
    total = f" / {progress.total}" if progress.total else ""
    parts = [f"**Step {progress.step}{total}**"]
    if progress.images_per_sec:
        parts.append(f"{progress.images_per_sec:.0f} images/s")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eta_s is not None:
        parts.append(f"about {duration(progress.eta_s)} left")
    text = f"### {name}: {STATUS_TEXT.get(state, state)}\n" + " · ".join(parts)
    if error:
        text += f"\n\n**Error:** `{error}`"
    return text


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def required(value, label: str) -> int:
    if value is None:
        raise ValueError(f"{label} is empty: enter a whole number")
    return value
