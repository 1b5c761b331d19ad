"""python -m dpdm_jax.audit: audit the engine's DP-SGD step and write the result as JSON.

Exit status 0 when the lower bound does not exceed the accountant's epsilon, 1 when it does
(the implementation violates its claim), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dpdm_jax.audit.mechanism import AuditConfig
from dpdm_jax.audit.run import run_audit
from dpdm_jax.dp.accounting import calibrate_noise_multiplier


def parse_args(argv=None) -> argparse.Namespace:
    d = AuditConfig()
    p = argparse.ArgumentParser(prog="python -m dpdm_jax.audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sigma", type=float, default=None, help=f"noise multiplier (default {d.noise_multiplier})")
    g.add_argument("--target_epsilon", type=float, default=None,
                   help="calibrate sigma (RDP) so that one step at the canary's rate spends this epsilon")
    p.add_argument("--repetitions", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--clip_norm", type=float, default=d.clip_norm)
    p.add_argument("--noise_multiplicity", type=int, default=d.noise_multiplicity)
    p.add_argument("--canary_rate", type=float, default=d.canary_rate,
                   help="P(canary in batch | canary in dataset); < 1 audits the subsampled Gaussian")
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--block_size", type=int, default=d.block_size)
    p.add_argument("--fast_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="XLA optimisation level 0 (default: on for <= 100k repetitions)")
    p.add_argument("--output", type=str, default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The AuditConfig of parsed flags (sigma calibrated with RDP when --target_epsilon is given)."""
    sigma = args.sigma if args.sigma is not None else AuditConfig().noise_multiplier
    if args.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(args.target_epsilon, args.canary_rate, 1, args.delta, "rdp")
    fast = args.fast_compile if args.fast_compile is not None else args.repetitions <= 100_000
    return dataclasses.replace(
        AuditConfig(), noise_multiplier=sigma, repetitions=args.repetitions, seed=args.seed, delta=args.delta,
        clip_norm=args.clip_norm, noise_multiplicity=args.noise_multiplicity, canary_rate=args.canary_rate,
        confidence=args.confidence, block_size=args.block_size, fast_compile=fast,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_audit(config)
    print(result.summary())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {args.output}")
    return 1 if result.violation else 0


if __name__ == "__main__":
    sys.exit(main())
