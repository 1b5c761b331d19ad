"""Empirical privacy audit of one DP-SGD step: a canary, many repetitions, a lower bound on epsilon.

    from dpdm_jax.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(repetitions=30000))     # the engine's real step
    assert result.eps_lower_bound <= result.eps_claimed
    run_audit(config, release_fn=my_release)                # any other mechanism
    run_audits(config, {"a": fn_a, "b": fn_b})              # several: one compile, same randomness

CLI: python -m dpdm_jax.audit --repetitions 300000 --output audit.json. See docs/privacy.md.
"""
from dpdm_jax.audit.mechanism import (
    CANARY_ID,
    AuditConfig,
    AuditProblem,
    ReleaseFn,
    build_batch,
    engine_release_fn,
    make_problem,
)
from dpdm_jax.audit.run import (
    DEFAULT_STATISTICS,
    AuditResult,
    accountant_epsilons,
    collect_scores,
    projection,
    residual_norm,
    run_audit,
    run_audits,
)

__all__ = [
    "CANARY_ID",
    "DEFAULT_STATISTICS",
    "AuditConfig",
    "AuditProblem",
    "AuditResult",
    "ReleaseFn",
    "accountant_epsilons",
    "build_batch",
    "collect_scores",
    "engine_release_fn",
    "make_problem",
    "projection",
    "residual_norm",
    "run_audit",
    "run_audits",
]
