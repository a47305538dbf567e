"""A real Slurm cluster of two nodes on loopback, in a temporary folder (Debian's slurm-wlm packages).

Debian's build runs several slurmd on one host: nodes n1 and n2 are both 127.0.0.1 on distinct ports.
Everything (munge socket, state, spool, logs, pid files) lives under the folder; the daemons run in the
foreground as children of the test process and are stopped by their pids.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from ports import free_ports

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ["n1", "n2"]


def missing_tools() -> list[str]:
    return [p for p in ["slurmctld", "slurmd", "sbatch", "munged"] if not shutil.which(p)]


def install_packages() -> None:
    """apt-get the Slurm daemons, client tools and munge where they are missing (CI machines start clean)."""
    if not missing_tools():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, check=True, capture_output=True, timeout=600)



SLURM_CONF = """\
ClusterName=loopback
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what the client tools need (SLURM_CONF)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        install_packages()
        for sub in ["munge", "state", "log", "spool/n1", "spool/n2"]:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants a socket folder it owns, that everyone may enter and no one else may write to.
        self.root.chmod(0o755)
        shutil.chown(self.root / "munge", "munge", "munge")
        (self.root / "munge").chmod(0o755)
        ctld_port, n1_port, n2_port = free_ports(3)
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
        munge = self.root / "munge"
        self._spawn(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "--foreground",
                     f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"])
        self._wait(lambda: (munge / "munge.socket").exists(), "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"]), "slurmctld")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%t"]).stdout.split() == ["idle"], "both slurmd idle")

    def stop(self) -> None:
        """Cancel what is left (a failed test's job) and wait for it, so no trainer outlives its slurmd."""
        if self._ok(["scontrol", "ping"]):
            self.run(["scancel", "--user", "root"])
            deadline = time.time() + 60
            while self.run(["squeue", "--noheader"]).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=False, env=self.env, capture_output=True, text=True, timeout=60)

    def _ok(self, args: list[str]) -> bool:
        return self.run(args).returncode == 0

    def _spawn(self, args: list[str]) -> None:
        name = next(a for a in args if not a.startswith("-") and a != "setpriv")
        with open(self.root / "log" / f"{name}-{len(self.procs)}.out", "w") as log:  # the daemon keeps its copy
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def logs(self, chars: int = 3000) -> str:
        """The end of every daemon's log, for a failure message."""
        return "\n".join(f"== {f.name}:\n{f.read_text()[-chars:]}" for f in sorted((self.root / "log").iterdir()))

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"{what} did not start (exited: {dead})\n{self.logs()}")
            time.sleep(0.2)
