"""Downstream classifiers (method.md section 5): train on labelled synthetic images, test on real.

Protocol (as the DPDM reference ``train_downstream_classifiers.py``): pixels x/255*2-1; Adam
lr 3e-4, batch 128, cross entropy, up to 50 epochs; after every epoch the validation accuracy is
measured and the epoch with the highest (first reached on ties) is kept; the reported test
accuracy is that epoch's. The validation set is a random 10% of the given (synthetic) training
images, the rest is trained on.

Models (DPDM reference architectures, in Flax linen; NHWC):

* ``logreg``: flatten -> Dense(10)                                   (784-10 on MNIST)
* ``mlp``:    flatten -> Dense(100) -> relu -> Dense(10)             (784-100-10)
* ``cnn``:    Conv32 3x3 -> maxpool 2x2 -> relu -> dropout .5 -> Conv64 3x3 -> maxpool 2x2 -> relu
              -> dropout .5 -> Conv128 3x3 -> relu -> flatten -> Dense(128) -> relu -> dropout .5
              -> Dense(10). Convs are 'VALID' (unpadded) like the reference's ``nn.Conv2d(c, c', 3,
              1)``, so 28 -> 26 -> 13 -> 11 -> 5 -> 3 and the Dense sees 3*3*128 = 1152 features;
              ``cnn_padding='SAME'`` gives 28 -> 14 -> 7 (7*7*128) instead.

Choices not fixed by the reference: Flax default initialisers (lecun-normal kernels, zero
biases) instead of torch's; the training set is reshuffled every epoch (the reference loader did
not shuffle its already-random samples); a last partial batch is padded and masked, so every
example is used once per epoch and the loss is the mean over the real examples of the batch.
Each epoch runs as one jitted ``lax.scan``; the CNN's convs are im2col matmuls and its pools
reshape-max (same maths as a conv / max pool; much faster backward passes on XLA:CPU).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

KINDS = ("logreg", "mlp", "cnn")


class LogReg(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    num_classes: int = 10
    hidden: int = 100

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def max_pool_2x2(x):
    """2x2 / stride 2 max pool, floor mode (odd sizes drop the last row/column, like torch)."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


class Conv3x3(nn.Module):
    """3x3 stride-1 conv as im2col + matmul (XLA:CPU runs its backward ~2x faster than a conv)."""

    features: int
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.padding == "SAME":
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        elif self.padding != "VALID":
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {self.padding!r}")
        h, w = x.shape[1] - 2, x.shape[2] - 2
        cols = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
        return cols @ k.reshape(9 * c, self.features) + b


class CNN(nn.Module):
    num_classes: int = 10
    padding: str = "VALID"
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        for feats in (32, 64):
            x = drop(nn.relu(max_pool_2x2(Conv3x3(feats, self.padding)(x))))
        x = nn.relu(Conv3x3(128, self.padding)(x))
        x = drop(nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


def make_model(kind: str, num_classes: int = 10, cnn_padding: str = "VALID") -> nn.Module:
    if kind == "logreg":
        return LogReg(num_classes)
    if kind == "mlp":
        return MLP(num_classes)
    if kind == "cnn":
        return CNN(num_classes, cnn_padding)
    raise ValueError(f"unknown classifier kind {kind!r}; expected one of {KINDS}")


def _as_nhwc_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W[, C]) images, got {images.shape}")
    return images


def _scale(u8):
    return u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0


def _padded_batches(order: np.ndarray, batch_size: int):
    """(steps, batch) indices and a 0/1 mask; the last batch is padded with index 0, mask 0."""
    steps = -(-len(order) // batch_size)
    idx = np.zeros(steps * batch_size, np.int32)
    mask = np.zeros(steps * batch_size, np.float32)
    idx[:len(order)], mask[:len(order)] = order, 1.0
    return idx.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def split_train_val(n: int, val_fraction: float, seed: int):
    """Random disjoint index sets: (train, val) with round(val_fraction * n) >= 1 in val."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ValueError(f"need more than {n_val} examples for a {val_fraction} validation split")
    return perm[n_val:], perm[:n_val]


def train_and_evaluate(kind: str, train_images, train_labels, test_images, test_labels,
                       seed: Union[int, jax.Array] = 0, epochs: int = 50, batch_size: int = 128,
                       learning_rate: float = 3e-4, val_fraction: float = 0.1,
                       num_classes: Optional[int] = None, eval_batch_size: int = 1000,
                       cnn_padding: str = "VALID",
                       on_epoch: Optional[Callable[[dict], None]] = None,
                       return_params: bool = False) -> dict:
    """Train ``kind`` in {'logreg', 'mlp', 'cnn'} on 90% of the train set, select by the other 10%.

    Images are uint8 (N, H, W[, C]); labels integer (N,). ``seed`` is an int or a PRNG key (it
    drives init, dropout, shuffling; the split uses an int derived from it). Returns
    dict(val_acc, test_acc, best_epoch (1-based), epochs, val_history, seconds); with
    ``return_params`` also ``params``, the selected epoch's parameters (numpy), for ``predict``.
    """
    t_start = time.time()
    x_all, y_all = _as_nhwc_uint8(train_images), np.asarray(train_labels, np.int32)
    x_test, y_test = _as_nhwc_uint8(test_images), np.asarray(test_labels, np.int32)
    if len(x_all) != len(y_all) or len(x_test) != len(y_test):
        raise ValueError("images and labels differ in length")
    if x_all.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"train images {x_all.shape[1:]} vs test images {x_test.shape[1:]}")
    num_classes = num_classes or int(max(y_all.max(), y_test.max())) + 1
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    split_seed = int(jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1))
    tr, va = split_train_val(len(x_all), val_fraction, split_seed)

    model = make_model(kind, num_classes, cnn_padding)
    init_key, drop_key, shuffle_key = jax.random.split(key, 3)
    params = jax.jit(model.init)(init_key, _scale(jnp.asarray(x_all[:1])))["params"]
    opt = optax.adam(learning_rate)
    opt_state = opt.init(params)
    x_tr, y_tr = jnp.asarray(x_all[tr]), jnp.asarray(y_all[tr])

    def loss_fn(p, xb, yb, mb, rng):
        logits = model.apply({"params": p}, _scale(xb), train=True, rngs={"dropout": rng})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(ce * mb) / jnp.maximum(jnp.sum(mb), 1.0)

    @jax.jit
    def train_epoch(p, s, idx, mask, rng):
        def step(carry, inp):
            p, s = carry
            i, (bi, bm) = inp
            loss, g = jax.value_and_grad(loss_fn)(p, x_tr[bi], y_tr[bi], bm,
                                                  jax.random.fold_in(rng, i))
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss

        (p, s), losses = jax.lax.scan(step, (p, s), (jnp.arange(idx.shape[0]), (idx, mask)))
        return p, s, jnp.mean(losses)

    @jax.jit
    def count_correct(p, xb, yb, mb):
        pred = jnp.argmax(model.apply({"params": p}, _scale(xb), train=False), -1)
        return jnp.sum((pred == yb) * mb)

    x_val, y_val = x_all[va], y_all[va]
    eval_bs = min(eval_batch_size, max(len(x_val), len(x_test)))  # one shape: one compilation

    def accuracy(p, x, y) -> float:
        idx, mask = _padded_batches(np.arange(len(x)), eval_bs)
        correct = sum(float(count_correct(p, x[i], y[i], m)) for i, m in zip(idx, mask))
        return correct / len(x)

    best = dict(val_acc=-1.0, test_acc=float("nan"), best_epoch=0)
    history = []
    for epoch in range(1, epochs + 1):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), len(tr)))
        idx, mask = _padded_batches(order, batch_size)
        params, opt_state, loss = train_epoch(params, opt_state, jnp.asarray(idx),
                                              jnp.asarray(mask), jax.random.fold_in(drop_key, epoch))
        val_acc = accuracy(params, x_val, y_val)
        history.append(val_acc)
        if val_acc > best["val_acc"]:
            best = dict(val_acc=val_acc, test_acc=accuracy(params, x_test, y_test), best_epoch=epoch)
            if return_params:
                best["params"] = jax.device_get(params)
        info = dict(kind=kind, epoch=epoch, loss=float(loss), val_acc=val_acc,
                    best_val_acc=best["val_acc"], best_test_acc=best["test_acc"],
                    best_epoch=best["best_epoch"], seconds=time.time() - t_start)
        log.info("%s epoch %d: loss %.4f val %.4f (best %.4f @%d, test %.4f)", kind, epoch,
                 info["loss"], val_acc, best["val_acc"], best["best_epoch"], best["test_acc"])
        if on_epoch is not None:
            on_epoch(info)
    return dict(best, epochs=epochs, val_history=history, seconds=time.time() - t_start)


def predict(kind: str, params, images, num_classes: int = 10, cnn_padding: str = "VALID",
            batch_size: int = 1000) -> np.ndarray:
    """Predicted int32 classes of uint8 images (N, H, W[, C]) by a ``kind`` model's ``params``."""
    x = _as_nhwc_uint8(images)
    if len(x) == 0:
        return np.zeros(0, np.int32)
    model = make_model(kind, num_classes, cnn_padding)
    apply = _jitted_argmax(model)
    bs = max(1, min(batch_size, len(x)))  # one batch shape: one compilation
    idx, mask = _padded_batches(np.arange(len(x)), bs)
    out = np.concatenate([np.asarray(apply(params, jnp.asarray(x[i]))) for i in idx])
    return out[:len(x)].astype(np.int32)


_ARGMAX_CACHE: dict = {}


def _jitted_argmax(model: nn.Module):
    """One jitted argmax(model.apply) per model definition (Flax modules hash by their fields)."""
    if model not in _ARGMAX_CACHE:
        _ARGMAX_CACHE[model] = jax.jit(
            lambda p, xb: jnp.argmax(model.apply({"params": p}, _scale(xb), train=False), -1))
    return _ARGMAX_CACHE[model]


def evaluate_all(train_images, train_labels, test_images, test_labels, seed=0, epochs: int = 50,
                 kinds=KINDS, **kw) -> dict:
    """{kind: train_and_evaluate(...)} for each classifier kind (same split seed for all)."""
    return {k: train_and_evaluate(k, train_images, train_labels, test_images, test_labels,
                                  seed=seed, epochs=epochs, **kw) for k in kinds}
