"""Multi-host: the secret seed is broadcast losslessly, and hosts must agree before the first step."""
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_hosts(workdir):
    port = str(20000 + random.randrange(20000))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", port, "2", str(i), workdir],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        outs.append(dict(line.split("=", 1) for line in out.splitlines() if "=" in line))
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
def test_two_hosts_share_a_full_width_seed_and_refuse_different_data(tmp_path):
    host0, host1 = run_two_hosts(str(tmp_path / "run"))
    # seed=-1: one fresh secret seed, identical on both hosts, in range (was: low 32 bits, often negative).
    assert host0["SEED"] == host1["SEED"] and 0 <= int(host0["SEED"]) < 2**62
    # A seed >= 2**40 survives the broadcast with all its bits.
    assert int(host0["BIG"]) == int(host1["BIG"]) == 2**61 + 2**40 + 12345
    # Host 1 has another data.max_examples: both hosts refuse before the first step, naming the data.
    for host in (host0, host1):
        assert "AGREE" not in host
        assert "disagree" in host["REFUSED"] and "training data" in host["REFUSED"]
