"""Small CNN classifiers punkdiff trains on the data mirrors, to give an offline feature space and labels.

Without downloadable Inception weights, a classifier trained on the same data at the model's resolution and
preprocessing is the feature space that can be computed here: the Fréchet distance in its penultimate layer, the
class histogram of samples, and the share of confidently classified samples. Two tasks:

- digits (MNIST): 10 classes, trained on the mirror's train split, scored on the official test split;
- punk attributes (CryptoPunks): the type (5 classes) and the 87 accessories (multi-label), trained on one part
  of the punks and scored on the held-out rest.

A classifier trains once per (data, preprocessing, seed) and is cached as safetensors under
`$PUNKDIFF_CACHE/classifiers` (see `punkdiff.data.default_cache_dir`), with its held-out scores in the file's
metadata; training is seeded, so a cache miss reproduces the same weights on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from punkdiff.data import default_cache_dir
from punkdiff.files import atomic_path
from punkdiff.metrics.real_images import ReferenceData

# bump when the architecture or the training recipe changes, so old cache entries are not reused
_RECIPE_VERSION = 1
# Every classifier sees at least this many training images (6 epochs of MNIST's 5,000), so one trained on a small
# set is as well calibrated as MNIST's (fewer left the demo's judge under-confident: docs/results.md, "The demo").
# Tiny slices (tests, quick looks) stop at `_MAX_EPOCHS`.
_MIN_IMAGES_SEEN = 30_000
_MAX_EPOCHS = 40


class SmallCNN(nn.Module):
    """Two conv-conv-pool stages, a 4x4 pooled map and a 128-d embedding (the feature space), then a linear head.

    Works at any resolution from 8 px up (the adaptive pooling fixes the embedding's input size).

    Examples:
        >>> net = SmallCNN(in_channels=1, num_outputs=10)
        >>> net(torch.zeros(2, 1, 16, 16)).shape, net.features(torch.zeros(2, 1, 16, 16)).shape
        (torch.Size([2, 10]), torch.Size([2, 128]))
    """

    def __init__(self, in_channels: int, num_outputs: int, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierTask:
    """What a classifier predicts: `num_classes` exclusive classes, then `num_labels` independent binary labels."""

    name: str
    class_column: str
    class_names: tuple[str, ...]
    label_column: str | None = None
    label_names: tuple[str, ...] = ()
    max_shift: int = 0  # random translation (pixels) during training; digits are not always centred
    epochs: int = 6
    # weight the class loss by 1 / sqrt(class frequency): without it, classes under 1 % of the data (the punks'
    # Alien, Ape, Zombie) are hardly ever predicted, so a histogram of samples could not show them
    balance_classes: bool = False

    @property
    def num_outputs(self) -> int:
        return len(self.class_names) + len(self.label_names)


@dataclass
class Classifier:
    """A trained `SmallCNN` with its task and its held-out scores (`accuracy`, and `label_map` for multi-label)."""

    net: SmallCNN
    task: ClassifierTask
    scores: dict[str, float]

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> dict[str, np.ndarray]:
        """uint8 images `[N, C, H, W]` -> `features` (float64 `[N, 128]`), `class_probs` and `label_probs`."""
        self.net.eval()
        feats, logits = [], []
        images = torch.as_tensor(np.asarray(images))
        for start in range(0, len(images), batch_size):
            x = _to_input(images[start:start + batch_size])
            f = self.net.features(x)
            feats.append(f.double())
            logits.append(self.net.head(f).double())
        feats_t, logits_t = torch.cat(feats), torch.cat(logits)
        k = len(self.task.class_names)
        return {
            "features": feats_t.numpy(),
            "class_probs": logits_t[:, :k].softmax(dim=1).numpy(),
            "label_probs": logits_t[:, k:].sigmoid().numpy(),
        }


def _to_input(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (edge pixels repeated), a cheap augmentation."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate").permute(0, 2, 3, 1)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)


def train_classifier(
    task: ClassifierTask,
    images: np.ndarray,
    classes: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> SmallCNN:
    """Train a `SmallCNN` on uint8 images with integer `classes` `[N]` and optional binary `labels` `[N, L]`.

    Cross-entropy on the classes plus binary cross-entropy on the labels; AdamW with a one-cycle schedule, a few
    epochs (timing: docs/evaluation.md). Deterministic for a seed.
    """
    # about 40 steps an epoch whatever the data's size (128 images a batch at 5,000): a small slice still trains
    batch_size = batch_size or int(np.clip(len(images) // 40, 32, 128))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(images.shape[1], task.num_outputs)
    x_all = torch.as_tensor(np.asarray(images))
    y_all = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    l_all = torch.as_tensor(np.asarray(labels), dtype=torch.float32) if labels is not None else None
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=task.epochs * steps_per_epoch)
    k = len(task.class_names)
    class_weight = balanced_class_weights(y_all, k) if task.balance_classes else None
    net.train()
    for _ in tqdm(range(task.epochs), desc=f"training the {task.name} classifier", unit="epoch", disable=not progress):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(x_all), batch_size):
            index = order[start:start + batch_size]
            x = _shift(_to_input(x_all[index]), task.max_shift, generator)
            logits = net(x)
            loss = F.cross_entropy(logits[:, :k], y_all[index], weight=class_weight)
            if l_all is not None:
                # summed over the labels, not averaged: each rare accessory weighs as much as the class
                loss = loss + F.binary_cross_entropy_with_logits(logits[:, k:], l_all[index], reduction="sum") / len(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def balanced_class_weights(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy weights `1 / sqrt(class frequency)`: a class 100x rarer weighs 10x more.

    Full inverse-frequency weights (the 9 Aliens among 10,000 punks would weigh 1,000x a Male) made the punk
    classifier's training diverge (type accuracy 0.53); the square root found every held-out Ape and 38 of 39 Zombies
    where unweighted training found none and 11.
    """
    counts = torch.bincount(classes, minlength=num_classes).clamp(min=1).double()
    return (counts.sum() / counts).sqrt().float()


def task_for(reference: ReferenceData) -> ClassifierTask | None:
    """The classifier a reference dataset supports: its first class-label column, plus a column of string lists
    (multi-label attributes such as the punks' accessories) when it has one; None for unlabelled data."""
    import datasets

    class_column = next((k for k, v in reference.features.items() if isinstance(v, datasets.ClassLabel)), None)
    if class_column is None:
        return None
    label_column = next(
        (k for k, v in reference.features.items()
         if isinstance(v, (datasets.Sequence, datasets.List)) and getattr(v.feature, "dtype", None) == "string"),
        None,
    )
    classes = np.asarray(reference.train_columns[class_column])
    num_classes = len(reference.features[class_column].names)
    rarest = np.bincount(classes, minlength=num_classes).min() / max(len(classes), 1)
    label_names = ()
    if label_column:
        label_names = tuple(sorted({a for row in reference.train_columns[label_column] for a in row}))
    return ClassifierTask(
        name=class_column + (f"+{label_column}" if label_column else ""),
        class_column=class_column,
        class_names=tuple(reference.features[class_column].names),
        label_column=label_column,
        label_names=label_names,
        max_shift=0 if label_column or reference.transform.resize_filter == "nearest" else 1,
        # 87 accessories need many passes: on the punks' 5,000-image half, held-out mAP 0.51 at 8 epochs, 0.81 at 16,
        # 0.94 at 32
        epochs=epochs_for(len(reference.train), 32 if label_column else 6),
        balance_classes=bool(rarest < 0.2 / num_classes),  # a class under a fifth of its even share (not MNIST's)
    )


def epochs_for(num_images: int, epochs: int) -> int:
    """`epochs`, or more on a small training set, so the classifier sees at least `_MIN_IMAGES_SEEN` images."""
    return int(np.clip(math.ceil(_MIN_IMAGES_SEEN / max(num_images, 1)), epochs, max(epochs, _MAX_EPOCHS)))


def targets(task: ClassifierTask, columns: dict[str, list]) -> tuple[np.ndarray, np.ndarray | None]:
    """Integer classes `[N]` and binary labels `[N, L]` (None without a label column) from dataset columns."""
    classes = np.asarray(columns[task.class_column], dtype=np.int64)
    if task.label_column is None:
        return classes, None
    position = {name: i for i, name in enumerate(task.label_names)}
    labels = np.zeros((len(classes), len(task.label_names)), dtype=np.float32)
    for row, names in enumerate(columns[task.label_column]):
        labels[row, [position[n] for n in names if n in position]] = 1.0
    return classes, labels


def held_out_scores(classifier: Classifier, reference: ReferenceData) -> dict[str, float]:
    """Accuracy on the held-out classes and, with labels, their mean average precision (torchmetrics, macro over
    the labels that occur in the held-out set)."""
    from torchmetrics.functional.classification import multilabel_average_precision

    classes, labels = targets(classifier.task, reference.heldout_columns)
    predictions = classifier.predict(reference.heldout)
    scores = {"accuracy": float((predictions["class_probs"].argmax(axis=1) == classes).mean())}
    if labels is not None:
        present = labels.sum(axis=0) > 0
        per_label = multilabel_average_precision(
            torch.as_tensor(predictions["label_probs"][:, present]), torch.as_tensor(labels[:, present]).long(),
            num_labels=int(present.sum()), average="none",
        )
        scores["label_map"] = float(per_label.double().mean())
    return scores


def load_or_train_classifier(
    reference: ReferenceData,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Classifier | None:
    """The classifier for `reference`'s labels (None for unlabelled data), trained on `reference.train` once and
    then read from the safetensors cache, with its held-out scores.

    Examples:
        ```py
        >>> reference = load_reference("../shared/datasets/mnist", ImageTransform(16, 1, resize_filter="bilinear"))
        >>> load_or_train_classifier(reference).scores["accuracy"]  # on the official test split
        0.98...
        ```
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    task = task_for(reference)
    if task is None:
        return None
    key = hashlib.sha256(json.dumps(
        [_RECIPE_VERSION, asdict(task), reference.fingerprint, seed], sort_keys=True
    ).encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / "classifiers" / f"{task.name}-{key}.safetensors"
    net = SmallCNN(reference.train.shape[1], task.num_outputs)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            net.load_state_dict({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
            scores = json.loads(f.metadata()["scores"])
        return Classifier(net.eval(), task, scores)
    classes, labels = targets(task, reference.train_columns)
    net = train_classifier(task, reference.train, classes, labels, seed=seed, progress=progress)
    classifier = Classifier(net, task, {})
    classifier.scores = held_out_scores(classifier, reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"scores": json.dumps(classifier.scores), "task": json.dumps(asdict(task))})
    return classifier
