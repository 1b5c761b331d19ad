"""Quickstart: a small class-conditional DPDM on real MNIST at epsilon = 10 on a CPU.

Not the paper's recipe (configs/mnist.py): a much smaller network, K = 1, a small batch and one
epoch (T = 469 steps), so that it can run on a 2-core CPU. The privacy accounting is real: sigma
is calibrated for these q and T and the printed epsilon is what the steps spent.

Status: these values come from short timing trials on a heavily shared build machine; a full
run within 20 minutes and recognisable digits have NOT yet been verified (see the closing note
of the session that added it). Override any field, e.g. --config.dp.epochs=2.
"""
from configs import mnist


def get_config(preset: str = ""):
    config = mnist.get_config("eps10")
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.diffusion.noise_multiplicity = 1
    config.dp.batch_size = 128  # q = 1/469
    config.dp.epochs = 1.0  # T = 469 steps
    config.optim.learning_rate = 2e-3
    config.training.chunk_size = 8
    config.training.log_every = 10
    config.training.checkpoint_every = 100
    config.training.sample_every = 0  # one grid at the end
    config.training.num_grid_samples = 100
    config.sampling.num_steps = 50
    config.sampling.batch_size = 100
    config.sampling.guidance_weight = 1.0
    return config
