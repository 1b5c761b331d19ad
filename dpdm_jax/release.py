"""A publishable release: EMA weights + model card + the guarantee they carry, and nothing secret.

    RELEASE/
      weights.npz     the EMA parameters only, one array per '/'-joined parameter path
      model.json      the network's fields, parameterisation, image spec, class names, sampling defaults
      manifest.json   the (epsilon, delta) guarantee (or why there is none), its accountant inputs
                      (q, sigma, T, C, N, delta), the dataset name, seed_secret, code version, and the
                      weights' SHA-256

Privacy invariant: a release is post-processing of the DP weights. It holds no seed, no
optimiser state or non-EMA weights, no training metrics and no statistic of the data (FID
statistics, realised batch sizes); its only data-dependent numbers are the public N and class
names. `load_release` rebuilds the network from model.json alone, so the release is usable by
someone who was sent nothing else; its sampling randomness comes from the sampler's own seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from dpdm_jax.models import DDPMpp

FORMAT = "dpdm_jax.release"
FORMAT_VERSION = 1
WEIGHTS, MODEL, MANIFEST = "weights.npz", "model.json", "manifest.json"
FILES = (WEIGHTS, MODEL, MANIFEST)
# The network fields a release records (conv_impl is speed only: the reader picks its own).
NETWORK_FIELDS = ("image_size", "in_channels", "num_classes", "nf", "ch_mult", "num_res_blocks",
                  "attn_resolutions", "dropout", "max_period")


class ReleaseError(ValueError):
    """A release directory is missing, incomplete, corrupt, or would overwrite something."""


PRIVACY_FIELDS = ("guarantee", "has_guarantee", "private", "seed_secret", "epsilon", "delta", "accountant",
                  "sampling_rate_q", "noise_multiplier_sigma", "steps_T", "planned_steps", "clip_norm_C",
                  "dataset_size_N", "target_epsilon", "unit_of_privacy")


def privacy_manifest(ledger) -> dict:
    """The guarantee of weights trained under `ledger` (a dp.PrivacyLedger), as public JSON fields.

    'guarantee' is the ledger's own sentence: '(eps, delta)-DP ...', or NO PRIVACY / NO guarantee.
    """
    fields = {
        "guarantee": ledger.guarantee(),
        "has_guarantee": ledger.has_guarantee,
        "private": ledger.private,
        "seed_secret": ledger.seed_secret,
        "epsilon": ledger.epsilon() if ledger.private else None,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "sampling_rate_q": ledger.sampling_rate,
        "noise_multiplier_sigma": ledger.noise_multiplier,
        "steps_T": ledger.steps,
        "planned_steps": ledger.planned_steps,
        "clip_norm_C": ledger.clip_norm,
        "dataset_size_N": ledger.dataset_size,
        "target_epsilon": ledger.target_epsilon,
        "unit_of_privacy": "one training example (image and label), add/remove adjacency",
    }
    assert tuple(fields) == PRIVACY_FIELDS
    return fields


def network_fields(model: DDPMpp) -> dict:
    return {f: (list(getattr(model, f)) if isinstance(getattr(model, f), tuple) else getattr(model, f))
            for f in NETWORK_FIELDS}


def flatten_params(params) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[name] = np.asarray(jax.device_get(leaf))
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_release(directory: str, params, model_info: dict, manifest: dict) -> str:
    """Write a release atomically (a temporary sibling directory, renamed when complete).

    Refuses an existing non-empty `directory`: an earlier release is never overwritten.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ReleaseError(f"export.dir={directory} already exists and is not empty; choose another "
                           "directory or move the old release away")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".release-", dir=parent)
    try:
        np.savez(os.path.join(tmp, WEIGHTS), **flatten_params(params))
        with open(os.path.join(tmp, MODEL), "w") as f:
            json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **model_info}, f, indent=2)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "files": {WEIGHTS: _sha256(os.path.join(tmp, WEIGHTS)), MODEL: _sha256(os.path.join(tmp, MODEL))}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked above)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@dataclasses.dataclass(frozen=True)
class Release:
    """A loaded release: the network (built from model.json), its EMA params, and the two JSON files."""

    directory: str
    model: DDPMpp
    params: dict
    model_info: dict
    manifest: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.model.image_size, self.model.image_size, self.model.in_channels)

    @property
    def num_classes(self) -> int | None:
        return self.model.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        names = self.model_info.get("class_names")
        return None if names is None else tuple(names)

    @property
    def parameterisation(self) -> str:
        return self.model_info["diffusion"]["parameterisation"]


def is_release(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in (MODEL, MANIFEST))


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ReleaseError(f"{directory}: not a dpdm_jax release (no {name}; --mode=export writes one)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ReleaseError(f"{path}: not a dpdm_jax release file (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ReleaseError(f"{path}: release format version {data.get('format_version')!r}; this dpdm_jax "
                           f"reads version {FORMAT_VERSION}")
    return data


def load_release(directory: str, conv_impl: str = "auto") -> Release:
    """Read and check a release: every file present, digests matching, weights fitting the network."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise ReleaseError(f"sampling.release={directory} does not exist or is not a directory")
    manifest = _read_json(directory, MANIFEST)
    model_info = _read_json(directory, MODEL)
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights):
        raise ReleaseError(f"{directory}: incomplete release (no {WEIGHTS})")
    for name, digest in manifest.get("files", {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or _sha256(path) != digest:
            raise ReleaseError(f"{path}: SHA-256 differs from the manifest's (corrupt or edited file)")
    try:
        net = dict(model_info["network"])
        for f in ("ch_mult", "attn_resolutions"):
            net[f] = tuple(net[f])
        model = DDPMpp(**{f: net[f] for f in NETWORK_FIELDS}, conv_impl=conv_impl)
        model_info["diffusion"]["parameterisation"]
    except (KeyError, TypeError) as e:
        raise ReleaseError(f"{os.path.join(directory, MODEL)}: missing or invalid field ({type(e).__name__}: {e})") from None
    try:
        with np.load(weights, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / numpy raise many types for a corrupt file
        raise ReleaseError(f"{weights}: corrupt or unreadable ({type(e).__name__}: {e})") from None
    params = _unflatten(flat)
    _check_fits(model, params, weights)
    return Release(directory, model, params, model_info, manifest)


def _check_fits(model: DDPMpp, params: dict, where: str) -> None:
    labels = None if model.num_classes is None else jnp.zeros((1,), jnp.int32)
    shape = (1, model.image_size, model.image_size, model.in_channels)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)), labels))["params"]
    want = {k: (v.shape, v.dtype) for k, v in flatten_params_shapes(expected).items()}
    got = {k: (v.shape, v.dtype) for k, v in flatten_params_shapes(params).items()}
    if want != got:
        differ = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise ReleaseError(f"{where}: the weights do not fit the network in {MODEL} (e.g. {differ[0]})")


def flatten_params_shapes(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
