"""Evaluation: FID and KID with the TF 2015-12-05 Inception network, label accuracy, classifiers.

- ``inception``: the Flax FID Inception-v3, uint8 preprocessing, batched feature extraction.
- ``convert_inception``: CLI converting the TorchScript weights to .npz (needs torch; run once).
- ``fid``: feature statistics, Frechet distance, cached reference statistics.
- ``classifiers``: logistic regression / MLP / CNN trained on synthetic, tested on real data.
- ``kid``: KID (unbiased MMD^2, cubic kernel, subset average and its standard error), cached
  reference features.
- ``label_accuracy``: a cached real-data CNN labels class-conditional samples (overall, per
  class); ``conditional_metrics`` for the training log; a CLI for samples.npz.

Submodules are not imported here, so ``import dpdm_jax.evaluation`` stays cheap.
"""
