"""One logical DP-SGD step: clipped sums over chunks, noise once, optimiser, EMA.

    grad_key, noise_key = step_keys(run_key, step)
    for each chunk of the Poisson batch:          (any number of chunks, fixed shape)
        acc_d += sum_{i on device d} clip_C(grad loss_i)    sharded_partial_sums_add (no cross-device traffic)
    acc = sum_d acc_d                              finish_step: one all-reduce per logical step, then
    g = (acc + N(0, sigma^2 C^2 I)) / (q N)        noisy_update: once, identical on every device
    params <- optimiser(params, g);  ema <- ema - (1 - decay_n) (ema - params)     ema_update

The stages are module-level pure functions; `DPSGDStep` applies shard_map and jit to them.
"""
from __future__ import annotations

from typing import Any, Iterable

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from dpdm_jax.dp.clipping import ClipStats, LossFn
from dpdm_jax.dp.noise import privatise_gradient_sum
from dpdm_jax.dp.sharding import (batch_sharded, data_mesh, put_batch, replicated, sharded_partial_sums_add,
                                  sum_over_devices, zero_partial_sums)

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """Everything a DP training run updates. `step` counts logical steps done (int32)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree


def ema_decay(num_updates: jax.Array, max_decay: float = 0.999) -> jax.Array:
    """EMA warm-up: decay_n = min(max_decay, (1 + n) / (10 + n)), n = updates so far."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def run_key_from_seed(seed: int) -> jax.Array:
    """A threefry key from all 64 bits of `seed` (jax.random.key keeps only 32 without x64)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(words, impl="threefry2x32")


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(training key, sample-grid key, init key): independent PRF (fold_in) outputs of all 64 seed bits.

    The init key is a PRF output of the whole secret key, so the initial parameters (public in
    the usual threat model) reveal nothing usable about the seed.
    """
    root = run_key_from_seed(seed)
    return tuple(jax.random.fold_in(root, i) for i in range(3))


def step_keys(run_key: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """(gradient key, noise key) of logical step `step`: functions of the run key and step only."""
    step_key = jax.random.fold_in(run_key, step)
    return jax.random.fold_in(step_key, 0), jax.random.fold_in(step_key, 1)


def ema_update(ema_params: PyTree, params: PyTree, num_updates: jax.Array, max_decay: float) -> PyTree:
    """ema <- ema - (1 - decay_n) (ema - params)."""
    decay = ema_decay(num_updates, max_decay)
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema_params, params)


def finish_step(state: TrainState, partial_sums, key: jax.Array, **update_args) -> tuple[TrainState, ClipStats]:
    """Sum the devices' partial sums once, then `noisy_update`: (the state after the step, its ClipStats)."""
    grad_sum, stats = sum_over_devices(partial_sums)
    return noisy_update(state, grad_sum, key, **update_args), stats


def noisy_update(state: TrainState, grad_sum: PyTree, key: jax.Array, *, optimizer, noise_multiplier: float,
                 clip_norm: float, expected_batch_size: float, ema_max_decay: float) -> TrainState:
    """Noise once and divide by q*N, then the optimiser and the EMA: the state after one logical step."""
    if noise_multiplier == 0:  # the non-private baseline (C may be inf): no noise at all
        grads = jax.tree.map(lambda g: g / jnp.asarray(expected_batch_size, g.dtype), grad_sum)
    else:
        grads = privatise_gradient_sum(grad_sum, key, noise_multiplier, clip_norm, expected_batch_size)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, ema_max_decay)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


class DPSGDStep:
    """A jitted DP-SGD step for any per-example loss (usually built by `DPPlan.step`).

    Args:
      loss_fn: (params, example, key) -> scalar, for ONE example (e.g. the mean over K draws).
      optimizer: an optax transformation (DPDM: Adam 3e-4).
      clip_norm: C (inf: no clipping, the non-private baseline only).
      noise_multiplier: sigma (calibrated from the target epsilon by the caller).
      expected_batch_size: q * N, the public normaliser.
      mesh: 1-D 'data' mesh; default all devices.
      microbatch_size: optional per-device inner micro-batch (memory bound).
      ema_max_decay: 0.999 in DPDM.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        mesh: Mesh | None = None,
        microbatch_size: int | None = None,
        ema_max_decay: float = 0.999,
    ):
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.mesh = mesh if mesh is not None else data_mesh()
        self.optimizer = optimizer
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        repl, split = replicated(self.mesh), batch_sharded(self.mesh)
        # One compiled call each: eagerly, zeroing ~200 leaves and folding keys were ~10 dispatches
        # per leaf, 60-120 ms per step on 2 CPU cores (benchmarks/step_profile.py).
        self._zero_partial_sums = jax.jit(functools.partial(zero_partial_sums, num_devices=self.mesh.size),
                                         out_shardings=split)
        self._step_keys = jax.jit(step_keys)
        # Each device accumulates its own rows' clipped sums over the step's chunks; the devices
        # are summed once per step in `finish_step`, not once per chunk.
        self._accumulate = jax.jit(sharded_partial_sums_add(loss_fn, self.mesh, self.clip_norm, microbatch_size),
                                   donate_argnums=(0,), out_shardings=split)
        self._update = jax.jit(
            functools.partial(finish_step, optimizer=optimizer, noise_multiplier=self.noise_multiplier,
                              clip_norm=self.clip_norm, expected_batch_size=self.expected_batch_size,
                              ema_max_decay=ema_max_decay),
            donate_argnums=(0,), out_shardings=repl)

    def __repr__(self) -> str:  # public fields only: no key or seed is ever held here
        return (f"DPSGDStep(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
                f"expected_batch_size={self.expected_batch_size}, devices={self.mesh.size})")

    def init(self, params: PyTree) -> TrainState:
        """A fresh state (step 0; EMA starts at params), replicated on the mesh."""
        # Copies: the state is donated to the step, the caller's arrays must survive it.
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
            ema_params=jax.tree.map(lambda x: jnp.array(x, copy=True), params),
        )
        return jax.device_put(state, replicated(self.mesh))

    def accumulate(self, partial_sums, params, examples, example_ids, mask, grad_key):
        """Per-device partial sums + the clipped sums of one chunk (host arrays are placed on the mesh here)."""
        examples, example_ids, mask = put_batch(self.mesh, (examples, example_ids, mask))
        return self._accumulate(partial_sums, params, examples, example_ids, mask, grad_key)

    def __call__(
        self,
        state: TrainState,
        chunks: Iterable[tuple[PyTree, Any, Any]],
        run_key: jax.Array,
        step: int,
    ) -> tuple[TrainState, ClipStats]:
        """Run logical step `step`: step keys -> accumulate chunks -> noise once, / q*N -> optimiser -> EMA.

        Args:
          state: current state (donated: do not reuse it).
          chunks: iterable of (examples, example_ids, mask) host arrays of one fixed chunk
            shape; may be empty (an empty Poisson batch still gets a noisy update).
          run_key: the run's SECRET PRNG key, an argument (never stored); step keys are
            derived from (run_key, step).
          step: the logical step index (must equal state.step; checked).
        Returns:
          (new state, ClipStats sums over the logical batch).
        """
        if int(state.step) != step:
            raise ValueError(f"state is at step {int(state.step)} but step {step} was requested")
        grad_key, noise_key = self._step_keys(run_key, step)
        partial_sums = self._zero_partial_sums(state.params)
        for examples, example_ids, mask in chunks:
            partial_sums = self.accumulate(partial_sums, state.params, examples, example_ids, mask, grad_key)
        return self._update(state, partial_sums, noise_key)
