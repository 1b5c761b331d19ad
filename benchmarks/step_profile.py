"""Where a step's time goes on XLA:CPU: per-op time from JAX's profiler, grouped by kind of op.

Runs the steps of benchmarks/per_example_grads.py (same networks, same B x K rows, same parts) under
`jax.profiler.trace` and reads back the per-thunk events XLA:CPU records (each names its HLO module
and op). Each op is classified from the optimised HLO (dumped for this process):

  conv_onednn     our oneDNN custom calls (forward, input gradient, per-example weight gradient)
  conv_xla        XLA convolutions (and fusions containing one)
  dot             matrix products (and fusions containing one)
  reduce          fusions containing a reduction (GroupNorm statistics, norms, sums, losses)
  layout          transposes / copies / reshapes only
  slice_gather    gather, scatter, dynamic (update) slices, concatenates, pads
  elementwise     every other fusion or op (SiLU, GroupNorm's scale and shift, Adam, RNG, ...)

Control-flow ops (while, conditional, call) contain other thunks and are left out, so the groups
add up to the time spent in kernels. Threads can run thunks concurrently; `kernel_s` per step can
therefore exceed `wall_s` (the traced step), and `wall_s - kernel_s` (when positive) bounds the time
between kernels. `wall_untraced_s` is the same steps without the profiler, for the tracing overhead.
Prints one JSON object: per part, the wall and per-group seconds per step and the top ops.

    python benchmarks/step_profile.py --networks quickstart mnist --batch 8 --k 4 \
        --parts jax_nonprivate jax_dp
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("conv_onednn", "conv_xla", "dot", "reduce", "layout", "slice_gather", "elementwise")
CONTROL = {"while", "conditional", "call"}
LAYOUT = {"transpose", "copy", "bitcast", "reshape", "parameter", "broadcast", "constant", "tuple",
          "get-tuple-element", "copy-start", "copy-done"}
SLICING = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "slice"}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _opcode(op: str, line: str) -> str:
    """An instruction's opcode; custom calls carry their target ("custom-call:dpdm_onednn_...")."""
    return op if op != "custom-call" else "custom-call:" + (_TARGET.search(line) or [None, "?"])[1]


def parse_hlo(text: str) -> dict:
    """{op name: group or 'control'} for one optimised HLO module's text."""
    computations, current = {}, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = computations.setdefault(m.group(1), [])
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            current.append((m.group(1), m.group(2), line))

    def opcodes(comp, seen=()):  # every opcode in a computation and the ones it calls
        out = set()
        for _, op, line in computations.get(comp, ()):
            out.add(_opcode(op, line))
            for callee in _CALLS.findall(line):
                if callee not in seen:
                    out |= opcodes(callee, seen + (comp,))
        return out

    groups = {}
    for comp in computations.values():
        for name, op, line in comp:
            ops = {_opcode(op, line)} if op != "fusion" else set()
            for callee in _CALLS.findall(line) if op == "fusion" else ():
                ops |= opcodes(callee)
            groups[name] = classify(op, ops)
    return groups


def classify(op: str, ops: set) -> str:
    if op in CONTROL:
        return "control"
    if any(o.startswith("custom-call:dpdm_onednn") for o in ops):
        return "conv_onednn"
    if "convolution" in ops:
        return "conv_xla"
    if "dot" in ops:
        return "dot"
    if ops & {"reduce", "reduce-window"}:
        return "reduce"
    if ops and ops <= LAYOUT:
        return "layout"
    if ops & SLICING:
        return "slice_gather"
    return "elementwise"


def worker(cfg: dict) -> None:
    """In a process whose XLA_FLAGS dump optimised HLO to cfg['dump']: set up, warm up, profile."""
    sys.path.insert(0, HERE)
    import jax

    from per_example_grads import jax_setup

    run, info = jax_setup(cfg)
    run()
    run()  # compiled and warm
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        run()
    info["wall_untraced_s"] = (time.perf_counter() - t) / cfg["steps"]
    trace_dir = os.path.join(cfg["dump"], "trace")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python function events slowed the traced steps ~2x
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir, profiler_options=options):
        for _ in range(cfg["steps"]):
            run()
    info["wall_s"] = (time.perf_counter() - t) / cfg["steps"]
    info["trace"] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    print("RESULT " + json.dumps(info), flush=True)


def summarise(info: dict, dump: str, steps: int, top: int) -> dict:
    groups = {}
    for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        module = re.sub(r"^module_\d+\.", "", os.path.basename(path)).split(".cpu_after")[0]
        with open(path) as f:
            groups[module] = parse_hlo(f.read())
    with gzip.open(info.pop("trace")) as f:
        events = json.load(f)["traceEvents"]
    per_group, per_op = collections.Counter(), collections.Counter()
    for e in events:
        args = e.get("args", {})
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        group = groups.get(args.get("hlo_module"), {}).get(args["hlo_op"], "elementwise")
        if group == "control":
            continue
        seconds = e["dur"] * 1e-6 / steps
        per_group[group] += seconds
        per_op[(args["hlo_module"], args["hlo_op"], group)] += seconds
    kernel_s = sum(per_group.values())
    info.update(
        kernel_s=round(kernel_s, 4), wall_s=round(info["wall_s"], 4), wall_untraced_s=round(info["wall_untraced_s"], 4),
        groups={g: {"s": round(per_group[g], 4), "share": round(per_group[g] / kernel_s, 3) if kernel_s else None}
                for g in GROUPS},
        top_ops=[{"module": m, "op": o, "group": g, "s": round(s, 5)} for (m, o, g), s in per_op.most_common(top)])
    return info


def main():
    sys.path.insert(0, HERE)
    from per_example_grads import NETWORKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["quickstart"], choices=sorted(NETWORKS))
    p.add_argument("--parts", nargs="+", default=["jax_nonprivate", "jax_dp"],
                   help="per_example_grads.py's JAX parts, e.g. jax_dp jax_dp@split_wgrad")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per part (after two warm-up steps)")
    p.add_argument("--top", type=int, default=12, help="slowest ops listed per part")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    sys.path.insert(0, HERE)
    from per_example_grads import worker_environment  # the training command's allocator

    base_env, allocator = worker_environment()
    out = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "allocator": allocator,
           "networks": {}}
    for net in args.networks:
        out["networks"][net] = {}
        for part in args.parts:
            with tempfile.TemporaryDirectory() as dump:
                cfg = dict(network=net, part=part, batch=args.batch, k=args.k, steps=args.steps, dump=dump)
                env = dict(base_env, XLA_FLAGS=(base_env.get("XLA_FLAGS", "") +
                                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip())
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                      env=env, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    out["networks"][net][part] = {"error": proc.stderr[-2000:]}
                    continue
                out["networks"][net][part] = summarise(json.loads(line[7:]), dump, args.steps, args.top)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
