"""ImageNet 32x32, class-conditional: eps 10, delta 7e-7, K=8, batch 2048, 100 epochs."""
from configs import default


def get_config(preset: str = "eps10"):
    if preset != "eps10":
        raise ValueError(f"Unknown preset {preset!r}; imagenet32 has eps10")
    config = default.get_config()
    config.data.name = "imagenet32"
    config.data.conditional = True
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (8, 16)
    config.diffusion.noise_multiplicity = 8
    config.dp.epsilon = 10.0
    config.dp.delta = 7e-7
    config.dp.batch_size = 2048
    config.dp.epochs = 100.0
    config.eval.num_samples = 50000
    config.eval.classifiers = ()
    return config
