"""Run the audit: many independent steps, membership scores, a held-out epsilon lower bound."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import dpdm_jax.audit.stats as stats
from dpdm_jax.audit.mechanism import AuditConfig, AuditProblem, ReleaseFn, build_batch, engine_release_fn, make_problem

# A statistic maps (flat released vector r, flat unit canary direction u) to a scalar score.
Statistic = Callable[[jax.Array, jax.Array], jax.Array]


def projection(r: jax.Array, u: jax.Array) -> jax.Array:
    """<r, u>: the canary shifts it by ~C / (q N) when it is in the batch."""
    return jnp.vdot(r, u)


def residual_norm(r: jax.Array, u: jax.Array) -> jax.Array:
    """||r - <r, u> u||: the noise energy away from the canary. Detects a data-dependent
    normaliser or noise scale (e.g. division by the realised batch size)."""
    return jnp.linalg.norm(r - jnp.vdot(r, u) * u)


DEFAULT_STATISTICS: dict[str, Statistic] = {"projection": projection, "residual_norm": residual_norm}


@dataclasses.dataclass
class AuditResult:
    """What one audit measured. epsilon values are at `delta`."""

    eps_lower_bound: float  # held-out, valid with probability >= confidence (0: no evidence)
    eps_claimed: float  # the engine's accountant (RDP) for what ran: one step, canary rate
    eps_pld: float  # the PLD accountant for the same event
    eps_exact: float | None  # exact Gaussian-mechanism epsilon (canary_rate = 1 only)
    eps_ideal: float | None  # what a perfect audit of the CLAIMED Gaussian mechanism would get
    #                          with these held-out sample sizes (canary_rate = 1 only)
    eps_calibration: float  # the selected rule's bound on the calibration split
    eps_max_over_thresholds: float  # held-out, best threshold: overfitted, diagnostic only
    rule: str
    counts: dict
    delta: float
    confidence: float
    noise_multiplier: float
    elapsed_s: float
    config: dict

    @property
    def violation(self) -> bool:
        """True when the audit proves the claim false: eps_lower_bound > eps_claimed."""
        return self.eps_lower_bound > self.eps_claimed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become the strings "inf" / "-inf" / "nan"."""
        d = dataclasses.asdict(self)
        d["violation"] = self.violation
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        ratio = self.eps_lower_bound / self.eps_claimed if self.eps_claimed > 0 else math.nan
        lines = [
            f"empirical epsilon lower bound ({self.confidence:.0%}): {self.eps_lower_bound:.3f}",
            f"accountant epsilon (RDP, claimed):  {self.eps_claimed:.3f}   (ratio {ratio:.2f})",
            f"accountant epsilon (PLD):           {self.eps_pld:.3f}",
        ]
        if self.eps_exact is not None:
            lines.append(f"exact Gaussian epsilon:             {self.eps_exact:.3f}")
        if self.eps_ideal is not None:
            lines.append(f"ideal audit at these sample sizes:  {self.eps_ideal:.3f}")
        lines += [
            f"rule (chosen on calibration split): {self.rule}",
            f"held-out counts: {self.counts}",
            f"delta={self.delta:g}, sigma={self.noise_multiplier:g}, {self.elapsed_s:.1f}s",
            "VIOLATION: lower bound exceeds the claimed epsilon" if self.violation else "ok: no violation",
        ]
        return "\n".join(lines)


def accountant_epsilons(config: AuditConfig) -> tuple[float, float, float | None]:
    """(RDP, PLD, exact) epsilon of what ran: ONE step of the Gaussian mechanism with noise
    multiplier sigma, Poisson-subsampled at the canary's rate (rate 1: no subsampling)."""
    sigma, q, delta = config.noise_multiplier, config.canary_rate, config.delta
    plan = config.plan  # the same plan object the trainer's accountant, sampler and step use
    rdp, pld = plan.epsilon(accountant="rdp"), plan.epsilon(accountant="pld")
    exact = stats.gaussian_epsilon(sigma, delta) if q == 1.0 else None
    return rdp, pld, exact


def collect_scores(
    config: AuditConfig,
    release_fns: Mapping[str, ReleaseFn],
    problem: AuditProblem,
    statistics: Mapping[str, Statistic],
) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """Run every mechanism `config.repetitions` times. Returns (coins, {mechanism: {statistic: scores}}).

    The coin of each repetition (canary in the dataset or not) is a fair coin from the seed;
    every repetition gets fresh keys for sampling, draws and noise. Several mechanisms run in
    one compiled function on the SAME batches and keys (common random numbers; each one's audit
    is valid on its own). A released vector with any non-finite entry scores +inf on every
    statistic (a NaN model is observable).
    """
    reps, block = config.repetitions, config.block_size
    coins = np.random.default_rng([config.seed, 1]).random(reps) < 0.5
    u = ravel_pytree(problem.canary_direction)[0]
    u = u / jnp.linalg.norm(u)
    mechanisms, names = list(release_fns), list(statistics)

    def scores_of(released):
        r = ravel_pytree(released)[0]
        scores = jnp.stack([statistics[n](r, u) for n in names]).astype(jnp.float32)
        finite = jnp.all(jnp.isfinite(r)) & jnp.all(jnp.isfinite(scores))
        return jnp.where(finite, scores, jnp.inf)

    def one(in_world, key):
        k_batch, k_release = jax.random.split(key)
        examples, ids, mask = build_batch(problem, config, in_world, k_batch)
        return jnp.stack([scores_of(release_fns[m](problem.params, examples, ids, mask, k_release))
                          for m in mechanisms])

    root = jax.random.key(config.seed)
    options = {"xla_backend_optimization_level": 0} if config.fast_compile else {}
    run_block = (
        jax.jit(jax.vmap(one))
        .lower(jax.ShapeDtypeStruct((block,), jnp.bool_), jax.random.split(root, block))
        .compile(compiler_options=options)
    )
    out = []
    for b, start in enumerate(range(0, reps, block)):
        keys = jax.random.split(jax.random.fold_in(root, b), block)
        c = np.zeros(block, bool)
        c[: min(block, reps - start)] = coins[start : start + block]
        out.append(np.asarray(run_block(jnp.asarray(c), keys)))
    scores = np.concatenate(out)[:reps]  # (reps, mechanisms, statistics)
    return coins, {m: {n: scores[:, i, j].astype(np.float64) for j, n in enumerate(names)}
                   for i, m in enumerate(mechanisms)}


def _analyse(config: AuditConfig, coins: np.ndarray, scores: Mapping[str, np.ndarray], elapsed_s: float) -> AuditResult:
    """Choose the rule on the calibration split; bound epsilon with it on the held-out split."""
    alpha, delta = 1.0 - config.confidence, config.delta
    n_cal = int(round(config.calibration_fraction * config.repetitions))
    cal = np.arange(config.repetitions) < n_cal
    split = lambda sel: ({n: s[sel & coins] for n, s in scores.items()}, {n: s[sel & ~coins] for n, s in scores.items()})
    cal_in, cal_out = split(cal)
    ev_in, ev_out = split(~cal)
    rule, eps_cal = stats.select_rule(cal_in, cal_out, delta, alpha)
    eps_lb, counts = stats.evaluate_rule(rule, ev_in, ev_out, delta, alpha)
    eps_max = stats.max_over_thresholds(ev_in, ev_out, delta, alpha)

    rdp, pld, exact = accountant_epsilons(config)
    ideal = None
    if config.canary_rate == 1.0 and config.noise_multiplier > 0:
        ideal = stats.ideal_gaussian_bound(1.0 / config.noise_multiplier, counts["in_total"], counts["out_total"],
                                           delta, alpha)
    return AuditResult(
        eps_lower_bound=max(eps_lb, 0.0),
        eps_claimed=rdp,
        eps_pld=pld,
        eps_exact=exact,
        eps_ideal=ideal,
        eps_calibration=max(eps_cal, 0.0),
        eps_max_over_thresholds=max(eps_max, 0.0),
        rule=rule.describe(),
        counts=counts,
        delta=delta,
        confidence=config.confidence,
        noise_multiplier=config.noise_multiplier,
        elapsed_s=elapsed_s,
        config=dataclasses.asdict(config),
    )


def run_audits(
    config: AuditConfig,
    release_fns: Mapping[str, ReleaseFn],
    problem: AuditProblem | None = None,
    statistics: Mapping[str, Statistic] | None = None,
) -> dict[str, AuditResult]:
    """Audit several mechanisms at once (one compilation, common random numbers).

    `config` fixes the worlds, the repetitions and the claim (sigma, delta, canary rate); a
    release_fn may close over other settings (e.g. its own clip norm). Returns {name: result}.
    """
    t0 = time.perf_counter()
    problem = problem if problem is not None else make_problem(config)
    statistics = dict(statistics if statistics is not None else DEFAULT_STATISTICS)
    coins, scores = collect_scores(config, release_fns, problem, statistics)
    elapsed = time.perf_counter() - t0
    return {m: _analyse(config, coins, s, elapsed) for m, s in scores.items()}


def run_audit(
    config: AuditConfig = AuditConfig(),
    release_fn: ReleaseFn | None = None,
    problem: AuditProblem | None = None,
    statistics: Mapping[str, Statistic] | None = None,
) -> AuditResult:
    """Audit one step of `release_fn` (default: the engine's) against the accountant.

    1. `config.repetitions` steps, each with a fair coin: canary in the dataset or not.
    2. Scores of every statistic (default: projection on the canary direction, residual norm).
    3. On the first `calibration_fraction` of the repetitions: choose the statistic, threshold,
       event and ordering with the largest bound.
    4. On the rest (held out): that single rule's Clopper-Pearson bound at `confidence`.
    """
    problem = problem if problem is not None else make_problem(config)
    release_fn = release_fn if release_fn is not None else engine_release_fn(problem, config)
    return run_audits(config, {"release": release_fn}, problem, statistics)["release"]
