"""Entry point: python -m dpdm_jax.main --config=configs/mnist.py:eps1 --workdir=DIR --mode=train|sample|eval|export

User errors (a bad config or flag, missing or corrupt data, no restorable checkpoint) end the run
with exit status 2 and one `error: ...` line on stderr; --verbosity=1 also logs the traceback.
Where tcmalloc is installed the command re-runs itself once with it preloaded (speed only; see
`tcmalloc_preload`; DPDM_NO_TCMALLOC=1 turns that off).
"""
from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py:eps1.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "export"],
                  "What to run (export: a publishable release of the EMA weights, no seed).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


# Environment variables of the whole program, read here and nowhere else: each fills a config field
# that the config leaves empty (a value given in the config or on the command line wins).
ENVIRONMENT = {
    "DPDM_DATA_DIR": "data.data_dir",  # where the datasets live (default ~/.cache/dpdm_jax/data)
    "TFDS_DATA_DIR": "data.tfds_dir",  # a prepared tensorflow-datasets directory
    "DPDM_INCEPTION_NPZ": "eval.inception_weights",  # the converted FID Inception weights
    "DPDM_FID_STATS_DIR": "eval.fid_stats_dir",  # FID reference statistics of the public datasets
}
NO_FETCH = "DPDM_DATA_NO_FETCH"  # 1 / true / yes: data.fetch = False (no automatic MNIST download)
NO_TCMALLOC = "DPDM_NO_TCMALLOC"  # 1: keep glibc's malloc (see tcmalloc_preload)
# Debian / Ubuntu's libtcmalloc-minimal4 (apt-get install libtcmalloc-minimal4).
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def tcmalloc_preload(environ, candidates=TCMALLOC_PATHS, exists=os.path.exists) -> str | None:
    """The tcmalloc library to re-run this command with, or None to run as is.

    Speed only, never results: under glibc's malloc XLA:CPU frees and re-faults its large buffers on
    every call (the quickstart: 87 million minor page faults, a quarter of its CPU time in the
    kernel); tcmalloc keeps them (docs/benchmarks.md sections 7 and 13). None when the user already
    preloads something, sets DPDM_NO_TCMALLOC=1, or tcmalloc is not installed.
    """
    if environ.get("LD_PRELOAD") or _truthy(environ.get(NO_TCMALLOC)):
        return None
    return next((path for path in candidates if exists(path)), None)


def rerun_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `argv` with tcmalloc preloaded, where `tcmalloc_preload` names one.

    Returns (doing nothing) otherwise; the re-run process has LD_PRELOAD set, so it runs as is.
    """
    preload = tcmalloc_preload(os.environ)
    if preload:
        os.execve(sys.executable, argv, {**os.environ, "LD_PRELOAD": preload})


def apply_environment(config, environ=None) -> None:
    """Map the environment variables above onto `config` (in place); the libraries read none."""
    environ = os.environ if environ is None else environ
    for var, field in ENVIRONMENT.items():
        section, name = field.split(".")
        if environ.get(var) and not config[section][name]:
            config[section][name] = environ[var]
    if _truthy(environ.get(NO_FETCH)):
        config.data.fetch = False


def _user_error(e: BaseException, message: str | None = None) -> None:
    logging.vlog(1, "".join(traceback.format_exception(e)))
    print(f"error: {message or e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    """absl's parser, with the config file's and overrides' errors reported as user errors."""
    try:
        args = app.parse_flags_with_usage(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when first used
        return args
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # e.g. --config.no_such_field=1
        _user_error(e, f"bad --config file or override: {type(e).__name__}: {' '.join(str(e).split())}")


class _QuietOrbax(std_logging.Filter):
    """orbax logs every file of every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietOrbax())

    if FLAGS.coordinator_address or os.environ.get("DPDM_MULTIHOST"):
        # On TPU pods / SLURM the arguments may be discovered automatically.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX %d process(es), %d device(s): %s; allocator: %s", jax.process_count(), jax.device_count(),
                 jax.devices()[0].platform, os.environ.get("LD_PRELOAD") or "the C library's malloc")
    from dpdm_jax.checkpoint import CheckpointError
    from dpdm_jax.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS, Preempted

    try:  # DataError is a ValueError
        apply_environment(FLAGS.config)
        from dpdm_jax.models.layers import CONV_IMPLS, resolve_conv_impl

        impl = FLAGS.config.model.conv_impl
        if impl in CONV_IMPLS:  # else the config check says what is allowed
            logging.info("Convolutions: model.conv_impl=%r -> %s", impl, resolve_conv_impl(impl))
        _run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:
        _user_error(e)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)


def _run(mode, config, workdir):
    if mode == "train":
        from dpdm_jax import train

        train.train(config, workdir)
    elif mode == "sample":
        from dpdm_jax import sample

        sample.run(config, workdir)
    elif mode == "export":
        from dpdm_jax import export

        export.run(config, workdir)
    else:
        from dpdm_jax import evaluate

        evaluate.run(config, workdir)


if __name__ == "__main__":
    rerun_with_tcmalloc(sys.orig_argv)
    app.run(main, flags_parser=_parse_flags)
