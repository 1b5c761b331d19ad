"""CelebA 64x64, unconditional: eps 10, delta 1e-6, K=8, batch 2048, ch_mult (1, 1, 2, 2)."""
from configs import celeba32


def get_config(preset: str = "eps10"):
    if preset != "eps10":
        raise ValueError(f"Unknown preset {preset!r}; celeba64 has eps10")
    config = celeba32.get_config("eps10")
    config.data.name = "celeba64"
    config.model.ch_mult = (1, 1, 2, 2)
    config.diffusion.noise_multiplicity = 8
    return config
