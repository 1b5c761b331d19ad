"""Multi-process training (jax.distributed on localhost, gloo CPU collectives) equals one process."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test_tiny
from dpdm_jax import experiment, train
from dpdm_jax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.training.max_steps=2", "--config.training.sample_every=-1"]


def final_state(workdir):
    config = test_tiny.get_config()
    template = train.state_template(config, experiment.build_model(config))
    state, meta = Checkpointer(os.path.join(workdir, "checkpoints")).restore(2, template)
    return jax.device_get(state), meta


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    multi = str(tmp_path / "multi")
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", "configs/test_tiny.py", multi, *FLAGS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    single = str(tmp_path / "single")
    out = subprocess.run([sys.executable, "-m", "dpdm_jax.main", "--config=configs/test_tiny.py",
                          f"--workdir={single}", *FLAGS],
                         cwd=REPO, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    (s_multi, m_multi), (s_single, m_single) = final_state(multi), final_state(single)
    assert m_multi["ledger"] == m_single["ledger"]
    for a, b in zip(jax.tree.leaves(s_multi.params), jax.tree.leaves(s_single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """A preempted host: jax.distributed's sync point stops both processes after one step, checkpointed."""
    import signal
    import time

    workdir, port = str(tmp_path / "run"), 20000 + os.getpid() % 20000
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dpdm_jax.main", "--config=configs/test_tiny.py", f"--workdir={workdir}",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                 "--config.dp.epochs=50", "--config.training.checkpoint_every=1000",
                 "--config.training.sample_every=-1"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 900
        while "step 3/200" not in open(logs[0], errors="replace").read():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, open(logs[0]).read()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # one host is preempted
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(log, errors="replace").read() for log in logs]
    assert codes == [143, 143], [t[-2000:] for t in texts]
    stopped = [[line for line in t.splitlines() if line.startswith("stopped: preempted")] for t in texts]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped  # the same step on both
    step = int(stopped[0][0].split("after step ")[1].split(":")[0])
    assert 3 <= step < 200 and Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [step]
