"""CelebA 32x32, unconditional: delta 1e-6, K=32, batch 2048, 300 epochs (presets eps1, eps10)."""
from configs import default

PRESETS = {"eps1": 1.0, "eps10": 10.0}


def get_config(preset: str = "eps10"):
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = default.get_config()
    config.data.name = "celeba32"
    config.data.conditional = False
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (8, 16)
    config.diffusion.noise_multiplicity = 32
    config.dp.epsilon = PRESETS[preset]
    config.dp.delta = 1e-6
    config.dp.batch_size = 2048
    config.dp.epochs = 300.0
    config.eval.num_samples = 50000
    config.eval.classifiers = ()
    return config
