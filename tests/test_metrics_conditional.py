"""Conditional accuracy: real images with their true conditions score high, with shuffled ones low."""

from __future__ import annotations

import numpy as np
import pytest

from punkdiff.metrics.conditional import conditional_scores


def shuffled(values: list, seed: int = 0) -> list:
    return [values[i] for i in np.random.default_rng(seed).permutation(len(values))]


def test_real_test_digits_are_the_digits_they_are_labelled(mnist16, digit_classifier):
    images, labels = mnist16.heldout[:2000], mnist16.heldout_columns["label"][:2000]
    scores = conditional_scores(digit_classifier, images, {"label": labels})
    assert scores.num_images == 2000 and scores.accuracy >= 0.95
    assert set(scores.per_class) == set("0123456789")
    assert sum(c["requested"] for c in scores.per_class.values()) == 2000
    assert min(c["accuracy"] for c in scores.per_class.values()) >= 0.9
    assert scores.label_recall is None and scores.spurious_per_image is None  # digits have no labels
    by_name = conditional_scores(digit_classifier, images, {"label": [str(d) for d in labels]})
    assert by_name.to_dict() == scores.to_dict()


def test_digits_asked_for_at_random_are_rarely_what_is_drawn(mnist16, digit_classifier):
    labels = mnist16.heldout_columns["label"][:2000]
    scores = conditional_scores(digit_classifier, mnist16.heldout[:2000], {"label": shuffled(labels)})
    assert scores.accuracy <= 0.2  # chance is 0.1


def test_unspecified_requests_are_left_out(mnist16, digit_classifier):
    labels = list(mnist16.heldout_columns["label"][:200])
    half = labels[:100] + [None] * 50 + [-1] * 50
    scores = conditional_scores(digit_classifier, mnist16.heldout[:200], {"label": half})
    assert sum(c["requested"] for c in scores.per_class.values()) == 100
    first = conditional_scores(digit_classifier, mnist16.heldout[:100], {"label": labels[:100]})
    assert scores.accuracy == first.accuracy


def test_real_punks_show_their_type_and_accessories_and_few_others(punks24, punk_classifier):
    scores = conditional_scores(punk_classifier, punks24.heldout, punks24.heldout_columns)
    assert scores.accuracy >= 0.97
    assert scores.per_class["Male"]["accuracy"] >= 0.98 and scores.per_class["Female"]["accuracy"] >= 0.98
    # the floor of the classifier trained on 1,000 punks: it finds about three quarters of the accessories
    assert scores.label_recall >= 0.65 and scores.spurious_per_image <= 0.15
    assert scores.per_label_recall["Earring"]["requested"] > 100


def test_punks_asked_for_someone_elses_accessories_score_low(punks24, punk_classifier):
    columns = punks24.heldout_columns
    true = conditional_scores(punk_classifier, punks24.heldout, columns)
    wrong = conditional_scores(punk_classifier, punks24.heldout,
                               {"type": shuffled(columns["type"]), "accessories": shuffled(columns["accessories"])})
    assert wrong.label_recall <= 0.2 < true.label_recall
    assert wrong.spurious_per_image >= 1.0 > true.spurious_per_image
    assert wrong.accuracy <= 0.75 < true.accuracy


def test_a_partial_punk_request_scores_only_what_was_asked(punks24, punk_classifier):
    images, columns = punks24.heldout[:100], {k: v[:100] for k, v in punks24.heldout_columns.items()}
    types_only = conditional_scores(punk_classifier, images, {"type": ["Male"] * 100, "accessories": [None] * 100})
    assert types_only.label_recall is None and types_only.spurious_per_image is None
    predicted = punk_classifier.predict(images)["class_probs"].argmax(axis=1)
    assert types_only.accuracy == pytest.approx(np.mean(predicted == 4))  # the share drawn as Male
    assert list(types_only.per_class) == ["Male"] and 0.4 < types_only.accuracy < 0.8
    made_up = [list(a) + ["Halo"] for a in columns["accessories"]]
    with_unknown = conditional_scores(punk_classifier, images, {"accessories": made_up})
    assert with_unknown.unscored_labels == 100 and with_unknown.accuracy is None
    assert with_unknown.label_recall == conditional_scores(punk_classifier, images, columns).label_recall


def test_requests_the_classifier_cannot_score_are_refused(mnist16, digit_classifier, punk_classifier, punks24):
    images = mnist16.heldout[:10]
    with pytest.raises(ValueError, match="include none of the columns the label classifier predicts: label"):
        conditional_scores(digit_classifier, images, {"type": [1] * 10})
    with pytest.raises(ValueError, match="10 images but 9 requested 'label' values"):
        conditional_scores(digit_classifier, images, {"label": [1] * 9})
    with pytest.raises(ValueError, match="out of range: 0..9"):
        conditional_scores(digit_classifier, images, {"label": [10] * 10})
    with pytest.raises(ValueError, match="'Robot' is not a class the classifier knows: Alien, Ape"):
        conditional_scores(punk_classifier, punks24.heldout[:2], {"type": ["Robot", "Ape"]})


# ---- what a conditional model is asked for in its evaluation ------------------------------------------------------


@pytest.fixture(scope="module")
def punk_vocabulary(punks24):
    from punkdiff.conditions import vocabulary_from_columns

    return vocabulary_from_columns(punks24.features, {c: punks24.train_columns[c] for c in ("type", "accessories")})


def test_data_requests_follow_the_training_rows(punks24, punk_vocabulary):
    from punkdiff.metrics.conditional import data_requests

    requests = data_requests(punk_vocabulary, punks24, 3000, seed=5)
    assert requests == data_requests(punk_vocabulary, punks24, 3000, seed=5) != data_requests(
        punk_vocabulary, punks24, 3000, seed=6)
    names = punks24.features["type"].names
    rows = {(names[t], tuple(a)) for t, a in zip(punks24.train_columns["type"], punks24.train_columns["accessories"],
                                                  strict=True)}
    assert all((r["type"], tuple(r["accessories"])) in rows for r in requests)  # each is some training punk
    share = np.mean([r["type"] == "Male" for r in requests])
    true_share = np.mean([names[t] == "Male" for t in punks24.train_columns["type"]])
    assert abs(share - true_share) < 0.05  # the data's own mix


def test_balanced_requests_ask_for_every_type_equally(punks24, punk_vocabulary):
    from punkdiff.metrics.conditional import balanced_requests

    requests = balanced_requests(punk_vocabulary, punks24, 4, seed=0)
    assert [r["type"] for r in requests] == [t for t in punk_vocabulary.groups[0].names for _ in range(4)]
    names = punks24.features["type"].names
    rows = {(names[t], tuple(a)) for t, a in zip(punks24.train_columns["type"], punks24.train_columns["accessories"],
                                                  strict=True)}
    for request in requests:  # a training punk of that type, or the type alone where the data has none
        assert (request["type"], tuple(request["accessories"])) in rows if "accessories" in request else \
            request["type"] not in {names[t] for t in punks24.train_columns["type"]}
    assert balanced_requests(punk_vocabulary, punks24, 0) == []


def test_real_punks_asked_as_the_data_score_like_the_floor(punks24, punk_classifier, punk_vocabulary):
    """Held-out punks used as "samples" for requests of their own conditions: the generated scores match the
    floor's, and a shuffled pairing falls well below it."""
    from punkdiff.conditions import requests_from_rows
    from punkdiff.metrics.conditional import conditional_evaluation
    from punkdiff.metrics.report import conditional_lines, format_conditional

    own = requests_from_rows(punk_vocabulary, punks24.features, punks24.heldout_columns, range(len(punks24.heldout)))
    columns = ("type", "accessories")
    result = conditional_evaluation(punk_classifier, punks24, columns, 3.0, punks24.heldout, own,
                                    balanced=(punks24.heldout, shuffled(own)))
    assert result["generated"] == result["floor"] and result["guidance_scale"] == 3.0
    assert result["balanced"]["label_recall"] < 0.5 * result["floor"]["label_recall"]

    lines = "\n".join(conditional_lines(result))
    male = result["floor"]["per_class"]["Male"]
    assert f"| Male | {male['requested']} | {male['accuracy']:.4g} |" in lines
    earring = result["floor"]["per_label_recall"]["Earring"]
    assert f"| Earring | {earring['requested']} | {earring['recall']:.4g} | {earring['requested']} |" in lines
    assert "labels found, not requested, per image" in format_conditional(result)
