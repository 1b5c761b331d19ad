"""Accounting against the paper's reference table, and parameter validation."""
import math

import pytest

from dpdm_jax.dp.accounting import PrivacyLedger, calibrate_noise_multiplier, compute_epsilon
from dpdm_jax.dp.validation import validate_dp_params

# method.md section 1 (Opacus RDP): (q, T, delta, epsilon, sigma).
REFERENCE = [
    (1 / 15, 4500, 1e-5, 10, 2.488),
    (1 / 15, 4500, 1e-5, 1, 18.28),
    (1 / 25, 12500, 1e-5, 10, 2.48),
    (1 / 80, 24000, 1e-6, 10, 1.304),
    (1 / 80, 24000, 1e-6, 1, 8.83),
    (1 / 626, 62600, 7e-7, 10, 0.603),
]


@pytest.mark.parametrize("q, steps, delta, epsilon, sigma_ref", REFERENCE)
def test_calibration_reproduces_reference_table(q, steps, delta, epsilon, sigma_ref):
    sigma = calibrate_noise_multiplier(epsilon, q, steps, delta)
    assert abs(sigma - sigma_ref) / sigma_ref < 0.02
    eps = compute_epsilon(sigma, q, steps, delta)
    assert eps <= epsilon
    assert eps > 0.99 * epsilon  # calibration is tight, not merely safe
    # PLD is tighter than RDP at the same sigma.
    assert compute_epsilon(sigma, q, steps, delta, accountant="pld") <= eps


def test_epsilon_monotone_and_edge_cases():
    e1 = compute_epsilon(2.0, 0.01, 100, 1e-5)
    e2 = compute_epsilon(2.0, 0.01, 200, 1e-5)
    e3 = compute_epsilon(4.0, 0.01, 200, 1e-5)
    assert 0 < e1 < e2 and e3 < e2
    assert compute_epsilon(2.0, 0.01, 0, 1e-5) == 0.0
    assert compute_epsilon(0.0, 0.01, 10, 1e-5) == math.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_epsilon=0.0), "epsilon"),
        (dict(target_epsilon=-1.0), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(q=0.0), "sampling_rate"),
        (dict(q=1.5), "sampling_rate"),
        (dict(steps=0), "steps"),
    ],
)
def test_calibration_rejects_invalid(kwargs, match):
    args = dict(target_epsilon=1.0, q=0.01, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(args["target_epsilon"], args["q"], args["steps"], args["delta"])


GOOD = dict(
    target_epsilon=1.0, delta=1e-5, dataset_size=60000, expected_batch_size=4000,
    steps=4500, clip_norm=1.0, noise_multiplicity=32,
)


@pytest.mark.parametrize(
    "override, exc, match",
    [
        (dict(target_epsilon=0), ValueError, "epsilon"),
        (dict(target_epsilon=-3), ValueError, "epsilon"),
        (dict(target_epsilon=float("inf")), ValueError, "epsilon"),
        (dict(delta=0), ValueError, "delta"),
        (dict(delta=1.2), ValueError, "delta"),
        (dict(delta=1e-4), ValueError, "1/N"),
        (dict(clip_norm=0), ValueError, "clip_norm"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm"),
        (dict(noise_multiplicity=0), ValueError, "noise_multiplicity"),
        (dict(noise_multiplicity=2.5), TypeError, "noise_multiplicity"),
        (dict(steps=0), ValueError, "steps"),
        (dict(expected_batch_size=0), ValueError, "expected_batch_size"),
        (dict(expected_batch_size=70000), ValueError, "expected_batch_size"),
        (dict(dataset_size=0), ValueError, "empty"),
        (dict(target_epsilon="1"), TypeError, "epsilon"),
    ],
)
def test_validate_dp_params(override, exc, match):
    validate_dp_params(**GOOD)
    with pytest.raises(exc, match=match):
        validate_dp_params(**{**GOOD, **override})


def test_large_delta_can_be_allowed_explicitly():
    validate_dp_params(**{**GOOD, "delta": 1e-4}, allow_delta_above_1_over_n=True)


def test_ledger_roundtrip_and_compatibility(tmp_path):
    ledger = PrivacyLedger(dataset_size=60000, sampling_rate=1 / 15, noise_multiplier=2.5,
                           delta=1e-5, clip_norm=1.0, target_epsilon=10.0, planned_steps=4500, steps=123)
    path = str(tmp_path / "ledger.json")
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded == ledger
    assert loaded.epsilon() == compute_epsilon(2.5, 1 / 15, 123, 1e-5)
    assert loaded.epsilon(4500) <= 10.0 + 0.1
    loaded.check_compatible(ledger)
    changed = PrivacyLedger.from_dict({**ledger.to_dict(), "noise_multiplier": 2.0})
    with pytest.raises(ValueError, match="noise_multiplier"):
        ledger.check_compatible(changed)
