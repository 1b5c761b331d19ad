"""Data parallelism for the clipped sum: shard_map over a 1-D 'data' mesh.

Each device clips the per-example gradients of its own rows; only clipped sums cross devices.
`sharded_clipped_grad_sum` sums one batch over devices (a psum per call); `DPSGDStep` instead
keeps each device's running sum over a logical step's chunks (`sharded_partial_sums_add`) and
sums over devices once per step (`sum_over_devices`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def _device_clipped_sum(loss_fn, params, examples, example_ids, mask, key, clip_norm, microbatch_size):
    """Inside shard_map: (grad_sum, ClipStats) of this device's own rows, nothing summed across devices."""
    # Inside shard_map, the gradient w.r.t. a replicated (device-invariant) value is implicitly
    # summed over devices, which would mix examples BEFORE clipping. Marking params
    # device-varying keeps every per-example gradient local to its device.
    params = jax.lax.pcast(params, DATA_AXIS, to="varying")
    return clipped_grad_sum(loss_fn, params, examples, example_ids, mask, key, clip_norm, microbatch_size)


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
        sums = _device_clipped_sum(loss_fn, params, examples, example_ids, mask, key, clip_norm, microbatch_size)
        return jax.lax.psum(sums, DATA_AXIS)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=(P(), P()),
    )


def zero_partial_sums(params: PyTree, num_devices: int) -> tuple[PyTree, ClipStats]:
    """Per-device partial sums before a step's first chunk: zeros of shape (num_devices, *leaf.shape).

    Place them split along axis 0 (`batch_sharded`): device d holds row d, its own running sum.
    """
    return jax.tree.map(lambda x: jnp.zeros((num_devices, *jnp.shape(x)), jnp.result_type(x)),
                        (params, ClipStats.zeros()))


def sharded_partial_sums_add(
    loss_fn: LossFn,
    mesh: Mesh,
    clip_norm: float,
    microbatch_size: int | None = None,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """Each device adds the clipped gradient sum of its own rows of one chunk to its partial sums.

    Nothing crosses devices: the sum over devices is taken once per logical step
    (`sum_over_devices`), not once per chunk (a multi-process run synchronised on every chunk).

    Returns:
      f(partial, params, examples, example_ids, mask, key) -> partial + this chunk's sums.
      partial: (grad_sum, ClipStats) from `zero_partial_sums`, split along axis 0 over the mesh;
      params and key replicated; examples, example_ids and mask split along axis 0.
    """

    def local(partial, params, examples, example_ids, mask, key):
        chunk = _device_clipped_sum(loss_fn, params, examples, example_ids, mask, key, clip_norm, microbatch_size)
        return jax.tree.map(lambda total, x: total + x[None], partial, chunk)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=P(DATA_AXIS),
    )


def sum_over_devices(partial: PyTree) -> PyTree:
    """The partial sums' total over devices (axis 0): inside jit, one all-reduce per logical step."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), partial)
