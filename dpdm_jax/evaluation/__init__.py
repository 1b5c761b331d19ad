"""Evaluation: FID with the TF 2015-12-05 Inception network, and downstream classifiers.

- ``inception``: the Flax FID Inception-v3, uint8 preprocessing, batched feature extraction.
- ``convert_inception``: CLI converting the TorchScript weights to .npz (needs torch; run once).
- ``fid``: feature statistics, Frechet distance, cached reference statistics.
- ``classifiers``: logistic regression / MLP / CNN trained on synthetic, tested on real data.

Submodules are not imported here, so ``import dpdm_jax.evaluation`` stays cheap.
"""
