"""One process of a local jax.distributed run, for test_multihost_seed.py (not a test itself).

Usage: python -m tests.multihost_worker PORT NUM_PROCESSES PROCESS_ID WORKDIR
Prints SEED=, BIG=, and AGREE=/REFUSED= lines for the parent test to compare across hosts.
"""
import sys

import jax


def main(port, num_processes, process_id, workdir):
    jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
    from configs import test_tiny
    from dpdm_jax import train

    print(f"SEED={train.run_seed(-1, None)}", flush=True)  # the default, secret seed
    big = 2**61 + 2**40 + 12345 if jax.process_index() == 0 else 7
    print(f"BIG={train.broadcast_seed(big)}", flush=True)
    config = test_tiny.get_config()
    config.seed = -1
    config.training.max_steps = 1
    config.training.sample_every = -1
    config.data.max_examples = 64 if jax.process_index() == 0 else 48  # host 1 sees another subset
    try:
        train.train(config, workdir)
        print("AGREE=trained", flush=True)
    except ValueError as e:
        print(f"REFUSED={e}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
