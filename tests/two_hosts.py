"""Two hosts on one machine for the cluster tests: two network namespaces joined by a virtual
link, each a Ray node with its own address, temp folder and processes.

Host A holds the Ray head (dashboard with token authentication on A's address) and moto's
S3 server; host B joins A over the link and runs in a mount namespace of its own in which
/tmp and the checkout are empty tmpfs folders, so any read of a path A's driver wrote or
the data it made fails on B. Addresses exist only inside the two namespaces: the machine's
own network is not touched, and every port is free (each namespace has its own).

Nothing here uses ``ray stop``, which would stop every Ray on the machine: a host's
processes are the namespace's own (``ip netns pids``), killed by process id. The
namespaces, their link and every process in them are removed by :meth:`TwoHosts.close`,
which the fixture calls also when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else "ray"
GCS_PORT, DASHBOARD_PORT, S3_PORT = 6379, 8265, 9000
ACCESS_KEY, SECRET_KEY = "two-hosts-key", "two-hosts-secret"  # moto accepts any; planted, searched for


def available() -> str | None:
    """Why two hosts cannot be made here (None: they can): root and ``ip netns`` are needed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"asdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Host:
    """One network namespace: a host with one address on the link."""

    def __init__(self, name: str, address: str, temp_dir: Path, hidden: tuple[str, ...] = ()):
        self.name, self.address, self.temp_dir, self.hidden = name, address, temp_dir, hidden

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host (its network; on B also its own mount namespace)."""
        inside = ["ip", "netns", "exec", self.name]
        if not self.hidden:
            return [*inside, *argv]
        mounts = " && ".join(f"mount -t tmpfs -o size=2g asd-hidden {path}" for path in self.hidden)
        script = f'{mounts} && exec "$@"'
        return [*inside, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "host", *argv]

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 300, check: bool = True):
        result = subprocess.run(
            self.command(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd="/"
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"on {self.name}: {' '.join(argv[:6])} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def pids(self) -> list[int]:
        """Every process of this host (the namespace's own)."""
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in listed.stdout.split() if p.strip().isdigit() and int(p) != os.getpid()]

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to every process of this host; how many there were."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)


class TwoHosts:
    """Hosts A (head, S3 server, driver) and B (a worker node that sees none of A's files)."""

    def __init__(self, root: Path, *, bucket: str, cpus: int = 2, resources: dict[str, float] | None = None):
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.root, self.bucket = root, bucket
        self.cpus, self.resources = cpus, dict(resources or {})
        self.token = secrets.token_hex(16)
        hidden = tuple(_outermost(["/tmp", str(REPO)]))
        # A's Ray folder: short (Ray's socket paths have a length limit), removed by close();
        # B's is inside its own empty /tmp, new at each start
        self.a_root = Path(tempfile.mkdtemp(prefix="asdA-", dir="/tmp"))
        self.a = Host(f"asdA{tag}", "10.77.0.1", self.a_root / "ray")
        self.b = Host(f"asdB{tag}", "10.77.0.2", Path("/tmp/ray"), hidden=hidden)
        self.link = (f"va{tag}", f"vb{tag}")
        self.s3_endpoint = f"http://{self.a.address}:{S3_PORT}"
        self.dashboard = f"http://{self.a.address}:{DASHBOARD_PORT}"
        self._moto: subprocess.Popen | None = None
        self._made = False

    # -- the machine's part: namespaces, link, servers, nodes --------------------------

    def start(self) -> TwoHosts:
        self._made = True
        for host in (self.a, self.b):
            _ip("netns", "add", host.name)
        va, vb = self.link
        _ip("link", "add", va, "netns", self.a.name, "type", "veth", "peer", "name", vb, "netns", self.b.name)
        for host, device in ((self.a, va), (self.b, vb)):
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", device)
            _ip("-n", host.name, "link", "set", device, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        log = open(self.root / "moto.log", "ab")
        self._moto = subprocess.Popen(
            self.a.command([sys.executable, "-m", "moto.server", "-H", self.a.address, "-p", str(S3_PORT)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        log.close()
        self.a.run(
            [
                RAY, "start", "--head", "--node-ip-address", self.a.address, "--port", str(GCS_PORT),
                "--dashboard-host", self.a.address, "--dashboard-port", str(DASHBOARD_PORT),
                *self._node_flags(self.a),
            ],
            self.env(),
        )  # fmt: skip
        self.start_b()
        self.wait_for_nodes(2)
        self.python_on_a(f"import os, boto3; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])"
                         f".create_bucket(Bucket={self.bucket!r})")  # fmt: skip
        return self

    def _node_flags(self, host: Host) -> list[str]:
        return [
            "--num-cpus", str(self.cpus), "--resources", json.dumps(self.resources),
            "--object-store-memory", str(150 * 1024**2), "--temp-dir", str(host.temp_dir),
            "--disable-usage-stats",
        ]  # fmt: skip

    def start_b(self) -> None:
        """Start (or start again) host B's node: it joins A's head over the link."""
        self.b.run(
            [
                RAY, "start", "--address", f"{self.a.address}:{GCS_PORT}",
                "--node-ip-address", self.b.address, *self._node_flags(self.b),
            ],
            self.env(),
        )  # fmt: skip

    def kill_b(self) -> int:
        """Host B lost: SIGKILL its raylet, workers and every other process of it."""
        return self.b.kill_all(signal.SIGKILL)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        """The cluster's alive nodes once there are ``count`` of them (asked from A)."""
        code = (
            "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(json.dumps([{'ip': n['NodeManagerAddress'], 'id': n['NodeID']} "
            "for n in ray.nodes() if n['Alive']]))"
        )
        deadline = time.monotonic() + timeout
        while True:
            result = self.a.run([sys.executable, "-c", code], self.env(RAY_ADDRESS=f"{self.a.address}:{GCS_PORT}"),
                                check=False)  # fmt: skip
            nodes = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
            if len(nodes) == count:
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(nodes)} node(s) alive, not {count}: {result.stderr[-2000:]}")
            time.sleep(2)

    def env(self, **extra: str) -> dict[str, str]:
        """What every node and client of this cluster has: the token, the endpoint, the keys."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RAY_", "AWS_", "STORAGE_EMULATOR"))
        }
        env.update(
            PYTHONPATH=str(REPO),  # this checkout on A (on B an empty folder: jobs bring their copy)
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
            AWS_ENDPOINT_URL=self.s3_endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            **extra,
        )
        return env

    # -- the user's part: commands on A -------------------------------------------------

    def asd_ray_on_a(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.a.run([sys.executable, "-m", "asd_ray", *argv], self.env(), timeout=timeout)

    def python_on_a(self, code: str, timeout: float = 300) -> str:
        return self.a.run([sys.executable, "-c", code], self.env(), timeout=timeout).stdout

    def submit(self, *argv: str, submission_id: str | None = None, wait: bool = True, timeout: float = 900):
        """``ray job submit`` from A of ``python jobs/imagenet_asd.py ARGV`` (the working dir:
        this checkout, uploaded through Ray, as users submit it)."""
        command = [
            RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
            *(["--submission-id", submission_id] if submission_id else []), *([] if wait else ["--no-wait"]),
            "--", sys.executable, "jobs/imagenet_asd.py", *argv,
        ]  # fmt: skip
        return self.a.run(command, self.env(), timeout=timeout, check=False)

    def job_status(self, submission_id: str, until: tuple[str, ...] = (), timeout: float = 120) -> str:
        """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), asked with Ray's
        job SDK on A; with ``until``, once it is one of those (or ``timeout`` s passed)."""
        code = (
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
        )
        deadline = time.monotonic() + timeout
        while True:
            said = self.a.run(
                [sys.executable, "-c", code, self.dashboard, submission_id], self.env(), check=False
            )
            status = said.stdout.strip().splitlines()[-1] if said.returncode == 0 and said.stdout.strip() else (
                f"UNKNOWN ({said.stderr.strip()[-300:]})"
            )  # fmt: skip
            if not until or status in until or time.monotonic() > deadline:
                return status
            time.sleep(1)

    def refusal_of(self, token: str) -> str:
        """What A's dashboard answers a client that lists the jobs with another ``token``
        ("" if it answers)."""
        code = (
            "import sys; from ray.job_submission import JobSubmissionClient as C; C(sys.argv[1]).list_jobs()"
        )
        env = {**self.env(), "RAY_AUTH_TOKEN": token, "HOME": str(self.a_root)}  # no ~/.ray/auth_token
        said = self.a.run([sys.executable, "-c", code, self.dashboard], env, check=False)
        return "" if said.returncode == 0 else said.stderr.strip().splitlines()[-1]

    def job_logs(self, submission_id: str) -> str:
        return self.a.run([RAY, "job", "logs", "--address", self.dashboard, submission_id], self.env(),
                          check=False).stdout  # fmt: skip

    def kill_driver(self) -> int:
        """SIGKILL the job's driver on A (the entrypoint's processes); how many there were."""
        killed = 0
        for pid in self.a.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"jobs/imagenet_asd.py" in cmdline and b"job\0submit" not in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        return killed

    def download(self, uri: str, target: Path) -> Path:
        """Copy every object under ``uri`` into local folder ``target`` (read on A)."""
        code = (
            "import sys; from pathlib import Path; import pyarrow.fs as f; from asd_ray import storage\n"
            "where = storage.location(sys.argv[1]); target = Path(sys.argv[2])\n"
            "for item in where.fs.get_file_info(f.FileSelector(where.fs_path, recursive=True)):\n"
            "    if item.type == f.FileType.File:\n"
            "        name = item.path[len(where.fs_path) + 1:]\n"
            "        (target / name).parent.mkdir(parents=True, exist_ok=True)\n"
            "        storage.download(storage.location(f'{where.scheme}://{item.path}'), target / name, limit=2**31)\n"
        )
        self.a.run([sys.executable, "-c", code, uri, str(target)], self.env())
        return target

    def close(self) -> None:
        """Every process of both hosts killed, the namespaces (and so the link) removed."""
        if not self._made:
            return
        for _ in range(3):
            if not (self.a.kill_all() + self.b.kill_all()):
                break
            time.sleep(1)
        try:
            if self._moto is not None:
                self._moto.wait(timeout=30)
        finally:
            for host in (self.a, self.b):
                subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            shutil.rmtree(self.a_root, ignore_errors=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without those inside another one (a checkout under /tmp is hidden with it)."""
    return [p for p in paths if not any(p != q and Path(p).is_relative_to(q) for q in paths)]
