"""Tiny per-example losses for the engine's tests (no diffusion, no big models)."""
import jax
import jax.numpy as jnp
import numpy as np


def init_params(seed=0, d_in=6, d_hidden=5):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(d_in, d_hidden)), jnp.float32),
        "b1": jnp.zeros((d_hidden,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(d_hidden,)), jnp.float32),
    }


def draw_loss(params, example, key):
    """One random draw: a noisy regression loss, so keys matter."""
    x = example["x"] + 0.1 * jax.random.normal(key, example["x"].shape)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (h @ params["w2"] - example["y"]) ** 2


def make_examples(n, seed=1, d_in=6, scale=3.0):
    rng = np.random.default_rng(seed)
    return {
        "x": (scale * rng.normal(size=(n, d_in))).astype(np.float32),
        "y": rng.normal(size=(n,)).astype(np.float32),
    }
