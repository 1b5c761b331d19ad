"""DPDM training: DP-SGD on a diffusion model, resumable, with the privacy ledger in every checkpoint.

Read top to bottom: build everything from the config, restore the latest checkpoint if any, then

    for step in range(start, T):
        batch   = Poisson sample (seed, step), cut into padded chunks
        state   = DP-SGD step (clip per example, noise once, / qN, Adam, EMA)
        ledger  = steps done  ->  epsilon spent
        log / checkpoint / sample grid
"""
from __future__ import annotations

import json
import os
import secrets
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from dpdm_jax import experiment, sample
from dpdm_jax.checkpoint import Checkpointer
from dpdm_jax.dp import (DPSGDStep, PoissonSampler, PrivacyLedger, TrainState, check_params_only, data_mesh,
                         run_key_from_seed)
from dpdm_jax.metrics import MetricsWriter, Progress, format_eta, save_image_grid


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    return optax.adam(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps)


def state_template(config: ml_collections.ConfigDict, model) -> TrainState:
    """An abstract TrainState (shapes, dtypes, one-device sharding) of the saved layout; no compute."""

    def build():
        params = experiment.init_variables(model, 0)["params"]
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                          opt_state=make_optimizer(config).init(params), ema_params=params)

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(build))


def privacy_summary(ledger: PrivacyLedger) -> str:
    return (f"epsilon={ledger.epsilon():.4g} spent of {ledger.target_epsilon:g} (delta={ledger.delta:g}, "
            f"{ledger.accountant.upper()}) after {ledger.steps}/{ledger.planned_steps} steps; "
            f"sigma={ledger.noise_multiplier:.4g}, q={ledger.sampling_rate:.4g}, C={ledger.clip_norm:g}, "
            f"N={ledger.dataset_size}")


def _metadata(config, ledger: PrivacyLedger, step: int, seed: int) -> dict:
    return {"step": step, "seed": seed, "ledger": ledger.to_dict(),
            "privacy_summary": privacy_summary(ledger), "config": json.loads(config.to_json())}


def check_resume_allowed(ckpt: Checkpointer, config, ledger: PrivacyLedger) -> int | None:
    """Before any compute: refuse to continue a run whose privacy parameters or seed changed.

    Returns the seed of the existing run (None for a new run).
    """
    seed = None
    for step in ckpt.all_steps():
        try:
            meta = ckpt.restore_metadata(step)
        except Exception:  # unreadable: restore_latest reports it and falls back
            continue
        PrivacyLedger.from_dict(meta["ledger"]).check_compatible(ledger)
        if config.seed >= 0 and meta["seed"] != config.seed:
            raise ValueError(f"Refusing to resume: the checkpoint was trained with another seed than the "
                             f"config's seed {config.seed}; the resumed run would not replay its batches.")
        seed = meta["seed"]
    return seed


def run_seed(config_seed: int, existing_seed: int | None) -> int:
    """The seed of the batch sampler and of the DP noise. It must be SECRET for the guarantee.

    Anyone who knows it can regenerate the noise and the batches and undo the privacy. Default
    (config seed -1): a fresh seed from the OS's secure generator, stored only in the (private)
    checkpoints, identical on every host. A fixed config seed is for tests and debugging.
    """
    if existing_seed is not None:
        return int(existing_seed)
    if config_seed >= 0:
        logging.warning("config.seed=%d is fixed and therefore known: the noise and batches can be "
                        "regenerated, so this run has NO privacy against anyone who knows the seed. "
                        "Use seed=-1 (default) for a secret seed.", config_seed)
        return int(config_seed)
    seed = secrets.randbits(62)
    if jax.process_count() > 1:  # every host must add the same noise and sample the same batches
        from jax.experimental import multihost_utils

        seed = int(multihost_utils.broadcast_one_to_all(np.int64(seed)))
    return seed


def resume(ckpt: Checkpointer, state: TrainState) -> tuple[TrainState, int]:
    """The latest good checkpoint's state and step, or (state, 0) for a new run."""
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state, 0
    state, _ = restored
    logging.info("Resumed from checkpoint at step %d in %s.", int(state.step), ckpt.directory)
    return state, int(state.step)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (or resume) a DPDM model in `workdir`; returns the final state."""
    # 1. Everything that can be wrong with the config fails here, before any compute.
    experiment.validate_config(config)
    data = experiment.load_training_data(config)
    schedule = experiment.privacy_schedule(config, len(data.images))
    ledger = experiment.make_ledger(config, schedule)
    spec = experiment.image_spec(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.training.keep_checkpoints)
    seed = run_seed(config.seed, check_resume_allowed(ckpt, config, ledger))
    is_chief = jax.process_index() == 0
    logging.info("Privacy: target epsilon=%g, delta=%g, sigma=%.4f (calibrated with %s), q=%.5g "
                 "(expected batch %.1f of N=%d), T=%d steps, C=%g, K=%d.", config.dp.epsilon, ledger.delta,
                 ledger.noise_multiplier, ledger.accountant.upper(), ledger.sampling_rate,
                 schedule.expected_batch_size, schedule.dataset_size, schedule.num_steps, ledger.clip_norm,
                 config.diffusion.noise_multiplicity)

    # 2. Model, per-example loss and the DP-SGD step.
    model = experiment.build_model(config)
    # Independent streams from one seed: training steps, sample grids (init uses the seed itself).
    root_key = run_key_from_seed(seed)
    run_key, grid_key = (jax.random.fold_in(root_key, i) for i in range(2))
    variables = experiment.init_variables(model, seed)
    check_params_only(variables)
    mesh = data_mesh()
    dp_step = DPSGDStep(
        experiment.per_example_loss(config, model), make_optimizer(config),
        clip_norm=ledger.clip_norm, noise_multiplier=ledger.noise_multiplier,
        expected_batch_size=schedule.expected_batch_size, mesh=mesh,
        microbatch_size=config.training.microbatch_size or None,
        ema_max_decay=config.optim.ema_max_decay,
    )
    sampler = PoissonSampler(schedule.dataset_size, schedule.sampling_rate, config.training.chunk_size,
                             seed=seed, num_devices=mesh.size)

    # 3. Resume from the latest good checkpoint, if any.
    state, start = resume(ckpt, dp_step.init(variables["params"]))
    ledger.steps = start
    last = schedule.num_steps if config.training.max_steps <= 0 else min(schedule.num_steps, config.training.max_steps)

    writer = MetricsWriter(workdir, enabled=is_chief)
    progress = Progress(last, start)
    t = config.training

    def save(step):
        # Ledger file first: a crash between the two writes leaves it ahead of the checkpoints, never behind.
        if is_chief:
            ledger.save(os.path.join(workdir, "privacy_ledger.json"))
        ckpt.save(step, state, _metadata(config, ledger, step, seed))

    def write_grid(step):
        key = jax.random.fold_in(grid_key, step)
        images, _ = sample.generate(config, model, state.ema_params, t.num_grid_samples, key)
        if is_chief:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            path = os.path.join(workdir, "samples", f"grid_step{step}.png")
            save_image_grid(images, path, num_cols=spec.num_classes or None)
            logging.info("Wrote %s", path)

    def write_fid(step):
        from dpdm_jax.evaluation import report  # loads the Inception network only when asked

        key = jax.random.fold_in(jax.random.fold_in(grid_key, step), 1)
        images, _ = sample.generate(config, model, state.ema_params, t.fid_num_samples, key)
        fid = report.compute_fid(config, images, workdir)
        writer.write(step, {"fid": fid, "fid_num_samples": t.fid_num_samples})
        logging.info("step %d  FID(%d samples vs train stats) %.2f", step, t.fid_num_samples, fid)

    # 4. The loop.
    for step in range(start, last):
        chunks = (
            (experiment.host_examples(data, c.indices, spec.num_classes is not None), c.indices, c.mask)
            for c in sampler.iter_chunks(step)
        )
        tic = time.time()
        state, stats = dp_step(state, chunks, run_key, step)
        # Counted as soon as the step has run: never fewer steps than any saved model took.
        ledger.steps = step + 1
        done = step + 1
        if done % t.log_every == 0 or done == last:
            summary = stats.summary()
            rate, eta = progress.rates(done)
            epsilon = ledger.epsilon()
            record = {**summary, "epsilon": epsilon, "steps_per_s": rate, "step_time_s": time.time() - tic}
            writer.write(done, record)
            if is_chief:
                logging.info("step %d/%d  loss %.4f  clipped %.2f  epsilon %.3f  %.2f steps/s  ETA %s",
                             done, last, summary["loss"], summary["clipped_fraction"], epsilon, rate,
                             format_eta(eta))
            progress.render(done, f"loss {summary['loss']:.4f} eps {epsilon:.3f} ETA {format_eta(eta)}")
        if done % t.checkpoint_every == 0 or done == last:
            save(done)
        if (t.sample_every > 0 and done % t.sample_every == 0) or (t.sample_every >= 0 and done == last):
            write_grid(done)
        if t.fid_every > 0 and (done % t.fid_every == 0 or done == last):
            write_fid(done)

    if start >= last:
        logging.info("Nothing to do: the checkpoint is already at step %d.", start)
    writer.close()
    ckpt.close()
    logging.info("Done. %s", privacy_summary(ledger))
    if is_chief:
        print(f"Privacy guarantee of {workdir}: {privacy_summary(ledger)}", flush=True)
    return state
