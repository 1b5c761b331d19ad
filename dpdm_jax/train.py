"""DPDM training: DP-SGD on a diffusion model, resumable, with the privacy ledger in every checkpoint.

Read top to bottom: build everything from the config, restore the latest checkpoint if any, then

    for step in range(start, T):
        batch   = Poisson sample (seed, step), cut into padded chunks
        state   = DP-SGD step (clip per example, noise once, / qN, Adam, EMA)
        ledger  = steps done  ->  epsilon spent
        log / checkpoint / sample grid
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from dpdm_jax import experiment, sample
from dpdm_jax.checkpoint import Checkpointer, ledger_from_metadata
from dpdm_jax.diffusion import resolve_labels
from dpdm_jax.checkpoint import state_template as checkpoint_state_template
from dpdm_jax.dp import (NO_GUARANTEE_PUBLIC_SEED, NO_PRIVACY, PrivacyLedger, TrainState, check_params_only,
                         data_mesh, run_keys)
from dpdm_jax.metrics import MetricsWriter, Progress, format_eta, save_image_grid
from dpdm_jax.preemption import Preempted, PreemptionWatch


make_optimizer = experiment.make_optimizer  # the optimiser is built from the config, in the builders


def state_template(config: ml_collections.ConfigDict, model) -> TrainState:
    """An abstract TrainState of the saved layout (checkpoint.state_template with the config's optimiser)."""
    return checkpoint_state_template(model, experiment.make_optimizer(config))


def privacy_summary(ledger: PrivacyLedger) -> str:
    """The run's privacy in one line; it starts with NO PRIVACY / NO guarantee when there is none."""
    progress = f"after {ledger.steps}/{ledger.planned_steps} steps"
    if not ledger.private:
        return f"{NO_PRIVACY}; {progress}; q={ledger.sampling_rate:.4g}, N={ledger.dataset_size}"
    spent = (f"epsilon={ledger.epsilon():.4g} spent of {ledger.target_epsilon:g} (delta={ledger.delta:g}, "
             f"{ledger.accountant.upper()}) {progress}; sigma={ledger.noise_multiplier:.4g}, "
             f"q={ledger.sampling_rate:.4g}, C={ledger.clip_norm:g}, N={ledger.dataset_size}")
    if not ledger.seed_secret:
        return f"{NO_GUARANTEE_PUBLIC_SEED}; only with a secret seed would it be {spent}"
    return spent


def summary_line(ledger: PrivacyLedger, workdir: str) -> str:
    """What the run prints last. Only a run with a guarantee prints 'Privacy guarantee'."""
    if ledger.has_guarantee:
        return f"Privacy guarantee of {workdir}: {privacy_summary(ledger)}"
    return f"{workdir}: {privacy_summary(ledger)}"


def _metadata(config, ledger: PrivacyLedger, step: int, seed: int) -> dict:
    """Checkpoint metadata: the ONLY place the seed is written (checkpoints are private)."""
    return {"step": step, "seed": seed, "seed_secret": ledger.seed_secret, "ledger": ledger.to_dict(),
            "privacy_summary": privacy_summary(ledger), "config": json.loads(config.to_json())}


def check_resume_allowed(ckpt: Checkpointer, config, ledger: PrivacyLedger) -> tuple[int, bool] | None:
    """Before any compute: refuse to continue a run whose privacy parameters or seed changed.

    Returns (seed, seed_secret) of the existing run (None for a new run). A run started with a
    public seed stays public: resuming it under seed=-1 is refused unless the config names that
    seed explicitly (and so accepts NO guarantee).
    """
    existing = None
    for step in ckpt.all_steps():
        try:
            meta = ckpt.restore_metadata(step)
        except Exception:  # unreadable: restore_latest reports it and falls back
            continue
        PrivacyLedger.from_dict(meta["ledger"]).check_compatible(ledger)
        seed, secret = int(meta["seed"]), ledger_from_metadata(meta).seed_secret
        if config.seed >= 0 and seed != config.seed:
            raise ValueError(f"Refusing to resume: the checkpoint was trained with another seed than the "
                             f"config's seed {config.seed}; the resumed run would not replay its batches.")
        if config.seed < 0 and not secret:
            raise ValueError(f"Refusing to resume {ckpt.directory} under seed=-1: the run was started with the "
                             f"public seed {seed}, so it has NO guarantee and resuming cannot make it secret. "
                             f"Set seed={seed} to continue it knowingly without a guarantee, or start a new workdir.")
        # A secret seed written into a config is no longer secret.
        existing = (seed, secret and config.seed < 0)
    return existing


def broadcast_seed(seed: int) -> int:
    """Process 0's seed on every host, all 62 bits (as two uint32 words: int64 would become int32)."""
    from jax.experimental import multihost_utils

    words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    hi, lo = (int(w) for w in np.asarray(multihost_utils.broadcast_one_to_all(words)))
    seed = (hi << 32) | lo
    if not 0 <= seed < 2**62:
        raise ValueError("the broadcast run seed is out of range [0, 2**62): the hosts disagree on it")
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
        logging.warning("config.seed is fixed and therefore known: the noise and batches can be "
                        "regenerated, so this run has NO guarantee (%s). Use seed=-1 (default) for a "
                        "secret seed.", NO_GUARANTEE_PUBLIC_SEED)
        return int(config_seed)
    seed = secrets.randbits(62)
    if jax.process_count() > 1:  # every host must add the same noise and sample the same batches
        seed = broadcast_seed(seed)
    return seed


def _digest(*parts) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else str(part).encode())
        h.update(b"|")
    return h.digest()


def check_hosts_agree(config, data, seed: int) -> None:
    """Multi-host: every host must hold the same config, training set and seed; else fail clearly.

    A host with another data subset would let one example into a batch twice (or never), and
    another seed would add different noise on different hosts. Only SHA-256 digests are
    exchanged (the seed's is salted and never logged).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    labels = np.zeros(0) if data.labels is None else data.labels
    parts = {"config": _digest(config.to_json()), "training data (images and labels)":
             _digest(data.images.shape, data.images, labels.shape, labels),
             "seed": _digest("dpdm_jax host seed check", seed)}
    mine = np.frombuffer(b"".join(parts.values()), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(parts), -1)
    differ = [name for i, name in enumerate(parts) if not (every[:, i] == every[0, i]).all()]
    if differ:
        hosts = sorted({h for i in range(len(parts)) for h in range(len(every)) if (every[h, i] != every[0, i]).any()})
        raise ValueError(f"The hosts disagree on the {' and the '.join(differ)} (hosts {hosts} differ from "
                         "host 0): every host must run the same config on the same dataset. Refusing to train.")


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
    exp = experiment.build(config)  # data, spec, model, loss, optimiser, DP plan, image sampling: once
    data, plan, spec = exp.data, exp.plan, exp.spec
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.training.keep_checkpoints)
    existing = check_resume_allowed(ckpt, config, plan.ledger(seed_secret=config.seed < 0))
    seed = run_seed(config.seed, None if existing is None else existing[0])
    check_hosts_agree(config, data, seed)
    ledger = plan.ledger(seed_secret=config.seed < 0 if existing is None else existing[1])
    is_chief = jax.process_index() == 0
    if plan.private:
        logging.info("Privacy: target epsilon=%g, delta=%g, sigma=%.4f (%s, %s), q=%.5g (expected batch %.1f of "
                     "N=%d), T=%d steps, C=%g, K=%d.%s", config.dp.epsilon, plan.delta, plan.noise_multiplier,
                     "calibrated" if config.dp.noise_multiplier < 0 else "given", plan.accountant.upper(),
                     plan.sampling_rate, plan.expected_batch_size, plan.dataset_size, plan.num_steps,
                     plan.clip_norm, config.diffusion.noise_multiplicity,
                     "" if ledger.seed_secret else f" {NO_GUARANTEE_PUBLIC_SEED}.")
    else:
        logging.warning("%s. q=%.5g (expected batch %.1f of N=%d), T=%d steps, K=%d.", NO_PRIVACY,
                        plan.sampling_rate, plan.expected_batch_size, plan.dataset_size, plan.num_steps,
                        config.diffusion.noise_multiplicity)

    # 2. Model, per-example loss and the DP-SGD step; the plan builds the sampler and the step.
    model = exp.model
    run_key, grid_key, init_key = run_keys(seed)  # independent PRF streams of the secret seed
    variables = experiment.init_variables(model, init_key)
    check_params_only(variables)
    mesh = data_mesh()
    dp_step = plan.step(exp.per_example_loss, exp.optimizer, mesh=mesh,
                        microbatch_size=config.training.microbatch_size or None,
                        ema_max_decay=config.optim.ema_max_decay)
    batch_selection = plan.sampler(config.training.chunk_size, num_devices=mesh.size)  # Poisson, rate q

    # 3. Resume from the latest good checkpoint, if any.
    state, start = resume(ckpt, dp_step.init(variables["params"]))
    ledger.steps = start
    last = plan.num_steps if config.training.max_steps <= 0 else min(plan.num_steps, config.training.max_steps)

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
        images, _ = sample.generate(exp.sampling, model, state.ema_params, t.num_grid_samples, key)
        if is_chief:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            path = os.path.join(workdir, "samples", f"grid_step{step}.png")
            save_image_grid(images, path, num_cols=spec.num_classes or None)
            logging.info("Wrote %s", path)

    def write_fid(step):
        from dpdm_jax import evaluate  # loads the Inception network only when asked

        key = jax.random.fold_in(jax.random.fold_in(grid_key, step), 1)
        images, _ = sample.generate(exp.sampling, model, state.ema_params, t.fid_num_samples, key)
        fid = evaluate.compute_fid(config, images, workdir, evaluate.feature_extractor(config))
        writer.write(step, {"fid": fid, "fid_num_samples": t.fid_num_samples})
        logging.info("step %d  FID(%d samples vs train stats) %.2f", step, t.fid_num_samples, fid)

    def write_label_accuracy(step):
        from dpdm_jax import evaluate  # trains the real-data classifier on first use (cached)

        key = jax.random.fold_in(jax.random.fold_in(grid_key, step), 2)
        n = t.label_accuracy_num_samples
        labels = resolve_labels("balanced", n, spec.num_classes)
        images, labels = sample.generate(exp.sampling, model, state.ema_params, n, key, labels=labels)
        if not is_chief:  # every host samples (as for the grid); process 0 scores and writes
            return
        acc = evaluate.compute_label_accuracy(config, images, labels, workdir)
        writer.write(step, {"label_accuracy": acc["overall"], "label_accuracy_num_samples": n})
        logging.info("step %d  label accuracy (%d EMA samples, real-data classifier) %.3f", step, n, acc["overall"])

    # 4. The loop. On SIGTERM: finish the step, checkpoint, stop (preemption.py).
    stopped_at = None
    with PreemptionWatch() as preemption:
        for step in range(start, last):
            chunks = (
                (experiment.host_examples(data, c.indices, spec.num_classes is not None), c.indices, c.mask)
                for c in batch_selection.iter_chunks(seed, step)
            )
            tic = time.time()
            state, stats = dp_step(state, chunks, run_key, step)
            # Counted as soon as the step has run: never fewer steps than any saved model took.
            ledger.steps = step + 1
            done = step + 1
            if done % t.log_every == 0 or done == last:
                summary = stats.summary()
                rate, eta = progress.rates(done)
                privacy = f"epsilon {ledger.epsilon():.3f}" if ledger.has_guarantee else (
                    "NO PRIVACY" if not ledger.private else f"NO guarantee (public seed) epsilon {ledger.epsilon():.3f}")
                record = {**summary, "steps_per_s": rate, "step_time_s": time.time() - tic}
                if ledger.private:
                    record["epsilon"] = ledger.epsilon()
                if not ledger.has_guarantee:
                    record["privacy"] = ledger.guarantee()
                writer.write(done, record)
                if is_chief:
                    logging.info("step %d/%d  loss %.4f  clipped %.2f  %s  %.2f steps/s  ETA %s", done, last,
                                 summary["loss"], summary["clipped_fraction"], privacy, rate, format_eta(eta))
                progress.render(done, f"loss {summary['loss']:.4f} {privacy} ETA {format_eta(eta)}")
            stop = done < last and preemption.reached(done)  # every host asks, every step
            if done % t.checkpoint_every == 0 or done == last or stop:
                save(done)
            if stop:
                stopped_at = done
                break
            if (t.sample_every > 0 and done % t.sample_every == 0) or (t.sample_every >= 0 and done == last):
                write_grid(done)
            if t.fid_every > 0 and (done % t.fid_every == 0 or done == last):
                write_fid(done)
            if t.label_accuracy_every > 0 and (done % t.label_accuracy_every == 0 or done == last):
                write_label_accuracy(done)

    if start >= last:
        logging.info("Nothing to do: the checkpoint is already at step %d.", start)
    writer.close()
    ckpt.close()
    if stopped_at is not None:
        logging.warning("SIGTERM: stopped after step %d/%d, checkpoint saved. %s", stopped_at, last,
                        privacy_summary(ledger))
        raise Preempted(stopped_at)
    logging.info("Done. %s", privacy_summary(ledger))
    if is_chief:
        print(summary_line(ledger, workdir), flush=True)
    return state
