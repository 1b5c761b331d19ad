"""Diffusion parameterisations, the per-example DPDM loss, samplers and classifier-free guidance."""
from dpdm_jax.diffusion.losses import (denoising_loss, draw_noise, drop_label,
                                       make_per_example_loss)
from dpdm_jax.diffusion.parameterisations import (EDM, PARAMETERISATIONS, VE, VP, VPrediction, denoise,
                                                  get_parameterisation, make_denoise_fn)
from dpdm_jax.diffusion.samplers import (SAMPLERS, ddim_sample, ddim_stochastic_sample, edm_sample,
                                         get_sampler, guided_denoise_fn, resolve_labels, sample_images,
                                         time_steps)

__all__ = [
    "EDM", "VE", "VP", "VPrediction", "get_parameterisation", "denoise", "make_denoise_fn",
    "make_per_example_loss", "denoising_loss", "draw_noise", "drop_label",
    "time_steps", "ddim_sample", "ddim_stochastic_sample", "edm_sample", "get_sampler",
    "guided_denoise_fn", "sample_images", "SAMPLERS", "PARAMETERISATIONS", "resolve_labels",
]
