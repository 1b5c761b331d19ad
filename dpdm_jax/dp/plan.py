"""One DP plan: what the accountant is told, and the sampler, step and ledger built from it.

    N, q, T, sigma, delta, C, accountant   (public; q*N derived once, here)
    plan.sampler(...)  -> Poisson batches    plan.step(...) -> clipped sum + N(0, sigma^2 C^2) / (q N)
    plan.ledger(...)   -> epsilon after the steps done

Every field is public. The run's secret seed or key is never a field: it is passed to the
sampler and the step at the call, so no repr or log of these objects can print it.
`private=False` is the non-private baseline (no clipping, no noise): its ledger and every
output built from it say NO PRIVACY.
"""
from __future__ import annotations

import dataclasses
import math

from dpdm_jax.dp.accounting import ACCOUNTANTS, PrivacyLedger, compute_epsilon
from dpdm_jax.dp.sampling import PoissonSampler, expected_batch_size
from dpdm_jax.dp.step import DPSGDStep
from dpdm_jax.validation import require_choice


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """The public parameters of a DP-SGD run.

    Attributes:
      dataset_size: N.
      sampling_rate: q in (0, 1].
      num_steps: T, the planned logical steps.
      noise_multiplier: sigma (0 for the non-private baseline).
      delta: the delta epsilon is reported at.
      clip_norm: C (None: no clipping, the non-private baseline only).
      accountant: 'rdp' or 'pld'.
      target_epsilon: the epsilon the plan must not exceed over T steps (None if non-private).
      private: False for the non-private baseline (no clipping, no noise, NO guarantee).
    """

    dataset_size: int
    sampling_rate: float
    num_steps: int
    noise_multiplier: float
    delta: float
    clip_norm: float | None
    accountant: str = "rdp"
    target_epsilon: float | None = None
    private: bool = True

    def __post_init__(self):
        require_choice("accountant", self.accountant, ACCOUNTANTS)
        if self.private and (self.clip_norm is None or not self.clip_norm > 0):
            raise ValueError(f"a private plan needs clip_norm > 0, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")

    @property
    def expected_batch_size(self) -> float:
        """q * N: the public normaliser of the noisy gradient sum (never the realised size)."""
        return expected_batch_size(self.sampling_rate, self.dataset_size)

    @property
    def step_clip_norm(self) -> float:
        """C as the step applies it (inf: no clipping, non-private baseline)."""
        return math.inf if self.clip_norm is None else float(self.clip_norm)

    def epsilon(self, steps: int | None = None, accountant: str | None = None) -> float:
        """Epsilon after `steps` (default T) steps; inf for the non-private baseline."""
        if not self.private:
            return math.inf
        return compute_epsilon(self.noise_multiplier, self.sampling_rate,
                               self.num_steps if steps is None else steps, self.delta,
                               accountant or self.accountant)

    def check_within_target(self) -> None:
        """Refuse a private plan whose T steps would spend more than the target epsilon."""
        if not self.private or self.target_epsilon is None:
            return
        planned = self.epsilon()
        if planned > self.target_epsilon * (1 + 1e-9):
            raise ValueError(
                f"dp.noise_multiplier={self.noise_multiplier:g} spends epsilon={planned:.4g} over the planned "
                f"{self.num_steps} steps, more than the target dp.epsilon={self.target_epsilon:g}: raise "
                "dp.noise_multiplier, lower dp.epochs, or set dp.noise_multiplier=-1 to calibrate it "
                "(dp.enabled=False trains without any guarantee).")

    def sampler(self, chunk_size: int, num_devices: int = 1) -> PoissonSampler:
        """The Poisson sampler at rate q over N examples; the seed is passed to its methods."""
        return PoissonSampler(self.dataset_size, self.sampling_rate, chunk_size, num_devices=num_devices)

    def step(self, loss_fn, optimizer, **kwargs):
        """The DP-SGD step (clip at C, noise sigma*C once, / q*N); kwargs go to DPSGDStep."""
        return DPSGDStep(loss_fn, optimizer, clip_norm=self.step_clip_norm,
                         noise_multiplier=self.noise_multiplier if self.private else 0.0,
                         expected_batch_size=self.expected_batch_size, **kwargs)

    def ledger(self, seed_secret: bool, steps: int = 0) -> PrivacyLedger:
        """The ledger of a run of this plan (`seed_secret`: whether the run seed is secret)."""
        return PrivacyLedger(
            dataset_size=self.dataset_size, sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier, delta=self.delta, clip_norm=self.clip_norm,
            accountant=self.accountant, target_epsilon=self.target_epsilon, planned_steps=self.num_steps,
            steps=steps, seed_secret=seed_secret, private=self.private)
