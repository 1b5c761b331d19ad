"""CIFAR-10 32x32, class-conditional: eps 10, K=8, batch 2048, 500 epochs, attention at 16."""
from configs import default


def get_config(preset: str = "eps10"):
    if preset != "eps10":
        raise ValueError(f"Unknown preset {preset!r}; cifar10 has eps10")
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.conditional = True
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (16,)
    config.diffusion.noise_multiplicity = 8
    config.dp.epsilon = 10.0
    config.dp.delta = 1e-5
    config.dp.batch_size = 2048
    config.dp.epochs = 500.0
    config.eval.num_samples = 50000
    return config
