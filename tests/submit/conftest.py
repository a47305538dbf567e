"""Fixtures for the job submission tests: a real Slurm cluster."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from local_slurm import LocalSlurm, missing_tools


@pytest.fixture(scope="session")
def slurm():
    """A real two-node Slurm on loopback (installed with apt-get where missing), stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons (and apt-get, to install them) need root")
    if missing_tools() and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it (Debian)")
    # Not under pytest's tmp_path: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
