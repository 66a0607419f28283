"""A real Slurm cluster on this machine for tests/test_slurm.py: a private munged, slurmctld and two slurmd (nodes
``rlhf-n1`` and ``rlhf-n2``, both this host, told apart by their ports), all in the foreground under a temporary
directory with their own ports, so nothing global (``/etc/slurm``, ``/etc/munge``, the system munged) is used or
changed. Needs Debian's ``slurm-wlm`` and ``munge`` packages (``scripts/install_slurm.sh``) and root (slurmd runs
the jobs as their users).

Everything started here, and everything its jobs start (Ray included), is stopped by :meth:`LocalSlurm.stop`: the
daemons by pid, then any process still carrying the cluster's ``SLURM_CONF`` in its environment or its directory in
its command line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SBIN = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
NODES = ("rlhf-n1", "rlhf-n2")


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def missing() -> str | None:
    """Why a local Slurm cannot start here (None when it can)."""
    absent = [name for name in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if which(name) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found): run `bash scripts/install_slurm.sh` as root"
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd runs the jobs as their users)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def processes_with(*marks: str) -> list[int]:
    """Processes (other than this one) with any of ``marks`` in their environment or command line."""
    encoded = [mark.encode() for mark in marks]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            data = (proc / "environ").read_bytes() + b"\0" + (proc / "cmdline").read_bytes() + b"\0"
        except OSError:  # gone, or a zombie
            continue
        if any(mark in data for mark in encoded):
            found.append(int(proc.name))
    return found


class LocalSlurm:
    """``start()`` brings the cluster up (nodes idle), ``stop()`` takes it and its jobs down and deletes its files."""

    def __init__(self, cpus_per_node: int | None = None) -> None:
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.daemons: list[subprocess.Popen] = []
        # Under /tmp with short paths (Ray's sockets live below); munged wants every directory above its socket
        # searchable by all.
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-slurm-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN}

    # ----- life cycle
    def start(self, timeout: float = 60) -> LocalSlurm:
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
            self._wait_for_idle_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.conf.exists() and all(p.poll() is None for p in self.daemons[:2]):  # munged and slurmctld up
            subprocess.run([which("scancel"), "--full", "--user", "root"], env=self.env, capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 20
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.daemons):  # slurmd, then slurmctld, then munged
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()
        self.kill_leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill_leftovers(self) -> list[int]:
        """SIGKILL whatever the cluster's jobs left running; returns their pids (none after a clean run)."""
        # the daemons, their job steps and whatever those started: SLURM_CONF is in all their environments
        left = processes_with(f"SLURM_CONF={self.conf}\0", str(self.dir))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")  # noqa: SIM115 (the daemon writes it until stopped)
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def _start_munge(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o755)
        (self.dir / "log").mkdir()
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = munge / "munge.socket"
        self._spawn("munged", [which("munged"), "--foreground", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}"])
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.daemons[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        nodes = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                          f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for node in NODES)
        self.conf.write_text(f"""\
ClusterName=rlhftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_for_idle_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited at start-up:\n{self.logs()}")
            out = subprocess.run([which("sinfo"), "--noheader", "--Node", "--format=%N %t"], env=self.env,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out.count("idle") == len(NODES):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm nodes are not idle after {timeout:.0f} s ({out}):\n{self.logs()}")
            time.sleep(0.5)

    # ----- jobs
    def sbatch(self, script: Path, args: list[str], options: list[str], env: dict[str, str], cwd: Path) -> int:
        """Submit ``script args`` with sbatch ``options`` from ``cwd``; the job gets ``env`` (and this SLURM_CONF)."""
        env = {**env, "SLURM_CONF": self.env["SLURM_CONF"], "PATH": self.env["PATH"]}
        proc = subprocess.run([which("sbatch"), "--parsable", *options, str(script), *args], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, NodeList...)."""
        out = subprocess.run([which("scontrol"), "--oneliner", "show", "job", str(job_id)], env=self.env,
                             capture_output=True, text=True, timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def jobs(self) -> list[str]:
        out = subprocess.run([which("squeue"), "--noheader", "--format=%i"], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout
        return out.split()

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job has ended; on ``timeout`` cancel it and raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return info
            if time.monotonic() > deadline:
                subprocess.run([which("scancel"), "--full", str(job_id)], env=self.env, timeout=30)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.dir / "log").glob("*")))
