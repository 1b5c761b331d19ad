"""The README's 'DP engine's API' example runs as written (only N, batch size and epochs made small)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from helpers import REPO

FULL_SIZE = "N, batch_size, epochs, delta = 60000, 4096, 300, 1e-5"
SMALL = "N, batch_size, epochs, delta = 64, 16, 1, 1e-5"


def _engine_example() -> str:
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## The DP engine's API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_engine_example_runs(capsys):
    code = _engine_example()
    assert FULL_SIZE in code, "the README example changed: update this test's substitution"
    data = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)

    def draw_loss_fn(params, example, key):  # a linear denoiser of one noisy draw
        noise = jax.random.normal(key, example["x"].shape)
        return jnp.sum((params["w"] * (example["x"] + noise) - example["x"]) ** 2)

    namespace = {"draw_loss_fn": draw_loss_fn, "params": {"w": jnp.zeros((3,))},
                 "examples_at": lambda idx: {"x": data[idx]}, "secret_seed": 12345}
    exec(compile(code.replace(FULL_SIZE, SMALL), "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert namespace["ledger"].steps == namespace["T"] == 4
    assert 0 < float(out[-1]) <= 10.0 + 1e-6 and "DP" in out[-2]
    assert np.isfinite(np.asarray(namespace["state"].params["w"])).all()
