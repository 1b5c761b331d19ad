"""Data parallelism for the clipped sum: shard_map over a 1-D 'data' mesh, ending in a psum.

Each device clips the per-example gradients of its own rows; only clipped sums cross devices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpdm_jax.dp.clipping import ClipStats, LossFn, clipped_grad_sum

DATA_AXIS = "data"
PyTree = Any


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all hosts)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(mesh: Mesh, tree: PyTree) -> PyTree:
    """Place host arrays (identical on every host) on the mesh, split along axis 0.

    Works multi-host: each process only copies the rows its own devices hold.
    """
    sharding = batch_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def sharded_clipped_grad_sum(
    loss_fn: LossFn,
    mesh: Mesh,
    clip_norm: float,
    microbatch_size: int | None = None,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """`clipped_grad_sum` with the batch split over the mesh's 'data' axis.

    Returns:
      f(params, examples, example_ids, mask, key) -> (grad_sum, stats), both replicated.
      params and key are replicated; examples, example_ids and mask are split along axis 0
      (their length must be a multiple of the device count).
    """

    def local(params, examples, example_ids, mask, key):
        # Inside shard_map, the gradient w.r.t. a replicated (device-invariant) value is
        # implicitly summed over devices, which would mix examples BEFORE clipping. Marking
        # params device-varying keeps every per-example gradient local to its device.
        params = jax.lax.pcast(params, DATA_AXIS, to="varying")
        grad_sum, stats = clipped_grad_sum(
            loss_fn, params, examples, example_ids, mask, key, clip_norm, microbatch_size
        )
        return jax.lax.psum((grad_sum, stats), DATA_AXIS)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=(P(), P()),
    )
