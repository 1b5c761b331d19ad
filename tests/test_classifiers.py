"""Downstream classifiers: learn a toy pattern fast; the slow test trains on real MNIST."""
import os
import struct
import time

import numpy as np
import pytest

from dpdm_jax.evaluation import classifiers


def _toy(n, seed):
    """4 classes: a bright bar in one of four 7-pixel-wide vertical bands, on a noisy background."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.float64)
    for i, c in enumerate(y):
        x[i, 4:24, 7 * c + 1:7 * c + 6] += 190
    return np.clip(x, 0, 255).astype(np.uint8)[..., None], y.astype(np.int32)


@pytest.mark.parametrize("kind", classifiers.KINDS)
def test_accuracy_rises_well_above_chance(kind):
    x, y = _toy(600, 0)
    xt, yt = _toy(200, 1)
    seen = []
    t0 = time.time()
    r = classifiers.train_and_evaluate(kind, x, y, xt, yt, seed=0, epochs=3, num_classes=4,
                                       on_epoch=seen.append)
    print(f"{kind}: {r} in {time.time() - t0:.1f} s")
    assert r["test_acc"] > 0.8 and r["val_acc"] > 0.8, r  # chance is 0.25
    assert 1 <= r["best_epoch"] <= 3 and len(r["val_history"]) == 3
    assert r["val_acc"] == max(r["val_history"])
    assert r["best_epoch"] == r["val_history"].index(r["val_acc"]) + 1  # first epoch on ties
    assert [s["epoch"] for s in seen] == [1, 2, 3]


def test_split_is_disjoint_and_ten_percent():
    tr, va = classifiers.split_train_val(1000, 0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == 1000


def test_cnn_shapes_valid_and_same():
    import jax
    import jax.numpy as jnp

    for padding, dense_in in (("VALID", 3 * 3 * 128), ("SAME", 7 * 7 * 128)):
        m = classifiers.make_model("cnn", 10, padding)
        p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
        assert p["Dense_0"]["kernel"].shape == (dense_in, 128)


def test_im2col_conv_and_reshape_pool_equal_flax_layers():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11, 11, 5)), jnp.float32)
    for padding in ("VALID", "SAME"):
        conv = classifiers.Conv3x3(7, padding)
        p = conv.init(jax.random.PRNGKey(0), x)
        ref = nn.Conv(7, (3, 3), padding=padding).apply(p, x)
        np.testing.assert_allclose(conv.apply(p, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(classifiers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


def test_bad_inputs():
    x, y = _toy(20, 0)
    with pytest.raises(ValueError):
        classifiers.train_and_evaluate("svm", x, y, x, y, epochs=1)
    with pytest.raises(TypeError):
        classifiers.train_and_evaluate("logreg", x.astype(np.float32), y, x, y, epochs=1)


# ---------------------------------------------------------------------------------------------


def _read_idx(path):
    with open(path, "rb") as f:
        data = f.read()
    nd = data[3]
    dims = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def _mnist():
    try:
        from dpdm_jax.data import load_dataset

        tr, te = load_dataset("mnist", "train"), load_dataset("mnist", "test")
        return tr.images, tr.labels, te.images, te.labels
    except Exception:  # noqa: BLE001 -- data module not ready: raw IDX files ($DPDM_MNIST_DIR)
        d = os.environ.get("DPDM_MNIST_DIR", os.path.expanduser("~/.cache/dpdm_jax/data/mnist"))
        names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        if not all(os.path.exists(os.path.join(d, n)) for n in names):
            pytest.skip("real MNIST not available (dpdm_jax.data.load_dataset or $DPDM_MNIST_DIR)")
        return tuple(_read_idx(os.path.join(d, n)) for n in names)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("kind,epochs,threshold", [("logreg", 10, 0.90), ("mlp", 10, 0.95),
                                                       ("cnn", 6, 0.98)])
def test_real_mnist_accuracy(kind, epochs, threshold):
    """Trained on real MNIST (90/10 split), tested on the real test set: a sanity bound."""
    x, y, xt, yt = _mnist()
    t0 = time.time()
    r = classifiers.train_and_evaluate(kind, x, y, xt, yt, seed=0, epochs=epochs)
    print(f"{kind}: {r['test_acc']:.4f} test / {r['val_acc']:.4f} val at epoch "
          f"{r['best_epoch']}/{epochs} in {time.time() - t0:.0f} s")
    assert r["test_acc"] >= threshold, r
