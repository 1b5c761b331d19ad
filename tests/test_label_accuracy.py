"""Label accuracy: exact fractions from classifiers whose answers are known; the cache; the CLI."""
import json
import time

import numpy as np
import pytest

from dpdm_jax.data import Dataset
from dpdm_jax.evaluation import label_accuracy as la


class _PixelClassifier:
    """Answers the class written in pixel (0, 0): its predictions are known exactly."""

    num_classes = 4
    test_accuracy = 0.5

    def predict(self, images):
        return np.asarray(images)[:, 0, 0, 0].astype(np.int32)


def _images_with_answers(answers):
    x = np.zeros((len(answers), 8, 8, 1), np.uint8)
    x[:, 0, 0, 0] = answers
    return x


def test_fractions_are_exact_for_a_classifier_with_known_answers():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3], np.int32)
    answers = np.array([0, 0, 0, 1, 1, 0, 3, 3, 3, 3])  # 3/4, 1/2, 0/3, 1/1 right
    r = la.label_accuracy(_images_with_answers(answers), labels, _PixelClassifier())
    assert r["overall"] == pytest.approx(5 / 10)
    assert r["per_class"] == pytest.approx([3 / 4, 1 / 2, 0.0, 1.0])
    assert r["per_class_counts"] == [4, 2, 3, 1]
    assert r["num_samples"] == 10 and r["classifier_test_accuracy"] == 0.5


def test_a_class_without_samples_is_none_not_nan():
    labels = np.array([0, 1, 1], np.int32)
    r = la.label_accuracy(_images_with_answers(labels), labels, _PixelClassifier())
    assert r["overall"] == 1.0 and r["per_class"] == [1.0, 1.0, None, None]
    json.dumps(r, allow_nan=False)


def test_bad_labels_are_rejected():
    x = _images_with_answers([0, 1, 2])
    for bad in (np.array([0, 1], np.int32), np.array([0, 1, 4]), np.array([0.0, 1.0, 2.0]),
                np.zeros(0, np.int32)):
        with pytest.raises(ValueError):
            la.label_accuracy(x if len(bad) else x[:0], bad, _PixelClassifier())


def _separable(n, seed):
    """3 classes: a bright 4x4 square in one of three corners; trivially separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = rng.integers(0, 30, (n, 16, 16, 1)).astype(np.uint8)
    corners = [(0, 0), (0, 12), (12, 0)]
    for i, c in enumerate(y):
        r, s = corners[c]
        x[i, r:r + 4, s:s + 4] = 250
    return Dataset(x, y, 3, "toy/train")


def test_trained_classifier_is_cached_and_labels_separable_images(tmp_path):
    train, test = _separable(300, 0), _separable(90, 1)
    kw = dict(train=train, test=test, cache_dir=str(tmp_path), epochs=2, learning_rate=3e-3,
              batch_size=32, cnn_padding="SAME")
    clf = la.get_label_classifier("toy", **kw)
    assert clf.test_accuracy == 1.0 and clf.num_classes == 3
    files = list(tmp_path.glob("toy_cnn_*.npz"))
    assert len(files) == 1
    la._LOADED.clear()  # from disk, not the memo
    again = la.get_label_classifier("toy", **kw)
    assert again.recipe == clf.recipe and again.test_accuracy == clf.test_accuracy
    np.testing.assert_array_equal(again.predict(test.images), clf.predict(test.images))
    # Conditioned on their true labels, all right; on shifted labels, all wrong.
    r = la.label_accuracy(test.images, test.labels, again)
    assert r["overall"] == 1.0 and r["classifier_test_accuracy"] == 1.0
    assert la.label_accuracy(test.images, (test.labels + 1) % 3, again)["overall"] == 0.0
    # Another recipe (or training set): another cache file.
    rec = la.recipe("toy", train.images, 3, epochs=2, learning_rate=3e-3, batch_size=32,
                    cnn_padding="SAME")
    assert rec == clf.recipe and la.cache_path(rec, str(tmp_path)) == str(files[0])
    for other in (rec | dict(epochs=3), rec | dict(num_train=299), rec | dict(seed=1)):
        assert la.cache_path(other, str(tmp_path)) != str(files[0])


def test_cli_prints_json_for_a_samples_file(tmp_path, capsys, monkeypatch):
    clf = la.LabelClassifier("stub", 4, None, 0.5)
    monkeypatch.setattr(la, "get_label_classifier", lambda *a, **k: clf)
    monkeypatch.setattr(la.LabelClassifier, "predict", _PixelClassifier.predict)
    labels = np.array([0, 1, 2, 3], np.int32)
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, images=_images_with_answers([0, 1, 2, 0]), labels=labels)
    assert la.main([f"--samples={path}", "--dataset=mnist"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == 0.75 and out["per_class"] == [1.0, 1.0, 1.0, 0.0]
    assert out["dataset"] == "mnist" and "PRIVATE" in out["outside_dp_guarantee"]
    np.savez_compressed(path, images=_images_with_answers([0]), labels=np.zeros(0, np.int32))
    assert la.main([f"--samples={path}", "--dataset=mnist"]) == 2
    assert "no labels" in capsys.readouterr().err
    assert la.main([f"--samples={tmp_path / 'absent.npz'}", "--dataset=mnist"]) == 2


@pytest.mark.slow
@pytest.mark.real_data
def test_cached_mnist_classifier_reaches_97_percent_on_the_real_test_set():
    """Trains on first use (a few CPU minutes), then loads from ~/.cache/dpdm_jax/label_classifiers."""
    t0 = time.time()
    clf = la.get_label_classifier("mnist")
    from dpdm_jax.data import load_dataset

    test = load_dataset("mnist", "test")
    measured = float(np.mean(clf.predict(test.images) == test.labels))
    print(f"MNIST label classifier: recorded {clf.test_accuracy:.4f}, measured {measured:.4f}, "
          f"{time.time() - t0:.0f} s")
    assert measured == pytest.approx(clf.test_accuracy, abs=1e-6)
    assert measured >= 0.97


def test_conditional_metrics_for_the_training_log():
    labels = np.array([0, 1, 2, 3, 0, 1], np.int32)
    images = _images_with_answers([0, 1, 2, 3, 1, 1])
    r = la.conditional_metrics(images, labels, "toy", classifier=_PixelClassifier())
    assert set(r) == {"label_accuracy"} and r["label_accuracy"]["overall"] == pytest.approx(5 / 6)

    def flat(u8):
        return u8.reshape(len(u8), -1).astype(np.float32)

    r = la.conditional_metrics(images, labels, "toy", classifier=_PixelClassifier(),
                               kid_reference=flat(images), kid_extractor=flat)
    assert r["kid"]["num_samples"] == 6 and r["kid"]["num_reference"] == 6
    from dpdm_jax.evaluation import kid

    assert r["kid"] == kid.kid(flat(images), flat(images), seed=0)
