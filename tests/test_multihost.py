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
