"""Statistics of the privacy audit: Clopper-Pearson bounds and empirical epsilon lower bounds.

If a mechanism M is (epsilon, delta)-DP, then for neighbouring datasets D, D' and ANY event E
of the output, P[M(D) in E] <= e^epsilon P[M(D') in E] + delta, and the same with D and D'
swapped. So for an event E,

    epsilon >= log((P_a(E) - delta) / P_b(E))        for (a, b) = (in, out) and (out, in),

where "in" is the world with the canary and "out" the world without it. The audit estimates
P_a(E) and P_b(E) from repetitions: a one-sided Clopper-Pearson LOWER bound for P_a(E) and an
UPPER bound for P_b(E), each at level 1 - alpha/2, give a lower bound on epsilon that holds with
probability >= 1 - alpha (union bound). The event E = {score >= t} or {score < t} is chosen on a
calibration split and evaluated once on a held-out split, so the threshold is not overfitted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
from scipy import optimize
from scipy import stats as sstats

# The four ways one threshold gives a bound: the event (score >= t or score < t) and which world
# plays a (the numerator). Named so a reader of the JSON knows what was tested.
EVENTS = ("ge", "lt")
ORDERINGS = ("in_over_out", "out_over_in")


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion k/n."""
    k = np.asarray(k, np.float64)
    n = np.broadcast_to(np.asarray(n, np.float64), k.shape)
    safe_k = np.where(k > 0, k, 1.0)
    lo = sstats.beta.ppf(alpha, safe_k, n - safe_k + 1.0)
    return np.where(k > 0, lo, 0.0)


def clopper_pearson_upper(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) upper confidence bound on a binomial proportion k/n."""
    k = np.asarray(k, np.float64)
    n = np.broadcast_to(np.asarray(n, np.float64), k.shape)
    safe_k = np.where(k < n, k, n - 1.0)
    hi = sstats.beta.ppf(1.0 - alpha, safe_k + 1.0, n - safe_k)
    return np.where(k < n, hi, 1.0)


def epsilon_from_counts(k_a, n_a, k_b, n_b, delta: float, alpha: float) -> np.ndarray:
    """Lower bound on epsilon, valid with probability >= 1 - alpha, from event counts.

    k_a of n_a trials of world a and k_b of n_b of world b fell in the event. Returns
    log((CP_lower(k_a/n_a) - delta) / CP_upper(k_b/n_b)), or -inf when the numerator is <= 0.
    """
    lo = clopper_pearson_lower(k_a, n_a, alpha / 2.0)
    hi = clopper_pearson_upper(k_b, n_b, alpha / 2.0)
    num = lo - delta
    with np.errstate(divide="ignore"):
        return np.where(num > 0, np.log(np.maximum(num, 1e-300) / hi), -np.inf)


def _counts(sorted_in: np.ndarray, sorted_out: np.ndarray, thresholds: np.ndarray):
    """Counts of score >= t and score < t in each world, for every threshold."""
    lt_in = np.searchsorted(sorted_in, thresholds, side="left")
    lt_out = np.searchsorted(sorted_out, thresholds, side="left")
    return {
        "ge": (len(sorted_in) - lt_in, len(sorted_out) - lt_out),
        "lt": (lt_in, lt_out),
    }


def _bounds_all(scores_in, scores_out, thresholds, delta, alpha):
    """epsilon bound for every (event, ordering, threshold): dict (event, ordering) -> array."""
    s_in, s_out = np.sort(scores_in), np.sort(scores_out)
    n_in, n_out = len(s_in), len(s_out)
    out = {}
    for event, (c_in, c_out) in _counts(s_in, s_out, thresholds).items():
        out[(event, "in_over_out")] = epsilon_from_counts(c_in, n_in, c_out, n_out, delta, alpha)
        out[(event, "out_over_in")] = epsilon_from_counts(c_out, n_out, c_in, n_in, delta, alpha)
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    """A membership test: event (score >= t or < t) of one statistic, and the ordering tested."""

    statistic: str
    threshold: float
    event: str  # "ge" or "lt"
    ordering: str  # "in_over_out": bound log((P_in(E) - delta) / P_out(E)); or the reverse

    def describe(self) -> str:
        op = ">=" if self.event == "ge" else "<"
        a, b = ("in", "out") if self.ordering == "in_over_out" else ("out", "in")
        return f"E = {{{self.statistic} {op} {self.threshold:.6g}}}: log((P_{a}(E) - delta) / P_{b}(E))"


def _candidate_thresholds(scores: np.ndarray, tail: int = 1000, middle: int = 1000) -> np.ndarray:
    """Every value among the `tail` smallest and largest scores (where the best events of a
    tight audit lie), and `middle` quantiles in between."""
    values = np.unique(scores)
    if len(values) <= 2 * tail + middle:
        return values
    finite = values[np.isfinite(values)]
    qs = np.quantile(finite, np.linspace(0.0, 1.0, middle)) if len(finite) else np.empty(0)
    return np.unique(np.concatenate([values[:tail], values[-tail:], qs]))


def select_rule(
    scores_in: Mapping[str, np.ndarray],
    scores_out: Mapping[str, np.ndarray],
    delta: float,
    alpha: float,
) -> tuple[Rule, float]:
    """The rule with the largest epsilon bound on these (calibration) scores, and that bound."""
    best_rule, best = None, -math.inf
    for name in scores_in:
        thresholds = _candidate_thresholds(np.concatenate([scores_in[name], scores_out[name]]))
        for (event, ordering), eps in _bounds_all(scores_in[name], scores_out[name], thresholds, delta, alpha).items():
            i = int(np.argmax(eps))
            if eps[i] > best:
                best, best_rule = float(eps[i]), Rule(name, float(thresholds[i]), event, ordering)
    if best_rule is None:  # nothing beat -inf: any rule (it will give 0 on the held-out split)
        name = next(iter(scores_in))
        best_rule = Rule(name, float(np.median(scores_in[name])), "ge", "in_over_out")
    return best_rule, best


def evaluate_rule(rule: Rule, scores_in: Mapping[str, np.ndarray], scores_out: Mapping[str, np.ndarray],
                  delta: float, alpha: float) -> tuple[float, dict]:
    """epsilon lower bound of ONE fixed rule on (held-out) scores, and the counts behind it."""
    s_in, s_out = np.sort(scores_in[rule.statistic]), np.sort(scores_out[rule.statistic])
    c_in, c_out = _counts(s_in, s_out, np.array([rule.threshold]))[rule.event]
    k_in, k_out = int(c_in[0]), int(c_out[0])
    n_in, n_out = len(s_in), len(s_out)
    if rule.ordering == "in_over_out":
        eps = epsilon_from_counts(k_in, n_in, k_out, n_out, delta, alpha)
    else:
        eps = epsilon_from_counts(k_out, n_out, k_in, n_in, delta, alpha)
    counts = {"in_event": k_in, "in_total": n_in, "out_event": k_out, "out_total": n_out}
    return float(eps), counts


def max_over_thresholds(scores_in, scores_out, delta, alpha) -> float:
    """Max of the bound over all rules on the SAME scores. Overfits the threshold: a diagnostic
    only, not a valid (1 - alpha) bound."""
    return select_rule(scores_in, scores_out, delta, alpha)[1]


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018)."""
    a = sstats.norm.cdf(-epsilon / mu + mu / 2.0)
    b = math.exp(epsilon + sstats.norm.logcdf(-epsilon / mu - mu / 2.0))
    return float(a - b)


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact (tightest) epsilon of ONE Gaussian mechanism with noise multiplier sigma at delta."""
    if noise_multiplier <= 0:
        return math.inf
    mu = 1.0 / noise_multiplier
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-10))


def ideal_gaussian_bound(mu: float, n_in: int, n_out: int, delta: float, alpha: float) -> float:
    """What a perfect audit of an exactly Gaussian mechanism (shift mu in units of the noise std)
    would report with n_in / n_out held-out repetitions: the best threshold, expected counts.

    A yardstick for the audit's tightness: no score or threshold can do much better with this
    many repetitions, whatever the true epsilon.
    """
    if mu == 0:
        return 0.0
    t = np.linspace(-4.0, mu + 8.0, 4001)
    k_in = np.round(n_in * sstats.norm.sf(t - mu))
    k_out = np.round(n_out * sstats.norm.sf(t))
    eps = epsilon_from_counts(k_in, n_in, k_out, n_out, delta, alpha)
    return float(max(np.max(eps), 0.0))
