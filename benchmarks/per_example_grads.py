"""Per-example gradients: our DP step vs a non-private step vs Opacus, side by side.

For each network (the paper's MNIST DDPM++ and a small one) and each part:

  jax_nonprivate  grad of the mean DPDM loss over the same B x K rows + Adam (jitted, JAX)
  jax_dp          dpdm_jax.dp.DPSGDStep: B examples x K draws, per-example clip, noise once,
                  Adam, EMA (one chunk of B examples per logical step)
  torch_nonprivate  the same non-private step on an equivalent PyTorch port (torch_ddpmpp.py)
  opacus_dp       Opacus 1.6 per-sample gradients on the PyTorch port: GradSampleModule gives
                  one gradient per row; rows are summed per example (K draws), then Opacus's
                  DPOptimizer clips per example, adds noise once and runs Adam
  port_check      loads the Flax parameters into the PyTorch port and compares outputs
  matmul_probe    XLA's fp32 rate on one 2048 x 2048 matrix product (GFLOP/s): the yardstick

Work per step: XLA's cost analysis (flops) of the JAX non-private step's program for the same
B x K rows, built with lax.conv (custom calls such as oneDNN's count no flops), is each network's
"useful" work, so every part (torch included) gets
useful_gflops = that / its median step time; JAX parts also report xla_gflop of their own program
(for jax_dp: the per-example clipped sum, i.e. the per-example gradients and clipping). With
matmul_probe in the run, each rate is also given as a fraction of the matrix-product rate.

Every part runs in its own worker subprocess, so peak RSS (VmHWM) is per configuration. The
workers are started (and compiled) one at a time, then the parent times them INTERLEAVED,
round-robin, one step each per round: a shared, noisy machine then slows every part alike
and the ratios (measured in the same run) stay meaningful. Prints one JSON object to stdout.

    python benchmarks/per_example_grads.py --networks mnist small --batch 4 --k 4 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

from proc_memory import status_kib

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("jax_nonprivate", "jax_dp", "torch_nonprivate", "opacus_dp")
# A JAX part may carry a convolution implementation (DDPMpp.conv_impl): jax_dp@xla, ...
sys.path.insert(0, os.path.dirname(HERE))
from dpdm_jax.main import tcmalloc_preload
from dpdm_jax.models.layers import CONV_IMPLS  # noqa: E402  (the registry; starts no backend)

CONV_IMPLS = tuple(c for c in CONV_IMPLS if c != "auto")
ALL_PARTS = PARTS + tuple(f"{p}@{c}" for p in PARTS[:2] for c in CONV_IMPLS) + ("port_check", "matmul_probe")
SINGLE_SHOT = ("port_check", "matmul_probe")  # one RESULT, no timed rounds
# The small network: same blocks, two levels, one residual block per level.
NETWORKS = {
    "mnist": dict(),
    "small": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,)),
    "quickstart": dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=()),  # configs/quickstart.py
}
SIGMA, CLIP, LR, LABEL_DROPOUT = 2.488, 1.0, 3e-4, 0.1  # the paper's MNIST epsilon=10 recipe




def worker_environment(environ=None) -> tuple[dict, str]:
    """(the workers' environment, the allocator's name): the parent's environment, with tcmalloc
    preloaded wherever `python -m dpdm_jax.main` would preload it, so that every part (ours, PyTorch,
    Opacus) runs with the allocator of the training command (DPDM_NO_TCMALLOC=1: glibc's malloc)."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    preload = tcmalloc_preload(env)
    if preload:
        env["LD_PRELOAD"] = preload
    return env, env.get("LD_PRELOAD") or "glibc malloc"


# ----------------------------------------------------------------------------- JAX workers
def jax_setup(cfg):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpdm_jax.diffusion import get_parameterisation, make_per_example_loss
    from dpdm_jax.dp import DPSGDStep, clipped_grad_sum, data_mesh
    from dpdm_jax.models import count_params, ddpmpp_for, init_shapes

    from dpdm_jax.models.layers import resolve_conv_impl

    # e.g. jax_dp@xla: this convolution implementation; without "@", the model's default ("auto").
    conv_impl = cfg["part"].split("@")[1] if "@" in cfg["part"] else "auto"
    info = {"conv_impl": resolve_conv_impl(conv_impl)}
    b, k = cfg["batch"], cfg["k"]

    def dpdm_loss(impl):  # the per-example DPDM loss of the network with this convolution implementation
        model = ddpmpp_for("mnist", conv_impl=impl, **NETWORKS[cfg["network"]])
        apply = lambda p, x, c, y: model.apply({"params": p}, x, c, y)
        return model, make_per_example_loss(apply, get_parameterisation("edm"), k, 10, LABEL_DROPOUT)

    model, loss_fn = dpdm_loss(conv_impl)
    # Flop counts come from the lax.conv network: XLA's cost analysis counts no flops in custom
    # calls (conv_impl="onednn"), and the work is the same for every implementation.
    xla_loss_fn = dpdm_loss("xla")[1]
    shapes = init_shapes(model)["params"]
    rng = np.random.default_rng(0)  # values do not affect speed; numpy avoids compiling the PRNG
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)
    examples = {"image": rng.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32),
                "label": rng.integers(0, 10, b).astype(np.int32)}
    ids = np.arange(b, dtype=np.int32)
    opt = optax.adam(LR)
    info.update(params=count_params(shapes), backend=jax.default_backend())
    run_key = jax.random.key(0)
    ex = jax.tree.map(jnp.asarray, examples)

    def nonprivate_step(loss_fn):
        def step(params, opt_state, key):  # the non-private step; its flops are the "useful" work
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids))
            mean_loss = lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, ex, keys))
            grads = jax.grad(mean_loss)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return jax.jit(step)

    step = nonprivate_step(loss_fn)
    info["nonprivate_gflop"] = lowered_gflop(nonprivate_step(xla_loss_fn), params, opt.init(params), run_key)

    if cfg["part"].startswith("jax_nonprivate"):
        info["xla_gflop"] = info["nonprivate_gflop"]
        state = [params, opt.init(params), 0]

        def run():
            state[0], state[1] = step(state[0], state[1], jax.random.fold_in(run_key, state[2]))
            state[2] += 1
            jax.block_until_ready(state[0])

        return run, info

    dp_step = DPSGDStep(loss_fn, opt, clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=float(b),
                        mesh=data_mesh(jax.devices()[:1]), microbatch_size=cfg.get("microbatch"),
                        **({"clipping_method": cfg["clipping"]} if cfg.get("clipping") else {}))
    mask = np.ones(b, bool)
    info["xla_gflop"] = lowered_gflop(
        lambda p, key: clipped_grad_sum(xla_loss_fn, p, ex, jnp.asarray(ids), jnp.asarray(mask), key, CLIP), params,
        run_key)
    state = [dp_step.init(params), 0]

    def run():
        state[0], _ = dp_step(state[0], [(examples, ids, mask)], run_key, state[1])
        state[1] += 1
        jax.block_until_ready(state[0].params)

    return run, info


def lowered_gflop(fn, *args) -> float | None:
    """XLA's cost-analysis flop count of jit(fn)(*args), in GFLOP (from the lowered HLO; no compile)."""
    import jax

    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return round(cost["flops"] / 1e9, 4) if cost and "flops" in cost else None


def matmul_probe(n: int = 2048, repeats: int = 7) -> dict:
    """XLA's fp32 matrix-product rate on this machine: median over `repeats` of an n x n x n product."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"n": n, "xla_matmul_gflops": round(2 * n**3 / statistics.median(times) / 1e9, 1)}


# --------------------------------------------------------------------------- torch workers
def torch_setup(cfg):
    import torch

    sys.path.insert(0, HERE)
    import torch_ddpmpp

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = dict(image_size=28, in_channels=1, num_classes=10, **{**dict(attn_resolutions=(7,)), **NETWORKS[cfg["network"]]})
    model = torch_ddpmpp.DDPMpp(**net).to(dev)
    b, k = cfg["batch"], cfg["k"]
    x0 = torch.rand(b, 1, 28, 28, device=dev) * 2 - 1
    y0 = torch.randint(0, 10, (b,), device=dev)
    sd = (1.0 / 3.0) ** 0.5
    info = {"params": torch_ddpmpp.count_params(model), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(dev)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def row_losses(net_fn):
        """EDM loss per row (B*K rows), label dropout per example shared by its K draws."""
        drop = torch.rand(b, device=dev) < LABEL_DROPOUT
        y = torch.where(drop, torch.full_like(y0, 10), y0).repeat_interleave(k)
        x = x0.repeat_interleave(k, dim=0)
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(b * k, device=dev))
        s = sigma[:, None, None, None]
        xn = x + s * torch.randn_like(x)
        denom = s ** 2 + sd ** 2
        d = (sd ** 2 / denom) * xn + (s * sd / denom.sqrt()) * net_fn(xn / denom.sqrt(), torch.log(sigma) / 4, y)
        w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        return w * ((d - x) ** 2).mean(dim=(1, 2, 3))

    if cfg["part"] == "torch_nonprivate":
        opt = torch.optim.Adam(model.parameters(), lr=LR)

        def run():
            opt.zero_grad(set_to_none=True)
            row_losses(model).mean().backward()
            opt.step()
            sync()

        return run, info

    import opacus
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    info["opacus"] = opacus.__version__
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.Adam(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                      expected_batch_size=b, loss_reduction="sum")

    def run():
        opt.zero_grad(set_to_none=True)
        # sum over rows of loss/K: a row's grad_sample is grad(row loss)/K, so the sum of an
        # example's K rows is the gradient of its mean-over-K loss, which is what gets clipped.
        (row_losses(gsm).sum() / k).backward()
        for p in params:
            p.grad_sample = p.grad_sample.reshape((b, k) + tuple(p.shape)).sum(1)
        opt.step()
        sync()

    return run, info


def port_check(cfg):
    """Max |flax - torch| output difference with the same parameters (fan-in scaled, O(1) output)."""
    import math

    import jax
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    import torch_ddpmpp
    from dpdm_jax.models import count_params, ddpmpp_for, init_shapes

    model = ddpmpp_for("mnist", **NETWORKS[cfg["network"]])
    shapes = init_shapes(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) / math.sqrt(max(1, math.prod(s.shape[:-1]))))
                          .astype(np.float32), shapes)
    tmodel = torch_ddpmpp.from_flax_module(model)
    torch_ddpmpp.load_flax_params(tmodel, params["params"])
    x = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
    t = rng.standard_normal(3).astype(np.float32)
    y = np.array([0, 5, 10], np.int32)
    out_jax = np.asarray(jax.jit(model.apply)(params, x, t, y))
    with torch.no_grad():
        out_t = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y))
    out_t = out_t.permute(0, 2, 3, 1).numpy()
    return {"params_jax": count_params(shapes), "params_torch": torch_ddpmpp.count_params(tmodel),
            "max_abs_output": float(np.abs(out_jax).max()), "max_abs_diff": float(np.abs(out_jax - out_t).max())}


def worker(cfg):
    """Compile + warm up, say READY, then run one timed step per 'run' line on stdin."""
    if cfg.get("threads"):
        # Both frameworks get the same CPUs: XLA sizes its thread pool from the affinity mask,
        # torch is told the same number of intra-op threads.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: cfg["threads"]])
    if cfg["part"] in SINGLE_SHOT:
        result = port_check(cfg) if cfg["part"] == "port_check" else matmul_probe()
        print("RESULT " + json.dumps(result), flush=True)
        return
    rss_start = status_kib("VmRSS")
    setup = jax_setup if cfg["part"].startswith("jax") else torch_setup
    t0 = time.perf_counter()
    run, info = setup(cfg)
    rss_setup = status_kib("VmRSS")
    t1 = time.perf_counter()
    run()  # compiles (JAX) / first call
    compile_s = time.perf_counter() - t1
    run()  # warm-up
    info.update(setup_s=round(t1 - t0, 2), compile_s=round(compile_s, 2), rss_after_setup_mb=round(rss_setup / 1024),
                rss_at_start_mb=round(rss_start / 1024))
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        run()
        print(f"TIME {time.perf_counter() - t:.6f}", flush=True)
    print("RESULT " + json.dumps({"peak_rss_mb": round(status_kib("VmHWM") / 1024)}), flush=True)


# ------------------------------------------------------------------------------- parent
class _Timeout(BaseException):  # not an Exception: per-part error handling must not swallow it
    pass


class Worker:
    def __init__(self, cfg, env, timeout):
        self.cfg, self.timeout = cfg, timeout
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)

    def read(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"worker {self.cfg} exited (rc={self.proc.wait()}) before {prefix!r}")

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["mnist", "small"], choices=sorted(NETWORKS))
    p.add_argument("--parts", nargs="+", default=list(PARTS) + ["port_check"], choices=ALL_PARTS,
                   help="jax_*@xla / jax_*@split_wgrad force a convolution implementation")
    p.add_argument("--batch", type=int, default=4, help="B: examples per step")
    p.add_argument("--k", type=int, default=4, help="K: noise draws per example (rows = B*K)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per part (interleaved rounds)")
    p.add_argument("--microbatch", type=int, default=None, help="jax_dp: inner micro-batch (examples)")
    p.add_argument("--clipping", default=None, help="jax_dp: DPSGDStep clipping_method")
    p.add_argument("--threads", type=int, default=None,
                   help="CPUs per worker (affinity mask; torch gets as many threads). Default: all")
    p.add_argument("--timeout", type=int, default=3600,
                   help="seconds for the whole run; then the workers are killed and what was measured is printed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    env, allocator = worker_environment()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": platform.processor()
           or platform.machine(), "cpus": os.cpu_count(), "threads_per_worker": args.threads or os.cpu_count(), "load_avg_at_start": load, "batch": args.batch,
           "k": args.k, "rows_per_step": args.batch * args.k, "repeats": args.repeats,
           "xla_flags": env.get("XLA_FLAGS", ""), "allocator": allocator, "networks": {}}
    deadline = time.time() + args.timeout
    live = []

    def on_alarm(*_):
        raise _Timeout(f"--timeout {args.timeout}s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.timeout)
    try:
        run_networks(args, env, out, deadline, live)
    except _Timeout as e:
        out["error"] = str(e)
        for w in live:
            w.proc.kill()
    signal.alarm(0)
    try:
        out["load_avg_at_end"] = os.getloadavg()
    except OSError:
        pass
    print(json.dumps(out, indent=1))


def run_networks(args, env, out, deadline, live):
    for net in args.networks:
        res, workers = {}, {}
        out["networks"][net] = res
        for part in args.parts:
            cfg = dict(network=net, part=part, batch=args.batch, k=args.k, microbatch=args.microbatch,
                       clipping=args.clipping, threads=args.threads)
            w = Worker(cfg, env, args.timeout)
            live.append(w)
            try:
                if part in SINGLE_SHOT:
                    res[part] = json.loads(w.read("RESULT "))
                    w.proc.wait()
                    continue
                res[part] = json.loads(w.read("READY "))  # compiles one at a time
                workers[part] = w
            except Exception as e:  # keep the others' results
                res[part] = {"error": repr(e)}
                w.proc.kill()
        times = {part: [] for part in workers}
        for _ in range(args.repeats):
            for part, w in workers.items():
                if time.time() > deadline:
                    break
                w.send("run")
                times[part].append(float(w.read("TIME ")))
        for part, w in workers.items():
            w.send("stop")
            res[part].update(json.loads(w.read("RESULT ")))
            w.proc.wait()
            t = times[part]
            if t:
                med = statistics.median(t)
                res[part].update(median_s=round(med, 4), min_s=round(min(t), 4), times_s=[round(x, 4) for x in t],
                                 rows_per_s=round(args.batch * args.k / med, 2))
        add_rates(res)
        # Ratios of medians, all from this run (interleaved). Time ratios: > 1 = slower.
        ratios = {}
        rate = lambda part: res.get(part, {}).get("rows_per_s")
        for s in ("", "@xla", "@split_wgrad"):
            dp, npv = "jax_dp" + s, "jax_nonprivate" + s
            if rate(dp) and rate(npv):
                ratios[f"{dp}_time_over_{npv}"] = round(rate(npv) / rate(dp), 3)
            if rate(dp) and rate("opacus_dp"):
                ratios[f"{dp}_throughput_over_opacus"] = round(rate(dp) / rate("opacus_dp"), 3)
            if rate(npv) and rate("torch_nonprivate"):
                ratios[f"{npv}_throughput_over_torch_nonprivate"] = round(rate(npv) / rate("torch_nonprivate"), 3)
        if rate("opacus_dp") and rate("torch_nonprivate"):
            ratios["opacus_time_over_torch_nonprivate"] = round(rate("torch_nonprivate") / rate("opacus_dp"), 3)
        res["ratios"] = ratios
        res["targets"] = against_targets(ratios)


# Issue 14's targets for the default parts: (ratio, bound, "min" = at least / "max" = at most).
TARGETS = {"jax_dp_throughput_over_opacus": (1.5, "min"), "jax_dp_time_over_jax_nonprivate": (1.25, "max")}


def against_targets(ratios: dict) -> dict:
    """{ratio: {value, target, met}} for each of TARGETS this run measured."""
    out = {}
    for name, (bound, kind) in TARGETS.items():
        if name in ratios:
            value = ratios[name]
            out[name] = {"value": value, "target": f"{'>=' if kind == 'min' else '<='} {bound}",
                         "met": value >= bound if kind == "min" else value <= bound}
    return out


def add_rates(res: dict) -> None:
    """Per timed part: useful GFLOP/s (the non-private step's XLA flops / median step), the part's own
    XLA GFLOP/s (JAX parts), and both as fractions of the matrix-product rate when it was probed."""
    useful = next((r["nonprivate_gflop"] for r in res.values() if isinstance(r, dict) and r.get("nonprivate_gflop")),
                  None)
    matmul = res.get("matmul_probe", {}).get("xla_matmul_gflops")
    for part, r in res.items():
        if not isinstance(r, dict) or not r.get("median_s"):
            continue
        rates = {"useful_gflops": useful and useful / r["median_s"],
                 "xla_gflops": r.get("xla_gflop") and r["xla_gflop"] / r["median_s"]}
        for name, rate in rates.items():
            if rate:
                r[name] = round(rate, 2)
                if matmul:
                    r[name.replace("gflops", "over_matmul")] = round(rate / matmul, 3)


if __name__ == "__main__":
    main()
