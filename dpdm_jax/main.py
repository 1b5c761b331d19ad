"""Entry point: python -m dpdm_jax.main --config=configs/mnist.py:eps1 --workdir=DIR --mode=train|sample|eval"""
from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py:eps1.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
    """orbax logs every file of every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietOrbax())

    if FLAGS.coordinator_address or os.environ.get("DPDM_MULTIHOST"):
        # On TPU pods / SLURM the arguments may be discovered automatically.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX %d process(es), %d device(s): %s", jax.process_count(), jax.device_count(),
                 jax.devices()[0].platform)
    config, workdir = FLAGS.config, FLAGS.workdir
    if FLAGS.mode == "train":
        from dpdm_jax import train

        train.train(config, workdir)
    elif FLAGS.mode == "sample":
        from dpdm_jax import sample

        sample.run(config, workdir)
    else:
        from dpdm_jax.evaluation import report

        report.run(config, workdir)


if __name__ == "__main__":
    app.run(main)
