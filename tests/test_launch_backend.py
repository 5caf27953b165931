"""``launch.backend``: its config is checked before anything starts, what the Ray backend asks Ray
for, and Ray stays an optional extra (the end-to-end Ray runs: tests/test_launch_ray.py, slow)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from async_or1.config import ConfigError, load_config


@pytest.mark.parametrize("override, message", [
    ("launch.backend=slurm", "launch.backend"),
    ("launch.ray_generator_cpus=-1", "launch.ray_generator_cpus must be >= 0"),
    ("launch.ray_start_timeout_s=0", "launch.ray_start_timeout_s must be > 0"),
    ("launch.ray_learner_resources={learner_node: 0}", "launch.ray_learner_resources: 'learner_node'"),
    ("launch.ray_generator_resources={gen: yes}", "launch.ray_generator_resources: 'gen'"),
])
def test_bad_launch_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_ray_backend_needs_the_zmq_transport():
    with pytest.raises(ConfigError, match="launch.backend=ray .* transport.kind=zmq"):
        load_config(None, ["launch.backend=ray", "transport.kind=inproc"])


def test_ray_demands_per_learner_rank_and_generator():
    from async_or1.launch.ray import _demands

    cfg = load_config(None, ["launch.ray_learner_cpus=2", "launch.ray_generator_cpus=0.5",
                             "launch.ray_learner_resources={learner_node: 1}", "generation.engine=sglang",
                             "generation.sglang_tp_size=4"])
    assert _demands(cfg, "cuda") == ({"CPU": 2, "GPU": 1, "learner_node": 1}, {"CPU": 0.5, "GPU": 4})
    assert _demands(cfg, "cpu") == ({"CPU": 2, "learner_node": 1}, {"CPU": 0.5})
    torch_engine = load_config(None, ["generation.engine=torch"])
    assert _demands(torch_engine, "cuda")[1] == {"CPU": 1.0, "GPU": 1}


def test_loopback_is_lo_and_an_unknown_address_is_an_error():
    from async_or1.launch.ray import interface_of

    assert interface_of("127.0.0.1") == "lo"
    with pytest.raises(RuntimeError, match="192.0.2.77"):
        interface_of("192.0.2.77")  # TEST-NET-1: no interface of this machine holds it


def test_nothing_but_the_ray_backend_imports_ray():
    code = ("import sys, async_or1.cli, async_or1.launch, async_or1.launch.local, async_or1.launch.slurm, "
            "async_or1.learner.loop, async_or1.generation.worker; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
