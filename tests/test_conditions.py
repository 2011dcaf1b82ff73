"""Conditions: vocabularies from the real mirrors, encodings, requests, guidance drops and rare-class weights."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from punkdiff.conditions import (
    CLASS_INDEX,
    MULTI,
    MULTI_HOT,
    SINGLE,
    ConditionError,
    ConditionVocabulary,
    balanced_row_weights,
    class_weights,
    drop_conditions,
    vocabulary_from_dataset,
)

PUNK_TYPES = ("Alien", "Ape", "Zombie", "Female", "Male")


@pytest.fixture(scope="module")
def splits(mnist_dir, punks_dir) -> dict[str, datasets.Dataset]:
    """The mirrors' train splits: MNIST's 5,000 digits and the 10,000 punks."""
    return {name: datasets.load_dataset(str(path), split="train") for name, path in
            (("mnist", mnist_dir), ("punks", punks_dir))}


@pytest.fixture(scope="module")
def mnist_train(splits):
    return splits["mnist"]


@pytest.fixture(scope="module")
def punks(splits):
    return splits["punks"]


@pytest.fixture(scope="module")
def punk_vocabulary(punks):
    return vocabulary_from_dataset(punks, "type,accessories")


@pytest.fixture(scope="module")
def punk_rows(punks):
    return punks.select_columns(["type", "accessories"]).to_dict()


def test_mnist_digits_are_one_class_index_with_a_null_class(mnist_train):
    vocabulary = vocabulary_from_dataset(mnist_train, "label")
    assert vocabulary.encoding == CLASS_INDEX and vocabulary.columns == ("label",)
    group = vocabulary.groups[0]
    assert group.kind == SINGLE and group.names == tuple("0123456789")
    assert group.counts == (500,) * 10 and vocabulary.num_rows == 5000  # the mirror's 500 digits per class
    assert vocabulary.null_class == 10 and vocabulary.unet_kwargs() == {"num_class_embeds": 11}
    rows = mnist_train.select(range(64)).select_columns(["label"]).to_dict()
    assert vocabulary.encode(rows).tolist() == rows["label"]
    assert vocabulary.encode_request(labels=[3, "7", None]).tolist() == [3, 7, 10]
    assert vocabulary.encode_request(labels=np.array([3, 7])).tolist() == [3, 7]  # numpy integers are indices too
    assert vocabulary.encode_request(labels=4).tolist() == [4]
    assert vocabulary.null(2).tolist() == [10, 10]
    assert vocabulary.decode(torch.tensor([3, 10])) == {"label": ["3", None]}


def test_a_label_out_of_range_or_unknown_is_refused_naming_what_is_known(mnist_train):
    vocabulary = vocabulary_from_dataset(mnist_train, ["label"])
    with pytest.raises(ConditionError, match=r"label 10 is out of range: give an index in 0\.\.9"):
        vocabulary.encode_request(labels=[3, 10])
    with pytest.raises(ConditionError, match=r"label -1 is out of range"):
        vocabulary.encode_request(labels=[-1])
    with pytest.raises(ConditionError, match=r"unknown label 'seven'.*known label values \(10\): 0, 1, 2"):
        vocabulary.encode_request(labels=["seven"])
    with pytest.raises(ConditionError, match="neither a name nor an index"):
        vocabulary.encode_request(labels=[True])
    with pytest.raises(ConditionError, match=r"labels=\[\] asks for no images"):
        vocabulary.encode_request(labels=[])
    with pytest.raises(ConditionError, match="either labels"):
        vocabulary.encode_request(labels=[1], attributes={"label": 1})


def test_punks_type_and_accessories_build_a_multi_hot_vocabulary_with_counts(punk_vocabulary, punk_rows):
    kinds = {g.column: (g.kind, g) for g in punk_vocabulary.groups}
    assert punk_vocabulary.encoding == MULTI_HOT and punk_vocabulary.columns == ("type", "accessories")
    types, accessories = kinds["type"][1], kinds["accessories"][1]
    assert types.kind == SINGLE and types.names == PUNK_TYPES
    assert types.counts == (9, 24, 88, 3840, 6039)  # as the mirror's README lists them
    assert accessories.kind == MULTI and len(accessories.names) == 87
    assert list(accessories.names) == sorted(accessories.names)
    assert sum(accessories.counts) == sum(len(a) for a in punk_rows["accessories"])
    assert min(accessories.counts) >= 1
    assert punk_vocabulary.width == 5 + 87 + 1  # the accessories block ends with its "nothing" slot
    assert punk_vocabulary.unet_kwargs() == {"class_embed_type": "identity"}


def test_encoding_punks_decodes_back_to_their_rows(punk_vocabulary, punk_rows):
    encoded = punk_vocabulary.encode(punk_rows)
    assert encoded.shape == (10_000, 93) and encoded.dtype == torch.float32
    type_block = encoded[:, punk_vocabulary.block("type")]
    assert torch.equal(type_block.sum(dim=1), torch.ones(10_000))  # one type each, never unspecified
    decoded = punk_vocabulary.decode(encoded)
    assert decoded["type"] == [PUNK_TYPES[t] for t in punk_rows["type"]]
    assert [sorted(a) for a in decoded["accessories"]] == [sorted(a) for a in punk_rows["accessories"]]
    bare = [i for i, a in enumerate(punk_rows["accessories"]) if not a]
    assert len(bare) == 8  # punks with no accessory: the "nothing" slot, not the unspecified all-zero block
    assert encoded[bare, punk_vocabulary.block("accessories")].sum(dim=1).tolist() == [1.0] * 8


def test_a_request_sets_exactly_what_was_asked_and_leaves_the_rest_unspecified(punk_vocabulary):
    accessories = punk_vocabulary.groups[1].names
    ape = punk_vocabulary.encode_request(attributes={"type": "Ape", "accessories": ["Cap", "3D Glasses"]})
    start = punk_vocabulary.block("accessories").start
    expected = {PUNK_TYPES.index("Ape"), start + accessories.index("Cap"), start + accessories.index("3D Glasses")}
    assert set(torch.flatten(ape.nonzero()[:, 1]).tolist()) == expected
    only_type, only_cap, bare = punk_vocabulary.encode_request(attributes=[
        {"type": "Zombie"}, {"accessories": "Cap"}, {"type": "Male", "accessories": []}])
    assert only_type[punk_vocabulary.block("accessories")].sum() == 0  # left out: unspecified
    assert only_cap[punk_vocabulary.block("type")].sum() == 0
    assert bare[-1] == 1 and bare[start:-1].sum() == 0  # an empty list asks for no accessory
    # labels= names the one single-label column
    assert torch.equal(punk_vocabulary.encode_request(labels=["Zombie"]), only_type[None])


def test_unknown_attributes_are_refused_with_the_closest_known_names_first(punk_vocabulary):
    with pytest.raises(ConditionError) as err:
        punk_vocabulary.encode_request(attributes={"type": "Ape", "accessories": ["3D Glases"]})
    message = str(err.value)
    assert "unknown accessories '3D Glases'; closest: '3D Glasses'" in message
    assert "known accessories values (87)" in message and "Pipe" in message
    with pytest.raises(ConditionError, match=r"unknown type 'Robot'.*Alien, Ape, Zombie, Female, Male"):
        punk_vocabulary.encode_request(attributes={"type": "Robot"})
    with pytest.raises(ConditionError, match=r"unknown attribute 'hat'; .*type \(single-label\), accessories"):
        punk_vocabulary.encode_request(attributes={"hat": "Cap"})


def test_columns_that_cannot_condition_are_refused_listing_the_columns_and_types(punks):
    with pytest.raises(ConditionError) as err:
        vocabulary_from_dataset(punks, "typ")
    message = str(err.value)
    assert "no column 'typ'" in message and "type: ClassLabel(names=['Alien'" in message
    assert "accessories: List(Value('string'))" in message and "must be a ClassLabel column" in message
    with pytest.raises(ConditionError, match=r"column 'id' holds Value\('int32'\).*class_encode_column\('id'\)"):
        vocabulary_from_dataset(punks, "type,id")
    with pytest.raises(ConditionError, match="column 'image' holds Image"):
        vocabulary_from_dataset(punks, "image")
    with pytest.raises(ConditionError, match="no empty names"):
        vocabulary_from_dataset(punks, "type,")
    with pytest.raises(ConditionError, match="names a column twice"):
        vocabulary_from_dataset(punks, "type, type")
    labels_only = vocabulary_from_dataset(punks, "accessories")
    with pytest.raises(ConditionError, match="labels=... needs exactly one single-label column"):
        labels_only.encode_request(labels=["Cap"])


def test_a_sequence_of_class_labels_is_multi_label_with_the_features_names():
    features = datasets.Features({"tags": datasets.Sequence(datasets.ClassLabel(names=["red", "green", "blue"]))})
    rows = datasets.Dataset.from_dict({"tags": [[0, 2], [2], [], [2, 2]]}, features=features)
    vocabulary = vocabulary_from_dataset(rows, "tags")
    assert vocabulary.encoding == MULTI_HOT and vocabulary.groups[0].names == ("red", "green", "blue")
    assert vocabulary.groups[0].counts == (1, 0, 3)  # rows holding each, a repeat counted once
    assert vocabulary.encode(rows.to_dict()).tolist() == [[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


def test_the_vocabulary_survives_json_and_reads_as_a_model_card_section(punk_vocabulary, tmp_path):
    path = tmp_path / "condition.json"
    path.write_text(punk_vocabulary.to_json())
    again = ConditionVocabulary.from_json(path.read_text())
    assert again == punk_vocabulary and again.groups[1].counts == punk_vocabulary.groups[1].counts
    assert "- `type`: one of 5: Alien (9), Ape (24), Zombie (88), Female (3,840), Male (6,039)" in again.markdown()
    assert "- `accessories`: any set of 87:" in again.markdown()
    with pytest.raises(ConditionError, match="not a punkdiff condition"):
        ConditionVocabulary.from_json('{"groups": []}')
    with pytest.raises(ConditionError, match="not valid JSON"):
        ConditionVocabulary.from_json("{")
    newer = dict(punk_vocabulary.to_dict(), version=99)
    with pytest.raises(ConditionError, match="version 99"):
        ConditionVocabulary.from_dict(newer)


def test_class_index_drops_are_deterministic_and_at_the_requested_rate(mnist_train):
    vocabulary = vocabulary_from_dataset(mnist_train, "label")
    labels = torch.arange(20_000) % 10
    a = drop_conditions(labels, vocabulary, torch.Generator().manual_seed(1), condition_drop=0.1)
    b = drop_conditions(labels, vocabulary, torch.Generator().manual_seed(1), condition_drop=0.1)
    c = drop_conditions(labels, vocabulary, torch.Generator().manual_seed(2), condition_drop=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = a == vocabulary.null_class
    assert 0.09 < dropped.float().mean() < 0.11
    assert torch.equal(a[~dropped], labels[~dropped])
    assert torch.equal(drop_conditions(labels, vocabulary, torch.Generator(), condition_drop=0.0), labels)
    with pytest.raises(ConditionError, match=r"condition_drop must be a probability in \[0, 1\], got 1.5"):
        drop_conditions(labels, vocabulary, torch.Generator(), condition_drop=1.5)


def test_group_drops_zero_whole_blocks_and_consume_the_same_random_numbers(punk_vocabulary, punk_rows):
    encoded = punk_vocabulary.encode(punk_rows)
    encoded = torch.cat([encoded, encoded])  # 20,000 rows
    generator = torch.Generator().manual_seed(0)
    dropped = drop_conditions(encoded, punk_vocabulary, generator, condition_drop=0.1, group_drop=0.05)
    after = generator.get_state()
    types, accessories = (dropped[:, punk_vocabulary.block(c)] for c in ("type", "accessories"))
    type_gone, acc_gone = types.sum(dim=1) == 0, accessories.sum(dim=1) == 0
    both = type_gone & acc_gone
    assert 0.09 < both.float().mean() < 0.115  # the whole condition, plus both groups by chance (0.0025)
    assert 0.035 < (type_gone & ~acc_gone).float().mean() < 0.055  # 0.9 * 0.95 * 0.05
    assert 0.035 < (acc_gone & ~type_gone).float().mean() < 0.055
    kept = ~type_gone & ~acc_gone
    assert torch.equal(dropped[kept], encoded[kept])  # what is not dropped is untouched
    assert torch.equal(types[~type_gone], encoded[~type_gone][:, punk_vocabulary.block("type")])
    # the same draws whatever the content, so exact resume only needs the generator's state
    again = torch.Generator().manual_seed(0)
    drop_conditions(torch.zeros_like(encoded), punk_vocabulary, again)
    assert torch.equal(again.get_state(), after)


def test_rare_types_weigh_more_by_the_square_root_of_their_rarity_capped(punk_vocabulary, punk_rows):
    weights = class_weights(punk_vocabulary.groups[0])
    assert weights[PUNK_TYPES.index("Male")] == pytest.approx(1.0)
    assert weights[PUNK_TYPES.index("Female")] == pytest.approx((6039 / 3840) ** 0.5, rel=1e-5)
    assert weights[PUNK_TYPES.index("Zombie")] == pytest.approx((6039 / 88) ** 0.5, rel=1e-5)  # 8.3: under the cap
    assert weights[PUNK_TYPES.index("Alien")] == pytest.approx(10.0)  # 25.9 capped
    rows = balanced_row_weights(punk_vocabulary.encode(punk_rows), punk_vocabulary)
    assert rows.shape == (10_000,) and rows.mean() == pytest.approx(1.0, rel=1e-5)
    types = torch.tensor(punk_rows["type"])
    alien, male = PUNK_TYPES.index("Alien"), PUNK_TYPES.index("Male")
    assert rows[types == alien][0] / rows[types == male][0] == pytest.approx(10.0, rel=1e-5)
    share = rows[types == alien].sum() / rows.sum()
    total = 6039 + 3840 * (6039 / 3840) ** 0.5 + 88 * (6039 / 88) ** 0.5 + (24 + 9) * 10
    assert share == pytest.approx(9 * 10 / total, rel=1e-4)  # 0.0076: the 9 Aliens drawn 8x as often as uniformly
    with pytest.raises(ConditionError, match="max_ratio >= 1"):
        class_weights(punk_vocabulary.groups[0], max_ratio=0.5)


def test_dataset_rows_become_requests_by_name_that_encode_as_the_rows_do(punk_vocabulary, punk_rows):
    from punkdiff.conditions import requests_from_rows

    features = datasets.Features({"type": datasets.ClassLabel(names=list(PUNK_TYPES)),
                                  "accessories": datasets.List(datasets.Value("string"))})
    indices = [0, 17, 4242]
    requests = requests_from_rows(punk_vocabulary, features, punk_rows, indices)
    assert requests[0] == {"type": PUNK_TYPES[punk_rows["type"][0]], "accessories": punk_rows["accessories"][0]}
    picked = {c: [punk_rows[c][i] for i in indices] for c in ("type", "accessories")}
    assert torch.equal(punk_vocabulary.encode_request(attributes=requests), punk_vocabulary.encode(picked))

    tags = datasets.Features({"tags": datasets.Sequence(datasets.ClassLabel(names=["red", "green", "blue"])),
                              "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"tags": [[0, 2], None], "label": [1, -1]}
    vocabulary = vocabulary_from_dataset(datasets.Dataset.from_dict({"tags": [[0]], "label": [0]}, features=tags),
                                         "label,tags")
    assert requests_from_rows(vocabulary, tags, rows, [0, 1]) == [{"label": "b", "tags": ["red", "blue"]}, {}]
    with pytest.raises(ConditionError, match="unknown accessories 'Bow Tie'; .*known accessories values"):
        requests_from_rows(punk_vocabulary, features, {"type": [3], "accessories": [["Bow Tie"]]}, [0])
    with pytest.raises(ConditionError, match=r"the data lacks the model's condition columns \['accessories'\]"):
        requests_from_rows(punk_vocabulary, features, {"type": [3]}, [0])
