"""A real one-node SLURM on localhost for the launch tests: munged + slurmctld + slurmd in a fresh state directory.

Follows /work/shared/slurm/NOTES.md (Debian 12 `slurm-wlm` 22.05 + `munge`, as root, no systemd, no cgroups). Every
daemon is stopped by the pid in its pid file, also when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmtrain.train.heartbeat import pid_alive

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_tools() -> list[str]:
    """The SLURM / munge programs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [tool for tool in DAEMONS if shutil.which(tool, path=path) is None]


def try_install() -> str | None:
    """apt-get install slurm-wlm munge when missing and we are root; None on success, else why not."""
    if not missing_tools():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"missing {', '.join(missing_tools())} and cannot apt-get install slurm-wlm munge (not root / no apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out"
        if res.returncode != 0:
            return f"{' '.join(cmd)} failed: {res.stderr.strip()[-300:]}"
    return None if not missing_tools() else f"still missing {', '.join(missing_tools())} after apt-get install"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_of(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_alive = pid_alive  # a zombie counts as gone: the trainer's own check (mmtrain/train/heartbeat.py)


def stop_pid_file(pid_file: Path, timeout: float = 10.0) -> None:
    """SIGTERM the daemon named by `pid_file`, SIGKILL it if it is still there after `timeout`."""
    pid = _pid_of(pid_file)
    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@dataclass
class SlurmCluster:
    """One node (this host, 2 CPUs) and one partition `debug`; `env` has SLURM_CONF for client commands."""

    state: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = 2
    munge_dir: Path | None = None
    ports: tuple[int, int] = field(default_factory=lambda: (_free_port(), _free_port()))

    @property
    def conf(self) -> Path:
        return self.state / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def pid_file(self, daemon: str) -> Path:
        return self.state / f"{daemon}.pid"

    def write_conf(self) -> None:
        """slurm.conf for this host, the lines NOTES.md saw working (plus fast scheduling and requeue)."""
        for sub in ("state", "spool"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        free_mb = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024
        s = self.state
        self.conf.write_text(f"""\
ClusterName=mmtrain-test
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
# a requeued job is otherwise held ~120 s; the main scheduler loop is otherwise 60 s
AuthInfo=cred_expire=5,socket={self.munge_socket}
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
StateSaveLocation={s / 'state'}
SlurmdSpoolDir={s / 'spool'}
SlurmctldPidFile={self.pid_file('slurmctld')}
SlurmdPidFile={self.pid_file('slurmd')}
SlurmctldLogFile={s / 'slurmctld.log'}
SlurmdLogFile={s / 'slurmd.log'}
SlurmctldPort={self.ports[0]}
SlurmdPort={self.ports[1]}
NodeName={self.node} CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 \
RealMemory={max(1024, free_mb - 2048)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        """A private munged (own key, socket and pid file) so nothing outside this session is touched or needed.

        munged runs as the `munge` user and insists that its socket directory is traversable by everyone."""
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mmtrain-munge-", dir="/tmp"))
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o711)
        as_munge = ["runuser", "-u", "munge", "--"]
        m = self.munge_dir
        subprocess.run([*as_munge, "/usr/sbin/mungekey", "--create", f"--keyfile={m / 'munge.key'}"], check=True,
                       timeout=30, capture_output=True)
        subprocess.run([*as_munge, "/usr/sbin/munged", f"--socket={self.munge_socket}",
                        f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                        f"--seed-file={m / 'munged.seed'}", f"--key-file={m / 'munge.key'}"],
                       check=True, timeout=30, capture_output=True)
        deadline = time.time() + 15
        while time.time() < deadline:
            probe = subprocess.run(f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}", shell=True,
                                   capture_output=True, text=True, timeout=10, check=False)
            if probe.returncode == 0 and "Success" in probe.stdout:
                return
            time.sleep(0.2)
        raise RuntimeError("munged did not answer within 15 s")

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def start(self) -> None:
        self._start_munge()
        self.write_conf()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], check=True, timeout=30, env=self.env)
        deadline = time.time() + 30
        while time.time() < deadline:
            res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env,
                                 timeout=10, check=False)
            if res.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node is not idle after 30 s: {self.logs()}")

    def stop(self) -> None:
        """Cancel what is left and wait (≤ 20 s) until its processes are gone, then stop slurmd, slurmctld and
        munged by their pid files. Never raises: it runs in the fixture's teardown, also after a failure."""
        try:
            if self.conf.is_file():
                subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=10,
                               check=False)
                deadline = time.time() + 20  # KillWait=5: SIGTERM, then SIGKILL 5 s later
                while time.time() < deadline:
                    res = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                         timeout=10, check=False)
                    if res.returncode != 0 or not res.stdout.strip():
                        break
                    time.sleep(0.3)
        except (OSError, subprocess.SubprocessError):
            pass
        for daemon in ("slurmd", "slurmctld"):
            stop_pid_file(self.pid_file(daemon))
        if self.munge_dir is not None:
            stop_pid_file(self.munge_dir / "munged.pid")
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state / name
            if path.is_file():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---- client commands ------------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 30) -> str:
        res = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: rc {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, script: Path, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit `script` (sbatch options in `args`, then the script); returns the job id."""
        res = subprocess.run(["sbatch", "--parsable", *args, str(script)], env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=30, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RunTime, Restarts, ExitCode, ...); {} once it is forgotten."""
        res = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True, timeout=10, check=False)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", res.stdout.splitlines()[0]))

    def wait(self, job_id: int | str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                 "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"),
             timeout: float = 120, restarts: int | None = None) -> dict[str, str]:
        """Poll until the job is in one of `states` (and has restarted `restarts` times, when given)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", 0)) >= restarts):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
