"""--mode=eval (app layer): samples from a checkpoint's EMA weights -> FID + downstream accuracies -> one JSON.

The report says which numbers are outside the DP guarantee: FID uses statistics of the private
training set, and classifier accuracies are measured on the real test set (selection of the
reported model/epoch on private data would also be outside it).
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from dpdm_jax import experiment, sample
from dpdm_jax.data import synthetic_dataset
from dpdm_jax.checkpoint import ledger_from_metadata
from dpdm_jax.diffusion import resolve_labels

OUTSIDE_DP = {
    "fid": "FID compares with Inception statistics of the PRIVATE training set; the statistics are "
           "not privatised, so the FID value itself is not covered by the guarantee.",
    "fid_reference_statistics": "The cached Inception mean/covariance of the training set (a .npz under "
                                "$DPDM_FID_STATS_DIR, ~/.cache/dpdm_jax/fid_stats, or WORKDIR/fid_stats for "
                                "synthetic data) is a statistic of private data: keep it private.",
    "classifier_accuracy": "Classifiers are trained and selected on synthetic data only, but tested on the "
                           "real test set; choosing among runs/checkpoints by these numbers is model "
                           "selection on real data, outside the guarantee.",
    "training_metrics": "metrics.jsonl, TensorBoard and the log lines (loss, gradient norms, clipped fraction, "
                        "non-finite fraction, realised batch size num_examples, step time, and the label "
                        "accuracy of samples scored by a classifier trained on the real training set) are "
                        "computed from private data without noise: not covered.",
    "checkpoints": "Checkpoints hold the secret run seed in their metadata (and the non-EMA weights and "
                   "optimiser state, which are covered): keep them private; release only weights or samples.",
    "covered": "The trained weights and the generated samples are covered by the (epsilon, delta) "
               "guarantee reported under 'privacy', and only if 'privacy.guarantee' does not say "
               "NO guarantee / NO PRIVACY.",
}


def _test_split(config: ml_collections.ConfigDict):
    """The real test set the classifiers are scored on; None for your own images (none exists)."""
    d = config.data
    if d.name in experiment.USER_DATASETS:
        return None
    if d.name == "synthetic":  # a second draw of the same synthetic distribution
        return synthetic_dataset(d.synthetic_size, d.synthetic_image_size, d.synthetic_channels,
                                 d.synthetic_num_classes, seed=1)
    return experiment.load_public_split(config, "test")


def feature_extractor(config):
    """The Inception extractor FID and KID share; it computes the features of the same images once
    (the samples, and the first N training images when the two reference counts are equal)."""
    from dpdm_jax.evaluation import fid, inception

    return fid.MemoisedExtractor(inception.InceptionFeatureExtractor(path=config.eval.inception_weights or None,
                                                                     batch_size=config.eval.fid_batch_size))


def compute_fid(config, images: np.ndarray, workdir: str, extractor) -> float:
    from dpdm_jax.evaluation import fid

    # Synthetic and user data have no global identity: cache their statistics inside the run.
    local = config.data.name == "synthetic" or config.data.name in experiment.USER_DATASETS
    cache_dir = os.path.join(workdir, "fid_stats") if local else (config.eval.fid_stats_dir or None)
    ref = fid.reference_statistics(
        config.data.name, "train", images=lambda: experiment.load_training_data(config).images,
        extractor=extractor, cache_dir=cache_dir, num_images=config.eval.fid_reference_images or None,
    )
    return fid.fid_from_stats(fid.image_statistics(images, extractor), ref)


def compute_kid(config, images: np.ndarray, workdir: str, extractor) -> dict:
    """KID of the samples against the first eval.kid_reference_images train images (cached features)."""
    from dpdm_jax.evaluation import kid

    train = experiment.load_training_data(config).images
    cache_dir = os.path.join(workdir, "fid_stats") if config.data.name == "synthetic" else None
    ref = kid.reference_features(config.data.name, "train", min(config.eval.kid_reference_images, len(train)),
                                 images=train, extractor=extractor, cache_dir=cache_dir)
    result = kid.kid_of_images(images, ref, extractor, seed=max(config.seed, 0),
                               num_subsets=config.eval.kid_num_subsets)
    return result | {"outside_dp_guarantee": kid.OUTSIDE_DP}


def compute_label_accuracy(config, images: np.ndarray, labels: np.ndarray, workdir: str) -> dict:
    """Label accuracy by the cached CNN trained on the full real train split (synthetic data: in the run)."""
    from dpdm_jax.evaluation import label_accuracy as la

    synthetic = config.data.name == "synthetic"
    clf = la.get_label_classifier(
        config.data.name,
        train=experiment.load_training_data(config) if synthetic else experiment.load_public_split(config, "train"),
        test=_test_split(config), data_dir=config.data.data_dir or None,
        cache_dir=os.path.join(workdir, "label_classifier") if synthetic else None,
        epochs=config.eval.label_classifier_epochs)
    return la.label_accuracy(images, labels, clf) | {"outside_dp_guarantee": la.OUTSIDE_DP}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluate the checkpoint of `workdir`; writes WORKDIR/eval/report_step<step>.json."""
    experiment.validate_config(config)
    exp = experiment.build(config, with_data=False)
    model, ema_params, meta = sample.restore_ema_params(exp, workdir, config.sampling.checkpoint_step)
    step = int(meta["step"])
    ledger = ledger_from_metadata(meta)
    spec = exp.spec
    n = exp.eval.num_samples
    tic = time.time()
    labels = resolve_labels("balanced", n, spec.num_classes)  # every class equally often
    images, labels = sample.generate(exp.sampling, model, ema_params, n, jax.random.key(max(config.seed, 0) + 1),
                                     labels=labels)
    logging.info("Generated %d samples in %.0f s.", n, time.time() - tic)

    report = {
        "step": step,
        "dataset": config.data.name,
        "num_samples": n,
        "fid_num_samples": n,
        "fid_comparison": "FID is biased by the sample count: compare FIDs only at equal fid_num_samples "
                          "and fid_reference_images (KID is unbiased, see kid).",
        "fid_reference_images": config.eval.fid_reference_images or "all of the train split",
        "sampler": sample.sampler_options(config.sampling)[1] | {"name": config.sampling.sampler,
                                                        "guidance_weight": config.sampling.guidance_weight},
        "privacy": {**ledger.to_dict(), "has_guarantee": ledger.has_guarantee}
        | ({"epsilon_spent": ledger.epsilon(), "epsilon_spent_pld": ledger.epsilon(accountant="pld")}
           if ledger.private else {}),
        "outside_dp_guarantee": OUTSIDE_DP,
    }
    # Built on first use, inside the try blocks below: missing weights skip FID/KID instead of failing.
    extractor = functools.cache(lambda: feature_extractor(config))

    if config.eval.fid:
        try:
            report["fid"] = compute_fid(config, images, workdir, extractor())
        except FileNotFoundError as e:  # no converted Inception weights on this machine
            report["fid"] = None
            report["fid_error"] = str(e)
            logging.warning("FID skipped: %s", e)
    else:
        report["fid"] = None
        report["fid_skipped"] = "eval.fid=False"
    if config.eval.kid:
        try:
            report["kid"] = compute_kid(config, images, workdir, extractor())
        except FileNotFoundError as e:
            report["kid"] = None
            report["kid_error"] = str(e)
            logging.warning("KID skipped: %s", e)
    if labels is not None and config.eval.label_accuracy:
        if config.data.name in experiment.USER_DATASETS:  # no public recipe or real test split to pin it
            report["label_accuracy"] = None
            report["label_accuracy_skipped"] = f"{config.data.name} data has no real test split"
        else:
            report["label_accuracy"] = compute_label_accuracy(config, images, labels, workdir)

    if labels is not None and config.eval.classifiers:
        from dpdm_jax.evaluation import classifiers

        test = _test_split(config)
        if test is None:
            report["classifiers"] = None
            report["classifiers_skipped"] = f"{config.data.name} data has no real test split"
            logging.warning("Classifier scores skipped: %s", report["classifiers_skipped"])
        else:
            report["classifiers"] = classifiers.evaluate_all(
                images, labels, test.images, test.labels, seed=max(config.seed, 0),
                epochs=config.eval.classifier_epochs, kinds=tuple(config.eval.classifiers),
            )
            for r in report["classifiers"].values():
                r["num_synthetic_samples"] = n  # split 90/10 into train / validation

    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"report_step{step}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    logging.info("Wrote %s", path)
    print(json.dumps({k: report.get(k) for k in ("step", "fid", "kid", "label_accuracy", "classifiers")}
                     | {"privacy": ledger.guarantee()},
                     default=str), flush=True)
    return report
