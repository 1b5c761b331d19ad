"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD with Google's dp-accounting.

The mechanism of one logical step is the Poisson-subsampled Gaussian mechanism with noise
multiplier sigma (noise std / clip norm) and sampling rate q; a run composes it T times.
RDP is the paper's accountant (default); PLD is tighter and optional.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

from dpdm_jax.dp.sampling import expected_batch_size
from dpdm_jax.dp.validation import validate_accounting_params

ACCOUNTANTS = ("rdp", "pld")

# What every output of a run without a guarantee says (log, ledger, metrics, report, manifests).
NO_PRIVACY = "NO PRIVACY: dp.enabled=False (non-private baseline: no clipping, no noise)"
NO_GUARANTEE_PUBLIC_SEED = ("NO guarantee: the seed is public (a fixed config.seed lets anyone regenerate "
                            "the batches and the noise)")

# Opacus' RDP orders (the reference table in method.md was computed with them).
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

# PLD discretisation: 1e-4 keeps epsilon within ~1e-3 of the exact value at our step counts.
_PLD_VALUE_DISCRETIZATION = 1e-4


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of `steps` logical DP-SGD steps."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )


def _fresh_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS))
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=_PLD_VALUE_DISCRETIZATION)
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon spent after `steps` steps at (noise_multiplier, sampling_rate), for `delta`.

    Zero steps spend zero epsilon; noise_multiplier = 0 (no noise) spends infinite epsilon.
    """
    validate_accounting_params(sampling_rate=sampling_rate, delta=delta, steps=steps, allow_zero_steps=True)
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _fresh_accountant(accountant)
    acc.compose(dp_sgd_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier sigma whose epsilon after `steps` steps is <= target_epsilon.

    The returned sigma is rounded UP to `tol`, so compute_epsilon(sigma, ...) <= target_epsilon.
    """
    validate_accounting_params(
        target_epsilon=target_epsilon, sampling_rate=sampling_rate, delta=delta, steps=steps
    )
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh_accountant(accountant),
        lambda s: dp_sgd_event(s, sampling_rate, steps),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
        tol=tol,
    )
    # calibrate_dp_mechanism returns the upper end of its final bracket; check, never assume.
    sigma = float(sigma)
    while compute_epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:
        sigma += tol
    return sigma


@dataclasses.dataclass
class PrivacyLedger:
    """What the accountant was told, and how many logical steps have actually run.

    Saved with every checkpoint. `steps` is incremented BEFORE a step's parameters can be
    saved, so the ledger never counts fewer steps than the saved model has taken.

    The epsilon is a guarantee only if the run seed is secret (`seed_secret`) and the run is
    private (`private`; False is the non-private baseline): `guarantee()` says which.
    """

    dataset_size: int
    sampling_rate: float
    noise_multiplier: float
    delta: float
    clip_norm: float | None
    accountant: str = "rdp"
    target_epsilon: float | None = None
    planned_steps: int | None = None
    steps: int = 0
    seed_secret: bool = True
    private: bool = True

    @property
    def has_guarantee(self) -> bool:
        return self.private and self.seed_secret

    def guarantee(self) -> str:
        """'(epsilon, delta)-DP ...', or why there is NO guarantee."""
        if not self.private:
            return NO_PRIVACY
        if not self.seed_secret:
            return NO_GUARANTEE_PUBLIC_SEED
        return f"({self.epsilon():.4g}, {self.delta:g})-DP ({self.accountant.upper()}) after {self.steps} steps"

    def epsilon(self, steps: int | None = None, accountant: str | None = None) -> float:
        """Epsilon spent after `steps` (default: the steps done so far); inf if not private."""
        if not self.private:
            return math.inf
        return compute_epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            self.steps if steps is None else steps,
            self.delta,
            accountant or self.accountant,
        )

    @property
    def expected_batch_size(self) -> float:
        """q * N: the public normaliser of the noisy gradient sum."""
        return expected_batch_size(self.sampling_rate, self.dataset_size)

    def privacy_parameters(self) -> dict[str, Any]:
        """The fields a resumed run must not change."""
        return {
            k: getattr(self, k)
            for k in ("dataset_size", "sampling_rate", "noise_multiplier", "delta", "clip_norm", "accountant",
                      "private")
        }

    def check_compatible(self, other: "PrivacyLedger") -> None:
        """Raise if `other` (a new run's ledger) changes any privacy parameter of this one."""
        mine, theirs = self.privacy_parameters(), other.privacy_parameters()
        changed = {
            k: (mine[k], theirs[k])
            for k in mine
            if not (mine[k] == theirs[k] or (isinstance(mine[k], float) and isinstance(theirs[k], float) and math.isclose(mine[k], theirs[k], rel_tol=1e-9)))
        }
        if changed:
            details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                "Refusing to resume: the config changes privacy parameters of the checkpointed run "
                f"({details}). The guarantee of the saved model depends on them; start a new workdir."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the `guarantee` sentence (for readers of the file; ignored on load)."""
        return {**dataclasses.asdict(self), "guarantee": self.guarantee()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save(self, path: str) -> None:
        """Atomically write the ledger as JSON."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "PrivacyLedger":
        with open(path) as f:
            return cls.from_dict(json.load(f))
