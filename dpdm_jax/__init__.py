"""dpdm_jax: Differentially Private Diffusion Models (Dockhorn et al., TMLR 2023) in JAX/Flax."""

__version__ = "0.1.0"
