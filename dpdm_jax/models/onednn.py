"""oneDNN's convolution kernels and a GroupNorm(+SiLU) kernel behind XLA:CPU (conv_impl="onednn"),
as XLA FFI custom calls.

XLA:CPU's own 3x3 convolutions reach about a third of this CPU's fp32 matrix-product rate where
PyTorch's oneDNN kernels reach about 60 % (docs/benchmarks.md section 10). This module builds
kernels/onednn_conv.cc at first use (g++, jaxlib's FFI headers, the system's libdnnl: Debian
`libdnnl-dev`; a oneDNN elsewhere through g++'s CPATH / LIBRARY_PATH and the loader's
LD_LIBRARY_PATH), caches the shared library under
~/.cache/dpdm_jax/kernels, and registers three FFI targets. `available()` says whether that
worked, and why not; nothing here is needed unless a model asks for conv_impl="onednn".

Each function takes and returns NHWC activations and HWIO kernels (float32, stride 1, explicit
padding ((top, bottom), (left, right))). Under jax.vmap the examples fold into the convolution's
batch (forward, input gradient) or become the groups of one weight-gradient call, so DP-SGD's
per-example gradients cost no grouped convolution.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCES = (os.path.join(_KERNELS, "onednn_conv.cc"), os.path.join(_KERNELS, "group_norm.cc"))
_TARGETS = {  # FFI target name -> symbol in the shared library
    "dpdm_onednn_conv_forward": "DpdmOnednnConvForward",
    "dpdm_onednn_conv_input_grad": "DpdmOnednnConvInputGrad",
    "dpdm_onednn_conv_weight_grad": "DpdmOnednnConvWeightGrad",
    "dpdm_group_norm_forward": "DpdmGroupNormForward",
    "dpdm_group_norm_backward": "DpdmGroupNormBackward",
}


# Per-example weight gradients: one example per thread (True) or each example over all threads.
WEIGHT_GRAD_EXAMPLES_IN_PARALLEL = True


class OnednnUnavailable(RuntimeError):
    """The oneDNN kernels could not be built or loaded on this machine (the message says why)."""


def _library_path(cache_dir: str | None = None) -> str:
    """Build (once per source, jaxlib and oneDNN location) and return the shared library's path."""
    source = b""
    for path in SOURCES:
        with open(path, "rb") as f:
            source += f.read()
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OnednnUnavailable("no C++ compiler (g++) to build the oneDNN kernels")
    # -fno-math-errno (not -ffast-math, whose start-up code would flush denormals process-wide) and
    # libmvec let the GroupNorm kernel's SiLU call glibc's vectorised expf.
    args = ["-O3", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-I{jax.ffi.include_dir()}", *SOURCES, "-ldnnl", "-lmvec"]
    digest = hashlib.sha256(source + " ".join([compiler, jax.__version__, *args]).encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dpdm_jax", "kernels")
    path = os.path.join(cache_dir, f"onednn_conv_{digest}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = os.path.join(tmp, "lib.so")
        cmd = [compiler, *args, "-o", out]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = [ln for ln in result.stderr.splitlines() if "error" in ln] or result.stderr.splitlines()
            raise OnednnUnavailable("building the oneDNN kernels failed (is libdnnl-dev installed?): "
                                    + (lines[0] if lines else f"{compiler} exited {result.returncode}"))
        os.replace(out, path)  # atomic: concurrent builders leave one complete file
    return path


@functools.cache
def _load() -> str | None:
    """Register the FFI targets; None on success, else the reason they are unavailable."""
    try:
        lib = ctypes.cdll.LoadLibrary(_library_path())
    except (OnednnUnavailable, OSError) as e:
        return str(e)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def available() -> bool:
    """Whether the oneDNN kernels are built and registered (building them on first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """None if the kernels are usable, else why not (one line)."""
    return _load()


def require() -> None:
    """OnednnUnavailable with the reason, unless the kernels are usable."""
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(f"conv_impl='onednn' is unavailable: {reason}")


def _pad_attrs(pads):
    (top, bottom), (left, right) = pads
    return {"pad_top": np.int64(top), "pad_bottom": np.int64(bottom), "pad_left": np.int64(left),
            "pad_right": np.int64(right)}


def _vary_like(out, *inputs):
    """out, device-varying over the manual (shard_map) axes its inputs vary over, as XLA's ops are."""
    def varying(a):
        t = jax.typeof(a)
        manual = getattr(t, "manual_axis_type", None)
        return set(manual.varying) if manual is not None else set(getattr(t, "vma", ()))

    missing = set().union(*map(varying, inputs)) - varying(out)
    return jax.lax.pcast(out, tuple(sorted(missing)), to="varying") if missing else out


def _forward_call(x, w, pads):
    """(n, h, w, ci), (kh, kw, ci, co) -> (n, ho, wo, co)."""
    (top, bottom), (left, right) = pads
    kh, kw, _, co = w.shape
    out = jax.ShapeDtypeStruct((x.shape[0], x.shape[1] + top + bottom - kh + 1,
                                x.shape[2] + left + right - kw + 1, co), jnp.float32)
    return _vary_like(jax.ffi.ffi_call("dpdm_onednn_conv_forward", out)(x, w, **_pad_attrs(pads)), x, w)


def _input_grad_call(g, w, pads):
    """(n, ho, wo, co), (kh, kw, ci, co) -> (n, h, w, ci)."""
    (top, bottom), (left, right) = pads
    kh, kw, ci, _ = w.shape
    out = jax.ShapeDtypeStruct((g.shape[0], g.shape[1] - top - bottom + kh - 1,
                                g.shape[2] - left - right + kw - 1, ci), jnp.float32)
    return _vary_like(jax.ffi.ffi_call("dpdm_onednn_conv_input_grad", out)(g, w, **_pad_attrs(pads)), g, w)


@functools.cache
def _rows_then_kernel(call, pads):
    """call(rows, w, pads) whose vmap folds the mapped axis into the rows (w unmapped) or loops (w mapped)."""

    @custom_batching.custom_vmap
    def fn(rows, w):
        return call(rows, w, pads)

    @fn.def_vmap
    def _batched(axis_size, in_batched, rows, w):
        rows_batched, w_batched = in_batched
        if not rows_batched:
            rows = jnp.broadcast_to(rows, (axis_size,) + rows.shape)
        if w_batched:  # a different kernel per mapped index (not DP-SGD's case): one call each
            return jnp.stack([fn(rows[i], w[i]) for i in range(axis_size)]), True
        out = fn(rows.reshape((-1,) + rows.shape[2:]), w)
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    return fn


def _mapped(axis_size, in_batched, *args):
    """args, each with the mapped axis leading (broadcast where it was unmapped)."""
    return [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]


@functools.cache
def _grouped_weight_grad(pads, kernel_hw):
    """(e, n, h, w, ci), (e, n, ho, wo, co) -> (e, kh, kw, ci, co): one weight gradient per group e."""

    @custom_batching.custom_vmap
    def fn(x, g):
        out = jax.ShapeDtypeStruct((x.shape[0], *kernel_hw, x.shape[-1], g.shape[-1]), jnp.float32)
        call = jax.ffi.ffi_call("dpdm_onednn_conv_weight_grad", out)
        dw = call(x, g, **_pad_attrs(pads), examples_in_parallel=np.int64(WEIGHT_GRAD_EXAMPLES_IN_PARALLEL))
        return _vary_like(dw, x, g)

    @fn.def_vmap
    def _batched(axis_size, in_batched, x, g):  # outer vmaps: more groups
        x, g = _mapped(axis_size, in_batched, x, g)
        out = fn(x.reshape((-1,) + x.shape[2:]), g.reshape((-1,) + g.shape[2:]))
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    return fn


@functools.cache
def _weight_grad_fn(pads, kernel_hw):
    """(n, h, w, ci), (n, ho, wo, co) -> (kh, kw, ci, co), whose vmap is one grouped call."""

    @custom_batching.custom_vmap
    def fn(x, g):
        return _grouped_weight_grad(pads, kernel_hw)(x[None], g[None])[0]

    @fn.def_vmap
    def _batched(axis_size, in_batched, x, g):
        return _grouped_weight_grad(pads, kernel_hw)(*_mapped(axis_size, in_batched, x, g)), True

    return fn


def conv(x, w, pads):
    """The stride-1 convolution of x (n, h, w, ci) with w (kh, kw, ci, co): (n, ho, wo, co)."""
    require()
    return _rows_then_kernel(_forward_call, pads)(x.astype(jnp.float32), w.astype(jnp.float32))


def conv_input_grad(g, w, pads):
    """d/dx of sum(g * conv(x, w)) for g (n, ho, wo, co): (n, h, w, ci)."""
    require()
    return _rows_then_kernel(_input_grad_call, pads)(g.astype(jnp.float32), w.astype(jnp.float32))


def conv_weight_grad(x, g, w, pads):
    """d/dw of sum(g * conv(x, w)): (kh, kw, ci, co); w only gives the result's type (shard_map)."""
    require()
    dw = _weight_grad_fn(pads, tuple(w.shape[:2]))(x.astype(jnp.float32), g.astype(jnp.float32))
    return _vary_like(dw.astype(w.dtype), w)


# --------------------------------------------------------------------------- GroupNorm (+ SiLU)
# kernels/group_norm.cc: the forward pass returns y and each row's group statistics (rows, G); the
# backward pass returns dx and each row's scale and bias gradients (rows, C), summed here. Every
# leading axis counts as rows, so under jax.vmap the mapped axis simply adds rows ("expand_dims":
# the unmapped scale and bias get a leading axis of 1, which the kernel reads as the same (C,)).


def _group_norm_call(x, scale, bias, groups, epsilon, silu):
    rows = int(np.prod(x.shape[:-3]))
    stats = jax.ShapeDtypeStruct((rows, groups), jnp.float32)
    call = jax.ffi.ffi_call("dpdm_group_norm_forward", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
                            vmap_method="expand_dims")
    outs = call(x, scale, bias, groups=np.int64(groups), epsilon=np.float32(epsilon), silu=np.int64(silu))
    return tuple(_vary_like(o, x, scale, bias) for o in outs)


def _group_norm_grad_call(x, scale, bias, mean, rstd, dy, groups, silu):
    per_row = jax.ShapeDtypeStruct((int(np.prod(x.shape[:-3])), x.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("dpdm_group_norm_backward", (jax.ShapeDtypeStruct(x.shape, jnp.float32), per_row, per_row),
                            vmap_method="expand_dims")
    outs = call(x, scale, bias, mean, rstd, dy, groups=np.int64(groups), silu=np.int64(silu))
    return tuple(_vary_like(o, x, scale, bias, mean, rstd, dy) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, groups, epsilon, silu):
    return _group_norm_call(x, scale, bias, groups, epsilon, silu)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon, silu):
    y, mean, rstd = _group_norm_call(x, scale, bias, groups, epsilon, silu)
    return y, (x, scale, bias, mean, rstd)


@functools.cache
def _group_norm_grad_fn(groups, silu):
    """The backward call, whose vmap folds the mapped axis into the rows of x, its statistics and dy
    alike (broadcasting whichever is unmapped: e.g. cotangents mapped over a shared x), or loops
    where scale or bias is mapped."""

    @custom_batching.custom_vmap
    def fn(x, scale, bias, mean, rstd, dy):
        return _group_norm_grad_call(x, scale, bias, mean, rstd, dy, groups, silu)

    @fn.def_vmap
    def _batched(axis_size, in_batched, x, scale, bias, mean, rstd, dy):
        args = (x, scale, bias, mean, rstd, dy)
        if in_batched[1] or in_batched[2]:  # a different scale or bias per mapped index: one call each
            outs = [fn(*(a[i] if b else a for a, b in zip(args, in_batched))) for i in range(axis_size)]
            return tuple(jnp.stack(o) for o in zip(*outs)), (True, True, True)
        x, mean, rstd, dy = _mapped(axis_size, [in_batched[i] for i in (0, 3, 4, 5)], x, mean, rstd, dy)
        fold = lambda a: a.reshape((-1,) + a.shape[2:])
        outs = fn(fold(x), scale, bias, fold(mean), fold(rstd), fold(dy))
        return tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs), (True, True, True)

    return fn


def _group_norm_bwd(groups, epsilon, silu, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    dx, dscale, dbias = _group_norm_grad_fn(groups, silu)(x, scale, bias, mean, rstd, dy)
    return dx, dscale.sum(0), dbias.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, scale, bias, groups: int, epsilon: float, silu: bool = False):
    """GroupNorm of each row of x (..., H, W, C) with scale, bias (C,), then SiLU if `silu`.

    The same values as layers.GroupNorm (float32; statistics summed in float blocks of 64 positions,
    added in float64), and its gradients.
    """
    require()
    f32 = lambda a: a.astype(jnp.float32)
    return _group_norm(f32(x), f32(scale), f32(bias), int(groups), float(epsilon), bool(silu)).astype(x.dtype)
