"""Per-layer convolution passes on this backend: XLA's convolution vs matrix products over patches.

For each distinct convolution shape of the MNIST DDPM++ network (B=8 examples x K=4 rows) or the
quickstart one (B=8 x K=1), times, interleaved (median of rounds, one process):
  fwd                 the forward pass over B*K rows: xla (lax.conv) | im2col (patches @ W, one
                      matrix product) | shift (sum of kh*kw shifted matrix products)
  dgrad               the input gradient, same three forms (flipped, transposed kernel)
  wgrad_per_example   the weight gradient of each example's K rows under vmap (DP-SGD):
                      xla (vmap of lax.conv's: one grouped convolution) | split (layers.py
                      split_wgrad: one convolution per example) | im2col (batched patches^T @ g)
  and, where models/onednn.py can build its kernels here, onednn in each pass (conv_impl="onednn").
Prints one JSON line per shape (milliseconds; fwd_gflop from XLA's cost analysis).

    python benchmarks/conv_layers.py mnist        # or quickstart
"""
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpdm_jax.models import layers, onednn

ONEDNN = onednn.available()  # builds the kernels once (g++, libdnnl-dev); else the column is absent
DIMS = ("NHWC", "HWIO", "NHWC")
def xconv(x, w): return lax.conv_general_dilated(x, w, (1,1), "SAME", dimension_numbers=DIMS)
def patches(x, k):
    if k == 1: return x
    p = k // 2
    xp = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0)))
    H, W = x.shape[1:3]
    return jnp.concatenate([xp[:, dy:dy+H, dx:dx+W, :] for dy in range(k) for dx in range(k)], -1)
def im2col(x, w):
    k = w.shape[0]
    return jnp.einsum("nhwc,co->nhwo", patches(x, k), w.reshape(-1, w.shape[-1]))
def shift9(x, w):
    k = w.shape[0]; p = k//2; H, W = x.shape[1:3]
    xp = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0)))
    out = 0
    for dy in range(k):
        for dx in range(k):
            out = out + jnp.einsum("nhwc,co->nhwo", xp[:, dy:dy+H, dx:dx+W, :], w[dy, dx])
    return out
def flipT(w): return jnp.flip(w, (0,1)).transpose(0,1,3,2)
def dgrad_im2col(g, w): return im2col(g, flipT(w))
def dgrad_xla(g, w): return xconv(g, flipT(w))
def wgrad_im2col(x, g, k):  # one example's rows
    return jnp.einsum("nhwc,nhwo->co", patches(x, k), g).reshape(k, k, x.shape[-1], g.shape[-1])
def wgrad_xla(x, g, k):
    w0 = jnp.zeros((k, k, x.shape[-1], g.shape[-1]))
    return jax.vjp(lambda w: xconv(x, w), w0)[1](g)[0]
def wgrad_split(x, g, k):
    w0 = jnp.zeros((k, k, x.shape[-1], g.shape[-1]))
    return layers._weight_grad_fn("SAME")(x, g, w0)

def bench(fns, args, rounds=7):
    comp = {n: jax.jit(f).lower(*args).compile() for n, f in fns.items()}
    for c in comp.values(): jax.block_until_ready(c(*args))
    ts = {n: [] for n in fns}
    for _ in range(rounds):
        for n, c in comp.items():
            t = time.perf_counter(); jax.block_until_ready(c(*args)); ts[n].append(time.perf_counter() - t)
    flops = {n: (c.cost_analysis() or {}).get("flops", 0) if not isinstance(c.cost_analysis(), list) else c.cost_analysis()[0].get("flops") for n, c in comp.items()}
    return {n: statistics.median(t) for n, t in ts.items()}, flops

net = sys.argv[1]
B, K = (8, 4) if net == "mnist" else (8, 1)
shapes = {"mnist": [(28,1,3,32),(28,32,3,32),(28,64,3,32),(28,96,3,32),(28,32,3,1),(28,64,1,32),(14,32,3,64),(14,64,3,64),(14,128,3,64),(14,128,1,64),(7,64,3,64),(7,128,3,64),(7,128,1,64)],
          "quickstart": [(28,1,3,16),(28,16,3,16),(28,32,3,32),(28,48,3,16),(28,16,3,1),(28,32,1,16),(14,16,3,32),(14,32,3,32),(14,64,3,32),(14,64,1,32),(7,32,3,32),(7,64,3,32),(7,64,1,32)]}[net]
rng = np.random.default_rng(0)
res = []
for (hw, cin, k, cout) in shapes:
    x = jnp.asarray(rng.standard_normal((B, K, hw, hw, cin)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((B, K, hw, hw, cout)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)
    xf, gf = x.reshape(B*K, hw, hw, cin), g.reshape(B*K, hw, hw, cout)
    row = {"shape": [hw, cin, k, cout]}
    pads = ((k // 2, k // 2),) * 2
    dnn = lambda fns, form: fns | ({"onednn": form} if ONEDNN else {})
    t, f = bench(dnn({"xla": xconv, "im2col": im2col, "shift": shift9}, lambda x, w: onednn.conv(x, w, pads)),
                 (xf, w)); row["fwd"] = t; row["fwd_gflop"] = f["xla"]/1e9
    t, _ = bench(dnn({"xla": dgrad_xla, "im2col": dgrad_im2col, "shift": lambda g, w: shift9(g, flipT(w))},
                     lambda g, w: onednn.conv_input_grad(g, w, pads)), (gf, w)); row["dgrad"] = t
    wg = lambda fn: (lambda x, g: jax.vmap(lambda a, b: fn(a, b, k))(x, g))
    wgrad_onednn = lambda x, g, k: onednn.conv_weight_grad(x, g, jnp.zeros((k, k, x.shape[-1], g.shape[-1])), pads)
    t, _ = bench(dnn({"xla": wg(wgrad_xla), "split": wg(wgrad_split), "im2col": wg(wgrad_im2col)}, wg(wgrad_onednn)),
                 (x, g)); row["wgrad_per_example"] = t
    res.append(row)
    print(json.dumps({k_: ({a: round(b*1e3, 3) for a, b in v.items()} if isinstance(v, dict) else v) for k_, v in row.items()}), flush=True)
