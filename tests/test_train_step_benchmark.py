"""benchmarks/train_step.py times the training program a config builds, in every variant."""
import json
import os
import subprocess
import sys

from helpers import main_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_variant_times_the_configs_own_steps():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"),
                        "--config", os.path.join(ROOT, "configs", "test_tiny.py"), "--steps", "1", "--warmup", "1",
                        "--set", "training.chunk_size=4"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=main_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert [res["variant"] for res in out["results"]] == ["train", "random_params", "random_data"]
    for res in out["results"]:
        assert "error" not in res, res
        assert len(res["step_s"]) == 1 and len(res["first_steps_s"]) == 1
        assert res["s_per_step"] > 0 and res["chunks_per_step"] >= 1
        assert res["s_per_chunk"] <= res["s_per_step"] and res["chunk_size"] == 4


def test_benchmark_workers_run_with_the_training_commands_allocator():
    """Every timed part gets what `python -m dpdm_jax.main` runs with: tcmalloc where it would
    preload it, glibc's malloc with DPDM_NO_TCMALLOC=1, and a user's own LD_PRELOAD untouched."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from per_example_grads import worker_environment

    from dpdm_jax.main import tcmalloc_preload

    env, allocator = worker_environment({"PATH": "/bin"})
    assert allocator == (tcmalloc_preload({}) or "glibc malloc")
    assert env.get("LD_PRELOAD") == tcmalloc_preload({}) and env["PATH"] == "/bin"
    assert worker_environment({"DPDM_NO_TCMALLOC": "1"})[1] == "glibc malloc"
    env, allocator = worker_environment({"LD_PRELOAD": "/opt/my_malloc.so"})
    assert allocator == env["LD_PRELOAD"] == "/opt/my_malloc.so"


def test_per_example_grads_reports_each_ratio_against_issue_14s_target():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from per_example_grads import against_targets

    got = against_targets({"jax_dp_throughput_over_opacus": 1.47, "jax_dp_time_over_jax_nonprivate": 1.05,
                           "opacus_time_over_torch_nonprivate": 1.9})
    assert got == {"jax_dp_throughput_over_opacus": {"value": 1.47, "target": ">= 1.5", "met": False},
                   "jax_dp_time_over_jax_nonprivate": {"value": 1.05, "target": "<= 1.25", "met": True}}
    assert against_targets({"jax_dp_throughput_over_opacus": 1.5})["jax_dp_throughput_over_opacus"]["met"]
    assert against_targets({}) == {}
