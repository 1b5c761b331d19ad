"""training.microbatch_size > 0: the sharded clipped sum equals the unbatched one (1 and 4 devices)."""
import jax
import numpy as np
import pytest

from dpdm_jax.dp import noise_multiplicity_loss
from dpdm_jax.dp.clipping import clipped_grad_sum
from dpdm_jax.dp.sharding import data_mesh, put_batch, sharded_clipped_grad_sum
from tests.dp_helpers import draw_loss, init_params, make_examples

LOSS = noise_multiplicity_loss(draw_loss, 2)


@pytest.mark.parametrize("devices, microbatch", [(1, 2), (1, 4), (4, 1), (4, 2)])
def test_sharded_microbatched_sum_equals_unbatched_clipped_sum(devices, microbatch):
    params, examples = init_params(), make_examples(8)
    ids = np.arange(8, dtype=np.int32)
    mask = np.array([True] * 7 + [False])  # a padding row must still contribute zero
    key = jax.random.key(4)
    want, want_stats = clipped_grad_sum(LOSS, params, examples, ids, mask, key, 1.0)
    mesh = data_mesh(jax.devices()[:devices])
    f = jax.jit(sharded_clipped_grad_sum(LOSS, mesh, 1.0, microbatch))
    got, stats = f(params, *put_batch(mesh, (examples, ids, mask)), key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats), np.asarray(want_stats), rtol=1e-5)
    assert float(stats.num_clipped) > 0  # the clip is active, so the comparison means something
