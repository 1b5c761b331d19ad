"""A tiny synthetic config for tests and smoke runs (seconds on a CPU). Not a paper setting."""
from configs import default


def get_config(preset: str = ""):
    config = default.get_config()
    config.seed = 0  # reproducible tests; real runs keep the secret default (-1)
    config.data.name = "synthetic"
    config.data.synthetic_size = 64
    config.data.synthetic_image_size = 8
    config.data.synthetic_channels = 1
    config.data.synthetic_num_classes = 3
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.diffusion.noise_multiplicity = 2
    config.dp.epsilon = 10.0
    config.dp.delta = 1e-3
    config.dp.batch_size = 16
    config.dp.epochs = 1.0
    config.training.chunk_size = 8
    config.training.log_every = 1
    config.training.checkpoint_every = 2
    config.training.sample_every = 4
    config.training.num_grid_samples = 6
    config.sampling.num_steps = 4
    config.sampling.num_samples = 6
    config.sampling.batch_size = 6
    config.eval.num_samples = 60
    return config
