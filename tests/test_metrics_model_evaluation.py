"""`evaluate_model`: the whole `punkdiff eval` as a library call, and the model card it updates when asked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from tiny_models import tiny_unet

from punkdiff.hub import ModelCardInfo, export_pipeline
from punkdiff.metrics.model_evaluation import SAMPLES_FILE, EvalOptions, EvaluationError, evaluate_model


@pytest.fixture
def options(tmp_path, mnist_dir, metrics_cache, monkeypatch):
    monkeypatch.delenv("PUNKDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("PUNKDIFF_DINOV2", raising=False)
    model = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path / "digits",
                            card=ModelCardInfo(preset="mnist-baseline-16", dataset="ylecun/mnist", training_steps=7,
                                               metrics={"SWD x1e3 (during training)": 41.5}))
    return EvalOptions(str(mnist_dir), out=tmp_path / "eval", model=str(model), preset="mnist-baseline-16",
                       num_samples=12, batch_size=12, steps=2, reconstruction_images=0, cache_dir=str(metrics_cache))


def test_update_card_writes_the_numbers_and_keeps_the_card(options, digit_classifier):
    readme = options.model + "/README.md"
    with open(readme, "a", encoding="utf-8") as card:
        card.write("\n## Notes\n\nA hand-written note that must survive.\n")
    options.update_card = True
    result = evaluate_model(options, progress=False)
    assert result.report.is_file() and str(result.card) == readme

    fd = result.evaluation.metrics["fd_classifier"]
    yaml = metadata_load(readme)  # the card's YAML parses, and carries the numbers
    (index,) = yaml["model-index"]
    values = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert values["fd_classifier (12 samples, ddim-2, eta 1)"] == fd["model"]
    assert values["fd_classifier, real-vs-real floor (12 images)"] == fd["floor"]
    assert values["SWD x1e3 (during training)"] == 41.5  # the training's result is kept
    assert all(isinstance(v, float) for v in values.values())  # "not computed" stays out of the YAML
    card = ModelCard.load(readme)
    assert card.data.library_name == "diffusers" and "A hand-written note that must survive." in card.text
    assert f"| fd_classifier (12 samples, ddim-2, eta 1) | {fd['model']:.4g} |" in card.text
    assert "| fid | not computed: weights unavailable |" in card.text and "| 41.5 |" in card.text
    assert card.text.count("## Metrics") == 1 and "## How to use" in card.text

    evaluate_model(options, progress=False)  # again: the results are replaced, not added twice
    assert len(ModelCard.load(readme).data.eval_results) == len(card.data.eval_results)


def test_without_update_card_the_model_folder_is_untouched(options, digit_classifier):
    readme = Path(options.model) / "README.md"
    before = readme.read_text()
    result = evaluate_model(options, progress=False)
    assert result.card is None and readme.read_text() == before
    assert json.loads((options.out / "metrics.json").read_text())["num_images"] == 12


def test_generated_samples_are_kept_and_score_again_the_same(options, digit_classifier):
    first = evaluate_model(options, progress=False)
    kept = np.load(options.out / SAMPLES_FILE, allow_pickle=False)
    assert kept.dtype == np.uint8 and kept.shape == (12, 1, 16, 16)
    assert SAMPLES_FILE in first.report.read_text()
    assert json.loads((options.out / "metrics.json").read_text())["sampler"] == "ddim-2, eta 1"

    rescored = EvalOptions(options.reference, out=options.out.parent / "again", samples=str(options.out / SAMPLES_FILE),
                           preset=options.preset, cache_dir=options.cache_dir, reconstruction_images=0)
    again = evaluate_model(rescored, progress=False)
    fd, fd_again = first.evaluation.metrics["fd_classifier"], again.evaluation.metrics["fd_classifier"]
    assert fd_again["model"] == pytest.approx(fd["model"], rel=1e-6) and fd_again["floor"] == fd["floor"]
    assert not (options.out.parent / "again" / SAMPLES_FILE).exists()  # existing images are not copied
    rescored_info = json.loads((options.out.parent / "again" / "metrics.json").read_text())
    assert rescored_info["sampler"] == "(none: existing images)"


def test_update_card_only_for_the_users_own_model_folder(options, tmp_path):
    options.update_card = True
    snapshot = tmp_path / "hub" / "models--someone--digits" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for model, samples, message in [
        (options.model, str(tmp_path), "not --samples"),
        ("someone/digits", None, "needs a local model folder"),
        (str(snapshot), None, "a snapshot in the Hugging Face cache"),
    ]:
        options.model, options.samples = model, samples
        with pytest.raises(EvaluationError, match=message):
            evaluate_model(options, progress=False)
    assert not (tmp_path / "eval").exists()  # refused before any work


def test_bad_options_are_refused_before_any_work(options, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(EvaluationError, match="is a file; give a folder"):
        evaluate_model(EvalOptions(options.reference, out=tmp_path / "a-file", model=options.model), progress=False)
    with pytest.raises(EvaluationError, match="give a MODEL to sample from"):
        evaluate_model(EvalOptions(options.reference, samples=str(tmp_path)), progress=False)
    options.steps = 5000
    with pytest.raises(EvaluationError, match="more than the model's 1000 training timesteps"):
        evaluate_model(options, progress=False)


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if sampling starts: the inputs below must be refused before the slow part."""
    from punkdiff.metrics import model_evaluation

    def sample(*args, **kwargs):
        raise AssertionError("sampling started before the inputs were checked")

    monkeypatch.setattr(model_evaluation, "_sample", sample)


def test_an_out_folder_that_cannot_be_written_is_refused_before_sampling(options, tmp_path, no_sampling):
    (tmp_path / "a-file").write_text("kept")
    options.out = tmp_path / "a-file" / "eval"
    with pytest.raises(EvaluationError, match=r"--out .*a-file/eval cannot be written .*choose a folder you can"):
        evaluate_model(options, progress=False)
    assert (tmp_path / "a-file").read_text() == "kept"
    options.out = tmp_path / "new" / "deeper" / "eval"
    options.num_samples = 9
    with pytest.raises(EvaluationError, match="--num-samples 9 is too few to score; use at least 10"):
        evaluate_model(options, progress=False)
    assert not (tmp_path / "new").exists()  # the writability test leaves no folder behind


def test_too_few_samples_are_refused_before_the_reference_loads(options, tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((5, 16, 16), np.uint8))
    few = EvalOptions("/no/such/reference", out=tmp_path / "e", samples=str(tmp_path / "five.npy"),
                      preset="mnist-baseline-16")
    with pytest.raises(EvaluationError, match=r"five.npy holds 5 images, too few to score; give at least 10"):
        evaluate_model(few, progress=False)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("card", ["link", "---\nlicense: [mit\n---\n# Mine\n"], ids=["linked", "bad-yaml"])
def test_a_card_that_update_card_cannot_edit_is_refused_before_sampling(options, tmp_path, no_sampling, card):
    from punkdiff.hub import ModelFolderError

    readme = Path(options.model) / "README.md"
    target = tmp_path / "someone-elses.md"
    target.write_text("precious\n")
    readme.unlink()
    if card == "link":
        readme.symlink_to(target)
    else:
        readme.write_text(card)
    options.update_card = True
    with pytest.raises(ModelFolderError, match="symbolic link" if card == "link" else "metadata header"):
        evaluate_model(options, progress=False)
    assert target.read_text() == "precious\n" and not options.out.exists()
    assert readme.is_symlink() if card == "link" else readme.read_text() == card


def test_an_invalid_training_summary_is_refused_before_sampling(options, no_sampling):
    from punkdiff.data import DataError

    (Path(options.model).parent / "training_summary.json").write_text('{"config": {"data": 3}}')
    options.preset = None
    with pytest.raises(DataError, match="training_summary.json is not a training summary"):
        evaluate_model(options, progress=False)


def test_eval_samples_with_the_model_recommendation_unless_told(options, digit_classifier):
    import dataclasses

    (Path(options.model) / "sampling.json").write_text(
        '{"sampler": "ddim-trailing", "num_inference_steps": 3, "eta": 0.0}')
    evaluate_model(dataclasses.replace(options, steps=None), progress=False)
    assert json.loads((options.out / "metrics.json").read_text())["sampler"] == "ddim-trailing-3, eta 0"
    evaluate_model(dataclasses.replace(options, scheduler="unipc", steps=None), progress=False)
    assert json.loads((options.out / "metrics.json").read_text())["sampler"] == "unipc-50"
    with pytest.raises(EvaluationError, match="unknown sampler 'euler'; choose one of ddpm, ddim"):
        evaluate_model(dataclasses.replace(options, scheduler="euler"), progress=False)


# ---- conditional models: requests drawn as the data, scored by its classifier beside the held-out floor ----------


@pytest.fixture
def digit_model(tmp_path):
    """A 16 px digit model conditioned on MNIST's `label` (its class embedding, the null class last), as exported."""
    from tiny_models import DIGITS

    unet = tiny_unet(channels=1, sample_size=16, num_class_embeds=11)
    return export_pipeline(unet, DDPMScheduler(), tmp_path / "cond-digits", condition=DIGITS)


def test_a_digit_model_is_asked_for_digits_as_the_data_holds_them(options, digit_model, mnist16, digit_classifier):
    from punkdiff.hub import load_pipeline
    from punkdiff.metrics.conditional import conditional_scores, data_requests
    from punkdiff.sampling import generate

    options = dataclasses.replace(options, model=str(digit_model), num_samples=20, batch_size=8, per_class=2,
                                  guidance_scale=2.0)
    result = evaluate_model(options, progress=False)
    saved = json.loads((options.out / "metrics.json").read_text())
    assert saved["conditional"] == result.conditional and saved["sampler"] == "ddim-2, eta 1, guidance 2"
    assert "20 conditions (label) of training rows drawn at random (seed 0)" in saved["requests"]
    conditional = result.conditional
    assert conditional["guidance_scale"] == 2.0 and set(saved["metrics"]) == set(result.evaluation.metrics)

    # the samples are the model's images for requests drawn from the training labels, scored as they are
    requests = data_requests(load_pipeline(digit_model).condition, mnist16, 20, seed=0)
    assert [r["label"] for r in requests] != [requests[0]["label"]] * 20  # drawn, not one label for all
    samples = np.load(options.out / SAMPLES_FILE)
    pipe = load_pipeline(digit_model)
    again = generate(pipe, 3, seed=0, sampler="ddim", num_inference_steps=2, eta=1.0, output_type="np",
                     attributes=requests[:3], guidance_scale=2.0, progress=False)
    assert np.abs((again * 255).round().astype(int).transpose(0, 3, 1, 2) - samples[:3]).max() <= 1
    expected = conditional_scores(digit_classifier, samples, {"label": [r["label"] for r in requests]})
    assert conditional["generated"] == expected.to_dict()
    counts = {name: c["requested"] for name, c in conditional["generated"]["per_class"].items()}
    assert counts == {d: [r["label"] for r in requests].count(d) for d in counts} and sum(counts.values()) == 20

    # balanced: every digit asked twice; the floor: every held-out digit against its true label
    assert {name: c["requested"] for name, c in conditional["balanced"]["per_class"].items()} == dict.fromkeys(
        "0123456789", 2)
    assert conditional["floor"]["num_images"] == len(mnist16.heldout) and conditional["floor"]["accuracy"] >= 0.95
    assert conditional["generated"]["accuracy"] < 0.5 < conditional["floor"]["accuracy"]  # an untrained model

    report = result.report.read_text()
    assert "## Conditional: what was asked against what was drawn (guidance 2)" in report
    floor_seven = conditional["floor"]["per_class"]["7"]
    assert "| floor accuracy |" in report and f"| {floor_seven['requested']} | {floor_seven['accuracy']:.4g} |" \
        in report
    balanced_row = next(line for line in report.splitlines() if line.startswith("| 7 |"))
    assert "| 2 |" in balanced_row


def test_eval_of_a_conditional_model_keeps_unconditional_numbers_for_the_same_images(options, digit_model,
                                                                                      digit_classifier):
    """Every other metric scores the samples as before: re-scoring the kept samples gives the same numbers."""
    options = dataclasses.replace(options, model=str(digit_model), per_class=0)
    first = evaluate_model(options, progress=False)
    assert first.conditional["balanced"] is None
    rescored = evaluate_model(EvalOptions(options.reference, out=options.out.parent / "again", preset=options.preset,
                                          samples=str(options.out / SAMPLES_FILE), cache_dir=options.cache_dir,
                                          reconstruction_images=0), progress=False)
    assert rescored.conditional is None and rescored.evaluation.metrics.keys() == first.evaluation.metrics.keys()
    for name, m in first.evaluation.metrics.items():  # up to float summation order, as for any re-scoring
        again = rescored.evaluation.metrics[name]
        assert again["model"] == pytest.approx(m["model"], rel=1e-6) and again["floor"] == m["floor"], name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guidance_scale": float("nan")}, "--guidance: guidance scale must be a finite"),
        ({"guidance_scale": -1.0}, "--guidance: guidance scale must be a finite"),
        ({"per_class": -3}, "--per-class -3: give a count of images per class"),
        ({"model": None, "guidance_scale": 2.0}, "--guidance apply to sampling a conditional model; existing images"),
        ({"unconditional": True, "guidance_scale": 2.0, "per_class": 5},
         "--guidance and --per-class apply to sampling a conditional model;"),
    ],
)
def test_guidance_that_cannot_apply_is_refused_before_sampling(options, digit_model, no_sampling, change, message):
    change = dict(change)
    samples = str(options.out) if "model" in change else None
    change.setdefault("model", options.model if change.pop("unconditional", False) else str(digit_model))
    options = dataclasses.replace(options, samples=samples, **change)
    with pytest.raises(EvaluationError, match=message):
        evaluate_model(options, progress=False)
    assert not (options.out / "metrics.json").exists()


def test_a_reference_without_the_models_conditions_is_refused_before_sampling(options, tmp_path, no_sampling,
                                                                               digit_classifier):
    from punkdiff.pipelines.punkdiff_pipeline import ConditionGroup, ConditionVocabulary

    words = ConditionVocabulary((ConditionGroup("label", "single", ("zero", "one", "two", "three", "four", "five",
                                                                   "six", "seven", "eight", "nine")),))
    model = export_pipeline(tiny_unet(channels=1, sample_size=16, num_class_embeds=11), DDPMScheduler(),
                            tmp_path / "words", condition=words)
    with pytest.raises(EvaluationError, match=r"does not hold the conditions this model was trained on \(unknown "
                                              r"label '\d'.*known label values \(10\): zero, one"):
        evaluate_model(dataclasses.replace(options, model=str(model)), progress=False)
