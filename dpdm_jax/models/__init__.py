"""DDPM++ (NCSN++) U-Net used as F_theta by every DPDM denoiser."""
from dpdm_jax.models.ddpmpp import DDPMpp, count_params, ddpmpp_for, dummy_inputs, init_shapes, init_variables
from dpdm_jax.models.layers import CONV_IMPLS

__all__ = ["DDPMpp", "ddpmpp_for", "count_params", "init_shapes", "init_variables", "dummy_inputs", "CONV_IMPLS"]
