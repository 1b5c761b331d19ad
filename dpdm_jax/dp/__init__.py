"""The DP-SGD engine: Poisson sampling, clipped per-example sums, noise, accounting.

It knows nothing of diffusion: any per-example loss (params, example, key) -> scalar works.
"""
from dpdm_jax.dp.accounting import (
    ACCOUNTANTS,
    NO_GUARANTEE_PUBLIC_SEED,
    NO_PRIVACY,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from dpdm_jax.dp.clipping import (ClipStats, clipped_example_grad, clipped_grad_sum, example_key,
                                  noise_multiplicity_loss)
from dpdm_jax.dp.noise import gaussian_noise_like, privatise_gradient_sum
from dpdm_jax.dp.plan import DPPlan
from dpdm_jax.dp.sampling import Chunk, PoissonSampler
from dpdm_jax.dp.sharding import data_mesh, put_batch, sharded_clipped_grad_sum, sharded_partial_sums_add
from dpdm_jax.dp.step import (DPSGDStep, TrainState, ema_decay, ema_update, finish_step, noisy_update,
                              run_key_from_seed, run_keys, step_keys)
from dpdm_jax.dp.validation import check_params_only, validate_dp_params

__all__ = [
    "ACCOUNTANTS",
    "NO_GUARANTEE_PUBLIC_SEED",
    "NO_PRIVACY",
    "Chunk",
    "DPPlan",
    "ClipStats",
    "DPSGDStep",
    "PoissonSampler",
    "PrivacyLedger",
    "TrainState",
    "calibrate_noise_multiplier",
    "check_params_only",
    "clipped_example_grad",
    "clipped_grad_sum",
    "compute_epsilon",
    "data_mesh",
    "ema_decay",
    "ema_update",
    "example_key",
    "finish_step",
    "gaussian_noise_like",
    "noise_multiplicity_loss",
    "noisy_update",
    "privatise_gradient_sum",
    "put_batch",
    "run_key_from_seed",
    "run_keys",
    "sharded_clipped_grad_sum",
    "sharded_partial_sums_add",
    "step_keys",
    "validate_dp_params",
]
