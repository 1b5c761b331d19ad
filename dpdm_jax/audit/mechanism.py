"""The audited mechanism: one logical DP-SGD step of the engine on a tiny model with a canary.

World "out": the dataset is m ordinary examples. World "in": the same plus one crafted canary
(add/remove neighbours). One repetition builds the logical batch the host would build
(Poisson sampling, real rows first, padding rows that COPY dataset row 0, as `PoissonSampler`'s
zero-index padding followed by a gather does) and releases the normalised noisy gradient.

The tiny model is linear with `num_layers` parameter leaves of `layer_width` each:
    pred = sum_l <theta_l, x_l>,   loss of one draw = (pred - y - s z)^2 / 2,   z ~ N(0, 1)
so at theta = 0 an example's gradient is -(y + s z) x: each draw's gradient points along x with a
random length (the K draws matter, and cost little: one normal per draw). The canary has y = -1
and x = A u for a unit vector u with an equal share in coordinate 0 of every leaf: its gradient
has norm ~A >> C along u. Ordinary examples have x orthogonal to u (coordinate 0 of every leaf
is 0), so in the correct mechanism only the Gaussian noise moves the released gradient along u.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpdm_jax.dp.clipping import clipped_grad_sum, noise_multiplicity_loss
from dpdm_jax.dp.noise import privatise_gradient_sum
from dpdm_jax.dp.plan import DPPlan
from dpdm_jax.dp.step import step_keys

PyTree = Any
# release_fn(params, examples, example_ids, mask, key) -> released normalised noisy gradient.
ReleaseFn = Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array], PyTree]

CANARY_ID = 0


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """One audited step. Defaults: sigma = 1.2, C = 1, K = 4, canary always in the 'in' batch.

    Attributes:
      noise_multiplier: sigma, as claimed to the accountant.
      clip_norm: C.
      noise_multiplicity: K draws per example, averaged before clipping.
      delta: the accountant's delta; the lower bound is on epsilon at this delta.
      repetitions: independent runs of the step (the in/out coin is fair, so ~half each).
      calibration_fraction: repetitions used only to choose the statistic and threshold.
      confidence: the lower bound holds with at least this probability.
      seed: seeds the coins, the sampling, the draws and the noise.
      num_layers, layer_width: the tiny model has num_layers leaves of layer_width parameters.
      num_others: m ordinary examples (ids 1..m; the canary is id 0).
      num_padding: padding rows always present at the end of the chunk.
      others_rate: Poisson rate of the ordinary examples (1: a fixed batch the adversary knows).
      canary_rate: probability that the canary, when in the dataset, is in the batch. 1 audits
        the Gaussian mechanism (no amplification); q < 1 the Poisson-subsampled one.
      canary_grad_norm: A, the canary's unclipped gradient norm (>> C).
      target_noise: s, the scale of each draw's noise on the target.
      others_scale: std of the ordinary examples' inputs.
      data_seed: seeds the ordinary examples.
      block_size: repetitions per jitted, vmapped call.
      fast_compile: compile with XLA's backend optimisation level 0 (compiles 2-3x faster, runs
        ~3x slower): right for the ~1e4-1e5 repetitions of a test; turn off for big audits.
    """

    noise_multiplier: float = 1.2
    clip_norm: float = 1.0
    noise_multiplicity: int = 4
    delta: float = 1e-5
    repetitions: int = 30000
    calibration_fraction: float = 1.0 / 3.0
    confidence: float = 0.95
    seed: int = 0
    num_layers: int = 8
    layer_width: int = 16
    num_others: int = 3
    num_padding: int = 4
    others_rate: float = 1.0
    canary_rate: float = 1.0
    canary_grad_norm: float = 100.0
    target_noise: float = 0.1
    others_scale: float = 0.3
    data_seed: int = 0
    block_size: int = 2048
    fast_compile: bool = True

    def __post_init__(self):
        if self.noise_multiplier < 0 or self.clip_norm <= 0 or self.noise_multiplicity < 1:
            raise ValueError("need noise_multiplier >= 0, clip_norm > 0, noise_multiplicity >= 1")
        if not (0 < self.canary_rate <= 1 and 0 < self.others_rate <= 1):
            raise ValueError("canary_rate and others_rate must be in (0, 1]")
        if not 0 < self.calibration_fraction < 1 or not 0 < self.confidence < 1:
            raise ValueError("calibration_fraction and confidence must be in (0, 1)")
        if self.repetitions < 100 or self.num_others < 1 or self.num_padding < 0:
            raise ValueError("need repetitions >= 100, num_others >= 1, num_padding >= 0")

    @property
    def batch_rows(self) -> int:
        """Rows of the (single, fixed-shape) chunk: canary slot + others + padding."""
        return 1 + self.num_others + self.num_padding

    @property
    def plan(self) -> DPPlan:
        """The claim under audit as the engine's DP plan: ONE step of the Gaussian mechanism with
        noise multiplier sigma and clip C, Poisson-subsampled at the canary's rate."""
        return DPPlan(dataset_size=1 + self.num_others, sampling_rate=self.canary_rate, num_steps=1,
                      noise_multiplier=self.noise_multiplier, delta=self.delta, clip_norm=self.clip_norm)

    @property
    def expected_batch_size(self) -> float:
        """The public normaliser q N of the 'in' world."""
        return self.canary_rate + self.others_rate * self.num_others


class AuditProblem(NamedTuple):
    """Everything the adversary knows, except the coin and the randomness of the step."""

    params: PyTree  # public parameters before the step (zeros)
    draw_loss_fn: Callable  # (params, example, key) -> loss of ONE draw
    loss_fn: Callable  # mean over K draws: noise_multiplicity_loss(draw_loss_fn, K)
    canary: dict  # one example, no batch axis
    others: dict  # m examples, leading axis m
    canary_direction: PyTree  # unit vector (params' structure) the canary was crafted to push


def _layer_names(num_layers: int) -> list[str]:
    return [f"layer_{l:02d}" for l in range(num_layers)]


def make_draw_loss(num_layers: int, target_noise: float) -> Callable:
    names = _layer_names(num_layers)

    def draw_loss(params, example, key):
        theta = jnp.stack([params[n] for n in names])  # (L, W), the layout of example["x"]
        z = jax.random.normal(key, (), example["x"].dtype)
        return 0.5 * (jnp.sum(theta * example["x"]) - example["y"] - target_noise * z) ** 2

    return draw_loss


def make_problem(config: AuditConfig) -> AuditProblem:
    """The tiny model, the ordinary examples and the canary of `config`."""
    L, W = config.num_layers, config.layer_width
    names = _layer_names(L)
    u = np.zeros((L, W), np.float32)
    u[:, 0] = 1.0 / np.sqrt(L)
    rng = np.random.default_rng(config.data_seed)
    x_others = (config.others_scale * rng.normal(size=(config.num_others, L, W))).astype(np.float32)
    x_others[:, :, 0] = 0.0  # orthogonal to the canary's direction
    others = {"x": jnp.asarray(x_others), "y": jnp.asarray(rng.normal(size=config.num_others), jnp.float32)}
    canary = {"x": jnp.asarray(config.canary_grad_norm * u), "y": jnp.asarray(-1.0, jnp.float32)}
    draw_loss = make_draw_loss(L, config.target_noise)
    return AuditProblem(
        params={n: jnp.zeros((W,), jnp.float32) for n in names},
        draw_loss_fn=draw_loss,
        loss_fn=noise_multiplicity_loss(draw_loss, config.noise_multiplicity),
        canary=canary,
        others=others,
        canary_direction={n: jnp.asarray(u[l]) for l, n in enumerate(names)},
    )


def engine_release_fn(problem: AuditProblem, config: AuditConfig) -> ReleaseFn:
    """The real mechanism: what DPSGDStep computes before the optimiser, for one chunk.

    (clipped_grad_sum with the step's gradient key + privatise_gradient_sum with its noise key,
    both from `step_keys(key, 0)`, normalised by the public expected batch size.)
    """

    def release(params, examples, example_ids, mask, key):
        grad_key, noise_key = step_keys(key, 0)
        grad_sum, _ = clipped_grad_sum(problem.loss_fn, params, examples, example_ids, mask, grad_key,
                                       config.clip_norm)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      config.expected_batch_size)

    return release


def build_batch(problem: AuditProblem, config: AuditConfig, in_world: jax.Array, key: jax.Array):
    """The chunk the host would build for one step: (examples, example_ids, mask), batch_rows rows.

    Real rows come first (canary id 0 if sampled, then the sampled others, ids 1..m), then
    padding. Padding rows (and the slots of unsampled examples) are copies of dataset row 0 with
    its id, as the sampler's index-0 padding gathers them: the canary in the 'in' world, the
    first ordinary example in the 'out' world. A correct engine must ignore them (mask False).
    """
    m = config.num_others
    k_canary, k_others = jax.random.split(key)
    canary_in = in_world & jax.random.bernoulli(k_canary, config.canary_rate)
    others_in = jax.random.bernoulli(k_others, config.others_rate, (m,))
    flags = jnp.concatenate([canary_in[None], others_in])
    rows = jax.tree.map(lambda c, o: jnp.concatenate([c[None], o]), problem.canary, problem.others)
    ids = jnp.arange(m + 1, dtype=jnp.int32)
    order = jnp.argsort(~flags, stable=True)  # real rows first, in id order
    rows, ids, flags = jax.tree.map(lambda a: a[order], rows), ids[order], flags[order]
    fill = jax.tree.map(lambda c, o: jnp.where(in_world, c, o[0]), problem.canary, problem.others)
    fill_id = jnp.where(in_world, CANARY_ID, 1).astype(jnp.int32)
    pad = config.num_padding
    rows = jax.tree.map(lambda r, f: jnp.concatenate([r, jnp.broadcast_to(f, (pad,) + f.shape)]), rows, fill)
    flags = jnp.concatenate([flags, jnp.zeros((pad,), bool)])
    ids = jnp.concatenate([ids, jnp.zeros((pad,), jnp.int32)])

    def keep_or_fill(r, f):
        sel = flags.reshape((-1,) + (1,) * (r.ndim - 1))
        return jnp.where(sel, r, f[None])

    rows = jax.tree.map(keep_or_fill, rows, fill)
    ids = jnp.where(flags, ids, fill_id)
    return rows, ids, flags
