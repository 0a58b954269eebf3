"""Multi-process tensor parallelism: one jax process per host (or per device group), joined by
``jax.distributed`` with gloo collectives on CPU. nx invents no transport of its own.

Each process runs the same program (SPMD); the launcher below starts N local processes with the
environment jax needs. Across machines, run the same command on every host with
``NX_COORDINATOR=<host0>:<port> NX_NUM_PROCESSES=<N> NX_PROCESS_ID=<i>`` set by hand or by your
scheduler (e.g. from SLURM variables).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ENV_COORDINATOR = "NX_COORDINATOR"
ENV_NUM_PROCESSES = "NX_NUM_PROCESSES"
ENV_PROCESS_ID = "NX_PROCESS_ID"

_initialized = False


def num_processes() -> int:
    """Processes in this nx process group (1 unless launched by `launch` or NX_* variables)."""
    return int(os.environ.get(ENV_NUM_PROCESSES, "1"))


def initialize_from_env() -> None:
    """Join the process group described by the NX_* variables (no-op when they are unset)."""
    global _initialized
    n = num_processes()
    if n <= 1 or _initialized:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=n,
        process_id=int(os.environ[ENV_PROCESS_ID]),
    )
    _initialized = True


def is_leader() -> bool:
    """True in the process that should print results (process 0, or the only one)."""
    return int(os.environ.get(ENV_PROCESS_ID, "0")) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], num_processes: int) -> int:
    """Run ``python -m nx.cli <argv>`` as `num_processes` cooperating local processes.

    Process 0's output is passed through; the others' output is shown only if they fail.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(num_processes):
        env = {**os.environ, ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(i)}
        out = None if i == 0 else subprocess.PIPE
        procs.append(subprocess.Popen([sys.executable, "-m", "nx.cli", *argv], env=env, stdout=out, stderr=out))
    codes = []
    for i, p in enumerate(procs):
        stdout, stderr = p.communicate()
        codes.append(p.returncode)
        if p.returncode and i > 0:
            sys.stderr.write(f"[process {i}] exited with {p.returncode}\n{(stderr or b'').decode()[-4000:]}\n")
    return max(codes, key=abs)
