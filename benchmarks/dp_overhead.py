"""Overhead around the kernels of one logical DP step: chunk loop vs scan, malloc settings.

One logical step of the quickstart network (or the MNIST one) over a full logical batch of
`--chunks` chunks of `--chunk` examples (K draws each). Variants (each in its own worker process,
so each can get its own environment):

  loop        today's DPSGDStep: one jitted accumulate call per chunk, then the update
  scan        one jitted program: lax.scan of the same sharded clipped sum over a stack of
              chunks (the chunk count is static, e.g. bucketed), then DPSGDStep's update
  ...@ENV     the same with an allocator setting (ENVS below): glibc malloc tunables, or
              jemalloc / tcmalloc through LD_PRELOAD (Debian's libjemalloc2, libtcmalloc-minimal4)

Workers compile one at a time, then the parent times them interleaved, one logical step each per
round, and reports the median step time, minor page faults and system CPU time per step
(getrusage of the worker, around the step). Prints one JSON object.

    python benchmarks/dp_overhead.py --network quickstart --chunk 8 --chunks 32 --k 1 --repeats 5 \
        --variants loop scan loop@glibc_nomunmap scan@glibc_nomunmap loop@jemalloc loop@tcmalloc

This measures what the lead may integrate into dpdm_jax/dp/step.py; it does not change it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NETWORKS = {
    "mnist": dict(),
    "quickstart": dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=()),
}
ENVS = {
    "": {},
    # glibc: keep freed big buffers in the heap (no mmap/munmap per buffer, so no page faults
    # to touch them again); 32 MiB is glibc's largest mmap threshold on 64-bit.
    "glibc_nomunmap": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                       "MALLOC_TOP_PAD_": str(256 << 20)},
    "jemalloc": {"LD_PRELOAD": "/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
}
SIGMA, CLIP, LR, LABEL_DROPOUT = 2.488, 1.0, 3e-4, 0.1


def setup(cfg):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
    from dpdm_jax.dp import DPSGDStep, data_mesh
    from dpdm_jax.dp.clipping import ClipStats
    from dpdm_jax.dp.sharding import replicated, sharded_clipped_grad_sum
    from dpdm_jax.dp.step import step_keys
    from dpdm_jax.models import ddpmpp_for, init_shapes

    model = ddpmpp_for("mnist", conv_impl=cfg["conv_impl"], **NETWORKS[cfg["network"]])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)),
                          init_shapes(model)["params"])
    apply = lambda p, x, c, y: model.apply({"params": p}, x, c, y)
    loss_fn = make_per_example_loss(apply, get_parameterisation("edm"), cfg["k"], 10, LABEL_DROPOUT)
    n, c = cfg["chunks"], cfg["chunk"]
    mesh = data_mesh(jax.devices()[:1])
    dp_step = DPSGDStep(loss_fn, optax.adam(LR), clip_norm=CLIP, noise_multiplier=SIGMA,
                        expected_batch_size=float(n * c), mesh=mesh)
    chunks = [({"image": rng.uniform(-1, 1, (c, 28, 28, 1)).astype(np.float32),
                "label": rng.integers(0, 10, c).astype(np.int32)},
               np.arange(i * c, (i + 1) * c, dtype=np.int32), np.ones(c, bool)) for i in range(n)]
    run_key = jax.random.key(0)
    state = [dp_step.init(params), 0]

    if cfg["mode"] == "loop":
        def run():
            state[0], _ = dp_step(state[0], chunks, run_key, state[1])
            state[1] += 1
            jax.block_until_ready(state[0].params)
        return run

    clipped_sum = sharded_clipped_grad_sum(loss_fn, mesh, CLIP)

    def accumulate_all(params, stacked, key):
        def body(acc, chunk):
            g, s = clipped_sum(params, *chunk, key)
            return (jax.tree.map(jnp.add, acc[0], g), acc[1] + s), None
        acc0 = (jax.tree.map(jnp.zeros_like, params), ClipStats.zeros())
        return jax.lax.scan(body, acc0, stacked)[0]

    accumulate_all = jax.jit(accumulate_all, out_shardings=replicated(mesh))
    stack = lambda *xs: np.stack(xs)
    stacked_host = jax.tree.map(stack, *chunks)

    def run():
        grad_key, noise_key = step_keys(run_key, state[1])
        stacked = jax.device_put(stacked_host, replicated(mesh))
        sums = accumulate_all(state[0].params, stacked, grad_key)
        partial_sums = jax.tree.map(lambda x: x[None], sums)  # one device's partial sums, as DPSGDStep's
        state[0], _ = dp_step._update(state[0], partial_sums, noise_key)
        state[1] += 1
        jax.block_until_ready(state[0].params)
    return run


def worker(cfg):
    t0 = time.perf_counter()
    run = setup(cfg)
    run()
    compile_s = time.perf_counter() - t0
    run()
    print("READY " + json.dumps({"compile_s": round(compile_s, 1)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        print("TIME " + json.dumps([dt, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime,
                                    r1.ru_utime - r0.ru_utime]), flush=True)
    print("RESULT " + json.dumps({"maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}),
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="quickstart", choices=sorted(NETWORKS))
    p.add_argument("--chunk", type=int, default=8, help="examples per chunk")
    p.add_argument("--chunks", type=int, default=32, help="chunks per logical step")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--conv-impl", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["loop", "scan"],
                   help="MODE or MODE@ENV, MODE in loop|scan, ENV in " + ", ".join(e for e in ENVS if e))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    out = {"command": " ".join(["python"] + sys.argv), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
           "network": args.network, "chunk": args.chunk, "chunks": args.chunks, "k": args.k,
           "conv_impl": args.conv_impl, "variants": {}}
    workers = {}
    for v in args.variants:
        mode, _, env_name = v.partition("@")
        env = {**os.environ, **ENVS[env_name],
               "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
        cfg = dict(network=args.network, chunk=args.chunk, chunks=args.chunks, k=args.k, mode=mode,
                   conv_impl=args.conv_impl)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        try:
            out["variants"][v] = json.loads(_read(proc, "READY "))
            workers[v] = proc
        except RuntimeError as e:  # keep the other variants
            out["variants"][v] = {"error": repr(e)}
    samples = {v: [] for v in workers}
    for _ in range(args.repeats):
        for v, proc in workers.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            samples[v].append(json.loads(_read(proc, "TIME ")))
    for v, proc in workers.items():
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        out["variants"][v].update(json.loads(_read(proc, "RESULT ")))
        proc.wait()
        t, flt, sys_s, usr_s = zip(*samples[v])
        out["variants"][v].update(median_step_s=round(statistics.median(t), 3), times_s=[round(x, 3) for x in t],
                                  minor_faults_per_step=int(statistics.median(flt)),
                                  sys_s_per_step=round(statistics.median(sys_s), 3),
                                  user_s_per_step=round(statistics.median(usr_s), 3))
    base = out["variants"][args.variants[0]].get("median_step_s")
    if base:
        out["step_time_over_" + args.variants[0]] = {v: round(r["median_step_s"] / base, 3)
                                                     for v, r in out["variants"].items() if "median_step_s" in r}
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


def _read(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise RuntimeError(f"worker exited (rc={proc.wait()}) before {prefix!r}")


if __name__ == "__main__":
    main()
