"""Empirical privacy audit of one DP-SGD step (dpdm_jax.audit).

The engine's real step must pass (empirical epsilon lower bound <= the accountant's epsilon), and
every deliberately broken variant below (defined HERE, never in the library) must be caught
(lower bound > the epsilon the accountant claims for the same sigma). Each assertion compares
numbers computed in the test; nothing is hard-coded but the audit's configuration.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sstats

from dpdm_jax.audit import AuditConfig, build_batch, engine_release_fn, make_problem, run_audit, run_audits
from dpdm_jax.audit import stats as audit_stats
from dpdm_jax.audit import accountant_epsilons
from dpdm_jax.audit.__main__ import config_from_args, main as audit_main, parse_args
from dpdm_jax.dp import DPSGDStep, compute_epsilon, data_mesh
from dpdm_jax.dp.clipping import clipped_grad_sum
from dpdm_jax.dp.noise import privatise_gradient_sum
from dpdm_jax.dp.step import step_keys

# sigma = 1.2: one Gaussian step spends epsilon ~3.5 (exact) / 3.8 (RDP) at delta = 1e-5.
CONFIG = AuditConfig(repetitions=24000, seed=0)
PROBLEM = make_problem(CONFIG)


def _report(name, result):
    print(f"\n[{name}] eps_lb={result.eps_lower_bound:.3f} claimed(RDP)={result.eps_claimed:.3f} "
          f"exact={result.eps_exact} ideal={result.eps_ideal} rule: {result.rule} counts={result.counts} "
          f"({result.elapsed_s:.1f}s)")


def _assert_caught(name, result):
    _report(name, result)
    assert result.eps_lower_bound > result.eps_claimed, (name, result.eps_lower_bound, result.eps_claimed)
    assert result.violation


# --------------------------------------------------------------------------------------------
# The real step.


def test_real_step_passes_and_audit_is_tight(tmp_path):
    """Through the CLI (python -m dpdm_jax.audit), with CONFIG's settings; the JSON carries the numbers."""
    out = tmp_path / "audit.json"
    rc = audit_main(["--repetitions", str(CONFIG.repetitions), "--sigma", str(CONFIG.noise_multiplier),
                     "--seed", str(CONFIG.seed), "--output", str(out)])
    result = json.loads(out.read_text())
    print("\n[real step]", {k: v for k, v in result.items() if k != "config"})
    assert result["config"] == dataclasses.asdict(CONFIG)
    assert rc == 0 and result["violation"] is False
    assert result["eps_lower_bound"] <= result["eps_claimed"]
    # Also below the exact epsilon of the Gaussian mechanism (the tightest valid claim).
    assert result["eps_lower_bound"] <= result["eps_exact"] <= result["eps_pld"] + 1e-3
    assert result["eps_pld"] <= result["eps_claimed"]
    # The audit has power: it gets most of what a perfect audit could with this many repetitions.
    # (eps_lower_bound / eps_ideal over seeds 0-5 was 0.74-1.09: 0.6 leaves room for the noise draw.)
    assert result["eps_lower_bound"] >= 0.6 * result["eps_ideal"] > 0


def test_cli_calibrates_sigma_from_target_epsilon():
    config = config_from_args(parse_args(["--target_epsilon", "3.0", "--repetitions", "5000"]))
    rdp, pld, exact = accountant_epsilons(config)
    assert rdp <= 3.0 < compute_epsilon(config.noise_multiplier - 1e-3, 1.0, 1, config.delta)
    assert exact <= pld + 1e-3 and pld <= rdp and config.repetitions == 5000
    assert parse_args([]).repetitions >= 100_000


def test_audited_release_is_exactly_what_dpsgd_step_computes():
    """The default release_fn is the gradient DPSGDStep feeds its optimiser (8 devices, shard_map):
    with SGD at learning rate 1, params_before - params_after is the released gradient."""
    release = jax.jit(engine_release_fn(PROBLEM, CONFIG))
    mesh = data_mesh(jax.devices()[:8])
    assert CONFIG.batch_rows % 8 == 0
    step = DPSGDStep(PROBLEM.loss_fn, optax.sgd(1.0), clip_norm=CONFIG.clip_norm,
                     noise_multiplier=CONFIG.noise_multiplier,
                     expected_batch_size=CONFIG.expected_batch_size, mesh=mesh)
    for in_world, seed in [(True, 3), (False, 4)]:
        key = jax.random.key(seed)
        examples, ids, mask = build_batch(PROBLEM, CONFIG, jnp.asarray(in_world), jax.random.key(seed + 100))
        assert int(mask.sum()) == CONFIG.num_others + int(in_world)
        state = step.init(PROBLEM.params)
        new_state, _ = step(state, [jax.device_get((examples, ids, mask))], key, 0)
        expected = jax.tree.map(lambda a, b: a - b, PROBLEM.params, jax.device_get(new_state.params))
        got = release(PROBLEM.params, examples, ids, mask, key)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_canary_is_what_the_audit_assumes():
    """The canary's clipped gradient has norm C along the audited direction; others' are orthogonal;
    padding rows copy dataset row 0 (the canary in the 'in' world) and are masked."""
    u = PROBLEM.canary_direction
    key = jax.random.key(0)
    one = jax.jit(lambda ex: clipped_grad_sum(PROBLEM.loss_fn, PROBLEM.params, jax.tree.map(lambda a: a[None], ex),
                                      jnp.array([0]), jnp.array([True]), key, CONFIG.clip_norm)[0])
    g = one(PROBLEM.canary)
    dot = lambda a, b: sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert dot(g, u) == pytest.approx(CONFIG.clip_norm, rel=1e-5)
    for i in range(CONFIG.num_others):
        assert abs(dot(one(jax.tree.map(lambda a: a[i], PROBLEM.others)), u)) < 1e-6
    examples, ids, mask = build_batch(PROBLEM, CONFIG, jnp.asarray(True), key)
    assert bool(mask[0]) and not bool(mask[-1]) and int(ids[-1]) == 0
    np.testing.assert_array_equal(examples["x"][-1], PROBLEM.canary["x"])


def test_epsilon_bounds_on_synthetic_gaussian_scores():
    """The estimator alone: on N(0,1) vs N(mu,1) scores it stays below the exact epsilon and near
    the ideal; on separated scores it is large; on identical distributions it is ~0."""
    rng = np.random.default_rng(0)
    delta, alpha, n = 1e-5, 0.05, 20000
    mu = 1.0
    cal_in, cal_out = rng.normal(mu, 1, n), rng.normal(0, 1, n)
    ev_in, ev_out = rng.normal(mu, 1, n), rng.normal(0, 1, n)
    rule, _ = audit_stats.select_rule({"s": cal_in}, {"s": cal_out}, delta, alpha)
    eps, _ = audit_stats.evaluate_rule(rule, {"s": ev_in}, {"s": ev_out}, delta, alpha)
    exact = audit_stats.gaussian_epsilon(1.0 / mu, delta)
    ideal = audit_stats.ideal_gaussian_bound(mu, n, n, delta, alpha)
    assert 0.8 * ideal <= eps <= exact
    same, _ = audit_stats.evaluate_rule(rule, {"s": ev_out}, {"s": rng.normal(0, 1, n)}, delta, alpha)
    assert same < 0.2
    apart, _ = audit_stats.evaluate_rule(audit_stats.Rule("s", 5.0, "ge", "in_over_out"),
                                         {"s": ev_in + 10}, {"s": ev_out}, delta, alpha)
    # Zero of n out-world scores in the event: the bound is log((1 - ...)/CP_upper(0/n)).
    assert apart == pytest.approx(np.log((audit_stats.clopper_pearson_lower(n, n, alpha / 2) - delta)
                                         / (1 - (alpha / 2) ** (1 / n))), rel=1e-6)
    # Clopper-Pearson: the exact binomial tail at the bound is alpha.
    lo = audit_stats.clopper_pearson_lower(30, 1000, 0.025)
    assert sstats.binom.sf(29, 1000, lo) == pytest.approx(0.025, rel=1e-4)
    # The exact Gaussian epsilon agrees with dp_accounting's PLD (to its discretisation).
    rdp, pld, exact_cfg = accountant_epsilons(CONFIG)
    assert exact_cfg == pytest.approx(pld, abs=5e-3) and exact_cfg <= rdp


# --------------------------------------------------------------------------------------------
# Broken variants: each a release_fn(params, examples, example_ids, mask, key), as a buggy
# implementation would compute it. The accountant is still told sigma = CONFIG.noise_multiplier.


def _engine_sum(problem, config, params, examples, ids, mask, key, clip_norm=None, loss_fn=None):
    grad_key, noise_key = step_keys(key, 0)
    grad_sum, _ = clipped_grad_sum(loss_fn or problem.loss_fn, params, examples, ids, mask, grad_key,
                                   config.clip_norm if clip_norm is None else clip_norm)
    return grad_sum, noise_key


def release_without_noise(problem, config):
    """(a) The noise is never added."""
    def release(params, examples, ids, mask, key):
        grad_sum, _ = _engine_sum(problem, config, params, examples, ids, mask, key)
        return jax.tree.map(lambda g: g / config.expected_batch_size, grad_sum)
    return release


def release_without_clipping(problem, config):
    """(b) Per-example gradients are not clipped (C = inf in the sum), noise still sigma * C."""
    def release(params, examples, ids, mask, key):
        grad_sum, noise_key = _engine_sum(problem, config, params, examples, ids, mask, key, clip_norm=jnp.inf)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      config.expected_batch_size)
    return release


def release_realised_normaliser(problem, config):
    """(c) Divides by the realised batch size, not the public q N: the noise level then reveals
    the batch size, hence whether the canary is in it."""
    def release(params, examples, ids, mask, key):
        grad_sum, noise_key = _engine_sum(problem, config, params, examples, ids, mask, key)
        realised = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm, realised)
    return release


def release_per_draw_clipping(problem, config):
    """(d) The K noise draws are separate examples: each draw's gradient is clipped and the B*K
    clipped gradients summed (normalised by K q N), so one example moves the sum by up to K*C."""
    k = config.noise_multiplicity

    def release(params, examples, ids, mask, key):
        rows = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), examples)
        draw_ids = (jnp.repeat(ids, k) * k + jnp.tile(jnp.arange(k), ids.shape[0])).astype(jnp.int32)
        grad_sum, noise_key = _engine_sum(problem, config, params, rows, draw_ids, jnp.repeat(mask, k), key,
                                          loss_fn=problem.draw_loss_fn)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      k * config.expected_batch_size)
    return release


def release_noise_without_clip_norm(problem, config):
    """(e1) Noise std sigma instead of sigma * C (only visible when C != 1)."""
    def release(params, examples, ids, mask, key):
        grad_sum, noise_key = _engine_sum(problem, config, params, examples, ids, mask, key)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, 1.0, config.expected_batch_size)
    return release


def release_per_device_noise(problem, config, num_devices=8):
    """(e2) Each device draws its own noise (key folded with the device index) and the replicas'
    updates are averaged (pmean): n independent noisy copies of one sum, noise std sigma*C/sqrt(n)."""
    def release(params, examples, ids, mask, key):
        grad_sum, noise_key = _engine_sum(problem, config, params, examples, ids, mask, key)
        replicas = jax.vmap(lambda d: privatise_gradient_sum(
            grad_sum, jax.random.fold_in(noise_key, d), config.noise_multiplier, config.clip_norm,
            config.expected_batch_size))(jnp.arange(num_devices))
        return jax.tree.map(lambda r: r.mean(0), replicas)
    return release


def release_mask_ignored(problem, config):
    """(f1) The padding mask is ignored: padding rows, which copy dataset row 0 (the canary when
    present), are counted as examples."""
    def release(params, examples, ids, mask, key):
        grad_sum, noise_key = _engine_sum(problem, config, params, examples, ids, jnp.ones_like(mask), key)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      config.expected_batch_size)
    return release


def _per_example_grads(problem, params, examples, ids, grad_key):
    keys = jax.vmap(lambda i: jax.random.fold_in(grad_key, i))(ids)
    return jax.vmap(jax.grad(problem.loss_fn), in_axes=(None, 0, 0))(params, examples, keys)


def release_nan_not_zeroed(problem, config):
    """(f2) Clipping zeroes rows by multiplying by the mask: 0 * NaN = NaN, so one non-finite
    gradient (or a NaN padding copy of it) turns the whole update into NaN."""
    def release(params, examples, ids, mask, key):
        grad_key, noise_key = step_keys(key, 0)
        grads = _per_example_grads(problem, params, examples, ids, grad_key)
        norms = jax.vmap(optax.global_norm)(grads)
        scale = jnp.minimum(1.0, config.clip_norm / norms) * mask
        grad_sum = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1), grads)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      config.expected_batch_size)
    return release


def release_per_layer_clipping(problem, config):
    """(f3) Each parameter leaf clipped to C separately: with L leaves the sensitivity is sqrt(L)*C."""
    def release(params, examples, ids, mask, key):
        grad_key, noise_key = step_keys(key, 0)
        grads = _per_example_grads(problem, params, examples, ids, grad_key)

        def clip_leaf(g):
            norms = jnp.linalg.norm(g.reshape(g.shape[0], -1), axis=1)
            scale = jnp.where(mask, jnp.minimum(1.0, config.clip_norm / jnp.maximum(norms, 1e-12)), 0.0)
            return jnp.tensordot(scale, g, axes=1)

        grad_sum = jax.tree.map(clip_leaf, grads)
        return privatise_gradient_sum(grad_sum, noise_key, config.noise_multiplier, config.clip_norm,
                                      config.expected_batch_size)
    return release


# Broken variants are caught with fewer repetitions than the real step needs for tightness.
BROKEN = dataclasses.replace(CONFIG, repetitions=12000, seed=1)


VARIANTS = {
    "a_no_noise": release_without_noise,
    "b_no_clipping": release_without_clipping,
    "c_realised_batch_normaliser": release_realised_normaliser,
    "d_per_draw_clipping": release_per_draw_clipping,
    "e1_noise_sigma_not_sigma_c": release_noise_without_clip_norm,
    "e2_per_device_noise_averaged": release_per_device_noise,
    "f1_padding_mask_ignored": release_mask_ignored,
    "f3_per_layer_clipping": release_per_layer_clipping,
}
# Variant-specific settings the release_fn closes over (the claim stays sigma = 1.2 throughout).
VARIANT_CONFIG = {"e1_noise_sigma_not_sigma_c": {"clip_norm": 4.0}}


@pytest.fixture(scope="module")
def broken_results():
    """All variants and the engine (as a control) in ONE compiled audit, on the same randomness."""
    problem = make_problem(BROKEN)
    fns = {name: make(problem, dataclasses.replace(BROKEN, **VARIANT_CONFIG.get(name, {})))
           for name, make in VARIANTS.items()}
    fns["engine"] = engine_release_fn(problem, BROKEN)
    return run_audits(BROKEN, fns, problem)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_broken_variant_is_caught(name, broken_results):
    _assert_caught(name, broken_results[name])


def test_engine_passes_on_the_same_randomness(broken_results):
    result = broken_results["engine"]
    _report("engine (control)", result)
    assert not result.violation and 0 < result.eps_lower_bound <= result.eps_exact


def test_nan_canary_zeroed_by_engine_but_not_by_multiplying_by_mask():
    """(f2) A canary whose gradient is NaN: the engine drops it (the two worlds are then identical:
    no evidence, eps_lb ~ 0); the multiply-by-mask bug releases NaN exactly when it is present."""
    config = BROKEN
    problem = make_problem(config)
    problem = problem._replace(canary={"x": jnp.full_like(problem.canary["x"], jnp.nan), "y": problem.canary["y"]})
    results = run_audits(config, {"engine": engine_release_fn(problem, config),
                                  "f2_nan_not_zeroed": release_nan_not_zeroed(problem, config)}, problem)
    _report("f2 engine, NaN canary", results["engine"])
    assert not results["engine"].violation and results["engine"].eps_lower_bound < 0.5
    _assert_caught("f2_nan_not_zeroed", results["f2_nan_not_zeroed"])


@pytest.mark.slow
def test_big_audit_real_step():
    """300k repetitions (about 2 min on 2 CPU cores): tighter bound, still below the claim; and the
    Poisson-subsampled canary (rate 0.5) against the subsampled accountant."""
    result = run_audit(dataclasses.replace(CONFIG, repetitions=300_000, fast_compile=False))
    _report("real step, 300k", result)
    assert result.eps_lower_bound <= result.eps_exact <= result.eps_claimed
    assert result.eps_lower_bound >= 0.85 * result.eps_ideal
    sub = run_audit(dataclasses.replace(CONFIG, repetitions=300_000, canary_rate=0.5, noise_multiplier=0.8,
                                        fast_compile=False))
    _report("real step, canary rate 0.5", sub)
    assert 0 < sub.eps_lower_bound <= sub.eps_pld <= sub.eps_claimed
