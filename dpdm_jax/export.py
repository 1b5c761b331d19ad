"""--mode=export: a publishable release from the EMA weights of a finished checkpoint.

    python -m dpdm_jax.main --config=CONFIG --workdir=WORKDIR --mode=export \
        [--config.export.step=K] [--config.export.dir=DIR]     # default: latest, WORKDIR/release

The run's checkpoints hold the secret seed and must stay private; a release (layout in
dpdm_jax/release.py) holds only what the guarantee covers: the EMA weights, the network and
sampling config, and a manifest of the guarantee. Sample from it alone with
`--mode=sample --config=configs/release.py:DIR --workdir=OUT`.
"""
from __future__ import annotations

import datetime
import os
import subprocess

import ml_collections
from absl import logging

import dpdm_jax
from dpdm_jax import experiment, release, sample
from dpdm_jax.checkpoint import Checkpointer, ledger_from_metadata
from dpdm_jax.dp import PrivacyLedger

# What a release leaves out, and why (written into the manifest for its readers).
NOT_INCLUDED = {
    "seed": "the run's secret seed (it would let anyone regenerate the noise and the batches)",
    "optimiser_state_and_raw_weights": "only the EMA weights are released",
    "training_metrics": "loss, gradient norms, realised batch sizes are computed without noise",
    "data_statistics": "no FID statistics or other statistic of the training images",
    "data_path": "the location of the training data",
}


def code_version() -> dict:
    """dpdm_jax's version, and the git commit of its checkout when there is one."""
    version = {"dpdm_jax": dpdm_jax.__version__, "git_commit": None}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(dpdm_jax.__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            version["git_commit"] = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            version["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def model_card(config: ml_collections.ConfigDict, model) -> dict:
    """model.json: enough to rebuild the network and sample from it, and nothing about the run."""
    s = config.sampling
    spec = experiment.image_spec(config)
    return {
        "network": {"architecture": "DDPMpp", **release.network_fields(model)},
        "diffusion": {"parameterisation": config.diffusion.parameterisation,
                      "label_dropout": config.diffusion.label_dropout},
        "image": {"size": spec.image_size, "channels": spec.channels, "num_classes": spec.num_classes,
                  "pixels": "uint8; the network sees x / 127.5 - 1"},
        "class_names": None if spec.num_classes is None else list(sample.class_names(config)),
        "sampling": {"sampler": s.sampler, "num_steps": s.num_steps, "guidance_weight": s.guidance_weight,
                     "s_churn": s.s_churn, "s_min": s.s_min, "s_max": s.s_max, "s_noise": s.s_noise,
                     "labels": s.labels, "batch_size": s.batch_size},
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the release of `export.step` (default: the latest checkpoint); returns its directory."""
    experiment.validate_config(config)
    out = config.export.dir or os.path.join(workdir, "release")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):  # before any restore
        raise release.ReleaseError(f"export.dir={os.path.abspath(out)} already exists and is not empty; choose "
                                   "another directory or move the old release away")
    steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: train first (--mode=train).")
    if config.export.step >= 0 and config.export.step not in steps:
        raise ValueError(f"export.step={config.export.step}: no checkpoint of that step in {workdir}; it has steps {steps}")
    model, ema_params, meta = sample.restore_ema_params(experiment.build(config, with_data=False), workdir,
                                                        config.export.step)
    step = int(meta["step"])
    if not isinstance(meta.get("ledger"), dict):
        raise release.ReleaseError(f"checkpoint {step} in {workdir} has no privacy ledger: refusing to export "
                                   "weights whose guarantee is unknown")
    ledger = ledger_from_metadata(meta)
    if ledger.steps < step:
        raise release.ReleaseError(f"checkpoint {step} in {workdir}: its ledger counts only {ledger.steps} steps, "
                                   "so its accounting is unfinished; refusing to export it")
    manifest = {"release_of": f"EMA weights after {step} DP-SGD steps", "step": step,
                "dataset": config.data.name, **release.privacy_manifest(ledger),
                "noise_multiplicity_K": config.diffusion.noise_multiplicity}
    if not ledger.has_guarantee:
        manifest["WARNING"] = f"THIS RELEASE CARRIES NO PRIVACY GUARANTEE: {ledger.guarantee()}"
    run_ledger = os.path.join(workdir, "privacy_ledger.json")
    if os.path.exists(run_ledger) and PrivacyLedger.load(run_ledger).steps > step:
        later = PrivacyLedger.load(run_ledger).steps
        manifest["note"] = (f"the run continued to {later} steps; anything else released from it (later weights, "
                            f"grids) is covered only by the guarantee after {later} steps")
        logging.warning("Exporting step %d of a run that went on to step %d: %s", step, later, manifest["note"])
    manifest.update(code_version=code_version(), exported_at=datetime.datetime.now(datetime.timezone.utc)
                    .isoformat(timespec="seconds"), not_included=NOT_INCLUDED)
    directory = release.write_release(out, ema_params, model_card(config, model), manifest)
    if ledger.has_guarantee:
        line = f"Release {directory} (step {step}): {ledger.guarantee()}"
    else:
        logging.warning("THIS RELEASE CARRIES NO PRIVACY GUARANTEE: %s", ledger.guarantee())
        line = f"Release {directory} (step {step}): {ledger.guarantee()}. THIS RELEASE CARRIES NO PRIVACY GUARANTEE."
    print(line, flush=True)
    return directory
