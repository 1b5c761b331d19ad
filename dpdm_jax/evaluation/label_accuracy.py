"""Label accuracy: does class conditioning work? A real-data classifier labels conditional samples.

    label_accuracy = (1/N) sum_i [argmax_c f(x_i) = y_i],   per class c: the same over {i : y_i = c}

where x_i was generated conditioned on label y_i and f is a CNN (``classifiers.CNN``, trained with
``classifiers.train_and_evaluate``: Adam, a few epochs, the epoch picked on a 10% held-out part of
the real training split) trained once on the REAL training set of the dataset. Its accuracy on
the real test set is recorded with it and reported next to every label accuracy: a sample
fraction can only be read against the classifier's own error rate.

Privacy: the classifier is a function of the PRIVATE training set, not privatised, so label
accuracies are outside the (epsilon, delta) guarantee (like FID's reference statistics).

Cache: ``<cache_dir>/<dataset>_<kind>_<recipe hash>.npz`` (default cache dir
~/.cache/dpdm_jax/label_classifiers) holding the parameters, the recipe (JSON) and the recorded
test accuracy; the hash covers everything that changes the trained weights (kind, epochs,
learning rate, batch size, seed, validation fraction, training set size and image shape).

CLI (labels of a ``--mode=sample`` samples.npz, JSON on stdout)::

    python -m dpdm_jax.evaluation.label_accuracy --samples=WORKDIR/samples/samples.npz --dataset=mnist
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Any, Optional

import numpy as np

from dpdm_jax.evaluation import classifiers

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "dpdm_jax", "label_classifiers")
CACHE_FORMAT = "dpdm_jax-label-classifier-v1"
DEFAULT_EPOCHS = 2
DEFAULT_LEARNING_RATE = 1e-3
OUTSIDE_DP = ("The label classifier is trained on the PRIVATE training set (not privatised); label "
              "accuracies are outside the (epsilon, delta) guarantee.")


@dataclasses.dataclass(frozen=True)
class LabelClassifier:
    """A trained ``classifiers`` model with its recorded real test accuracy."""

    kind: str
    num_classes: int
    params: Any = dataclasses.field(repr=False)
    test_accuracy: float
    recipe: dict = dataclasses.field(default_factory=dict)
    cnn_padding: str = "VALID"

    def predict(self, images) -> np.ndarray:
        """int32 class of each uint8 image (N, H, W[, C])."""
        return classifiers.predict(self.kind, self.params, images, self.num_classes, self.cnn_padding)


def label_accuracy(images, labels, classifier, num_classes: Optional[int] = None) -> dict:
    """Fraction of ``images`` that ``classifier`` assigns to the label they were conditioned on.

    ``classifier``: anything with ``predict(images) -> labels`` (a ``LabelClassifier``); its
    ``test_accuracy`` and ``num_classes`` are used when present. Returns dict(overall, per_class
    (list over classes; None for a class with no samples), per_class_counts, num_samples,
    classifier_test_accuracy).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if len(labels) == 0 or len(labels) != len(images):
        raise ValueError(f"need as many labels as images (> 0): {len(labels)} vs {len(images)}")
    num_classes = num_classes or getattr(classifier, "num_classes", None) or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    pred = np.asarray(classifier.predict(images))
    if pred.shape != labels.shape:
        raise ValueError(f"classifier returned {pred.shape} predictions for {labels.shape} labels")
    hit = pred == labels
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=hit, minlength=num_classes)
    test_acc = getattr(classifier, "test_accuracy", None)
    return {
        "overall": float(hit.mean()),
        "per_class": [float(h / c) if c else None for h, c in zip(hits, counts)],
        "per_class_counts": [int(c) for c in counts],
        "num_samples": int(len(labels)),
        "classifier_test_accuracy": None if test_acc is None else float(test_acc),
    }


# ----------------------------------------------------------------------------------------------
# The cached classifier


def recipe(dataset: str, train_images: np.ndarray, num_classes: int, kind: str = "cnn",
           epochs: int = DEFAULT_EPOCHS, learning_rate: float = DEFAULT_LEARNING_RATE,
           batch_size: int = 128, seed: int = 0, val_fraction: float = 0.1,
           cnn_padding: Optional[str] = None) -> dict:
    """Everything that determines the trained weights (and so the cache key).

    ``cnn_padding`` None: 'VALID' (the reference CNN) for images of at least 18x18, else 'SAME'
    (three unpadded 3x3 convs and two pools leave nothing of a smaller image).
    """
    if cnn_padding is None:
        cnn_padding = "VALID" if min(np.shape(train_images)[1:3]) >= 18 else "SAME"
    return dict(format=CACHE_FORMAT, dataset=dataset, split="train", num_train=int(len(train_images)),
                image_shape=[int(d) for d in np.shape(train_images)[1:]], num_classes=int(num_classes),
                kind=kind, epochs=int(epochs), learning_rate=float(learning_rate),
                batch_size=int(batch_size), seed=int(seed), val_fraction=float(val_fraction),
                cnn_padding=cnn_padding)


def cache_path(rec: dict, cache_dir: Optional[str] = None) -> str:
    digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR),
                        f"{rec['dataset']}_{rec['kind']}_{digest}.npz")


def save_classifier(path: str, clf: LabelClassifier, **meta) -> None:
    from flax import traverse_util  # noqa: PLC0415

    flat = traverse_util.flatten_dict(clf.params, sep="/")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, __format__=np.array(CACHE_FORMAT), recipe=np.array(json.dumps(clf.recipe)),
             test_accuracy=np.array(clf.test_accuracy),
             **{f"param/{k}": np.asarray(v) for k, v in flat.items()},
             **{k: np.array(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_classifier(path: str) -> LabelClassifier:
    from flax import traverse_util  # noqa: PLC0415

    with np.load(path, allow_pickle=False) as z:
        if str(z["__format__"]) != CACHE_FORMAT:
            raise ValueError(f"{path}: not a {CACHE_FORMAT} file")
        rec = json.loads(str(z["recipe"]))
        flat = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
        test_acc = float(z["test_accuracy"])
    return LabelClassifier(rec["kind"], rec["num_classes"], traverse_util.unflatten_dict(flat, sep="/"),
                           test_acc, rec, rec["cnn_padding"])


_LOADED: dict = {}  # path -> LabelClassifier: the training log asks for it at every evaluation


def get_label_classifier(dataset: str, train=None, test=None, data_dir: Optional[str] = None,
                         cache_dir: Optional[str] = None, retrain: bool = False, **recipe_kw
                         ) -> LabelClassifier:
    """The cached classifier of ``dataset`` for this recipe; trains and caches it if absent.

    ``train`` / ``test``: ``dpdm_jax.data.Dataset``s (default: ``load_dataset(dataset, 'train'
    / 'test', data_dir)``); ``recipe_kw``: ``recipe``'s keyword arguments (kind, epochs, ...).
    """
    if train is None:
        from dpdm_jax.data import load_dataset  # noqa: PLC0415

        train = load_dataset(dataset, "train", data_dir)
    if train.labels is None:
        raise ValueError(f"{dataset} has no labels: label accuracy needs a labelled dataset")
    rec = recipe(dataset, train.images, train.num_classes, **recipe_kw)
    path = cache_path(rec, cache_dir)
    if not retrain and path in _LOADED:
        return _LOADED[path]
    if not retrain and os.path.exists(path):
        clf = load_classifier(path)
        if clf.recipe == rec:
            log.info("label classifier from %s (real test accuracy %.4f)", path, clf.test_accuracy)
            _LOADED[path] = clf
            return clf
        log.warning("ignoring %s: its recipe differs", path)
    if test is None:
        from dpdm_jax.data import load_dataset  # noqa: PLC0415

        test = load_dataset(dataset, "test", data_dir)
    log.info("training the %s label classifier on %s (%d images, %d epochs)", rec["kind"], dataset,
             len(train.images), rec["epochs"])
    r = classifiers.train_and_evaluate(
        rec["kind"], train.images, train.labels, test.images, test.labels, seed=rec["seed"],
        epochs=rec["epochs"], batch_size=rec["batch_size"], learning_rate=rec["learning_rate"],
        val_fraction=rec["val_fraction"], num_classes=rec["num_classes"],
        cnn_padding=rec["cnn_padding"], return_params=True)
    clf = LabelClassifier(rec["kind"], rec["num_classes"], r["params"], r["test_acc"], rec,
                          rec["cnn_padding"])
    save_classifier(path, clf, val_accuracy=r["val_acc"], best_epoch=r["best_epoch"],
                    train_seconds=r["seconds"])
    log.info("label classifier: real test accuracy %.4f (epoch %d), %.0f s; cached at %s",
             r["test_acc"], r["best_epoch"], r["seconds"], path)
    _LOADED[path] = clf
    return clf


def conditional_metrics(images, labels, dataset: str, classifier=None, data_dir: Optional[str] = None,
                        cache_dir: Optional[str] = None, kid_reference: Optional[np.ndarray] = None,
                        kid_extractor=None, seed: int = 0, **recipe_kw) -> dict:
    """Metrics of class-conditional uint8 samples for the training log / eval report.

    {"label_accuracy": label_accuracy(...)} with the cached classifier of ``dataset`` (trained on
    first use: several CPU minutes for MNIST) unless ``classifier`` is given; with
    ``kid_reference`` features (``kid.reference_features``) and ``kid_extractor`` (an
    ``InceptionFeatureExtractor``) also "kid": ``kid.kid_of_images(...)``. Both are outside the DP
    guarantee (statistics of the private training set).
    """
    classifier = classifier or get_label_classifier(dataset, data_dir=data_dir, cache_dir=cache_dir,
                                                    **recipe_kw)
    out = {"label_accuracy": label_accuracy(images, labels, classifier)}
    if kid_reference is not None and kid_extractor is not None:
        from dpdm_jax.evaluation import kid  # noqa: PLC0415

        out["kid"] = kid.kid_of_images(images, kid_reference, kid_extractor, seed=seed)
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Label accuracy of class-conditional samples (JSON).")
    ap.add_argument("--samples", required=True, help="samples.npz of --mode=sample (images, labels)")
    ap.add_argument("--dataset", required=True, help="dataset whose real training set the "
                                                     "classifier is trained on (e.g. mnist)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None, help=f"default {DEFAULT_CACHE_DIR}")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        with np.load(args.samples, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        if len(labels) == 0:
            raise ValueError(f"{args.samples} has no labels (an unconditional model's samples)")
        clf = get_label_classifier(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                                   retrain=args.retrain, epochs=args.epochs)
        result = label_accuracy(images, labels, clf)
    except (OSError, KeyError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(samples=os.path.abspath(args.samples), dataset=args.dataset,
                  outside_dp_guarantee=OUTSIDE_DP)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
