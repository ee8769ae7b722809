"""liverjax.host_memory: XLA:CPU's per-step buffers are faulted in once, then reused."""

import json
import os
import platform
import subprocess
import sys

import pytest

from liverjax import host_memory

# A training-like step in a fresh process: donated parameters, a 64 MB activation and its
# gradient as temporaries. Prints the median minor page faults of 32 steps after 3 warm-up steps.
# The median: with the policy the heap still grows now and then in the first few dozen steps
# (when the order in which XLA's threads free the buffers leaves no free block large enough; seen
# here in 2-6 of 24 steps, as late as the 20th), and then stays that size. glibc's defaults fault
# the temporaries in every step.
_STEP = """
import json, resource, statistics
from liverjax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

def step(w, x):
    loss = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)  # (8192, 2048) float32: 64 MB
    return w - 1e-3 * jax.grad(loss)(w), loss(w)

f = jax.jit(step, donate_argnums=0)
w, x = jnp.full((256, 2048), 0.01), jnp.ones((8192, 256))
for _ in range(3):
    w, s = f(w, x)
    s.block_until_ready()
faults = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w, s = f(w, x)
    s.block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_step": statistics.median(faults)}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's mallopt",
)


def _faults_per_step(policy: str) -> dict:
    env = {**os.environ, host_memory.ENV: policy, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as `python -m liverjax.main` on a laptop
    done = subprocess.run(
        [sys.executable, "-c", _STEP], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_step_buffers_are_reused_without_page_faults():
    reuse, system = _faults_per_step("reuse"), _faults_per_step("system")
    assert reuse["applied"] and not system["applied"]
    # 64 MB of temporaries is 16,384 pages of 4 KiB; glibc's defaults fault them in every step
    # (about 33,000 faults here), the policy not once after warm-up.
    assert reuse["faults_per_step"] < 256, reuse
    assert reuse["faults_per_step"] < system["faults_per_step"], (reuse, system)


def test_unknown_policy_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "fast")
    with pytest.raises(ValueError, match="LIVERJAX_HOST_MALLOC='fast'.*'reuse'.*'system'"):
        host_memory.keep_freed_memory()


def test_system_policy_changes_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "system")
    assert host_memory.keep_freed_memory() is False
