"""Starts the real rankd binary (RANKD_BIN, default target/release/rankd) on a
demo repository in a temporary folder, on a free port and a socket of its own."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import rankd

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("RANKD_BIN", ROOT / "target" / "release" / "rankd"))


USERS = range(1, 51)


def history(u):
    return [(u * 7919 + j * 104729) % 100000 + 1 for j in range(1 + u % 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, models: Path, workdir: Path, port: int = 0, extra=()):
        self.models, self.workdir, self.port = models, workdir, port
        self.extra = list(extra)
        self.sock_path = workdir / "rankd.sock"
        self.proc = None
        self.http = None

    @property
    def unix(self) -> str:
        return f"unix://{self.sock_path}"

    def start(self) -> "Daemon":
        assert BIN.exists(), f"{BIN} is missing: build it with cargo build --release"
        self.log = open(self.workdir / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--models", str(self.models), "--http", f"127.0.0.1:{self.port}",
             "--uds", str(self.sock_path), "--snapshot-dir", str(self.workdir / "state"),
             *self.extra],
            stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, "RANKD_LOG": "info"},
        )
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready: "), f"no ready line: {line!r}\n{(self.workdir / 'stderr.log').read_text()}"
        self.http = next(p for p in line.strip().split("; ") if p.startswith("http://"))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    subprocess.run([str(BIN), "models", "generate", "--models", str(repo)], check=True,
                   stdout=subprocess.DEVNULL)
    # `slow`: batches wait 300 ms for company and the queue holds one request,
    # so a short deadline passes and a second request finds the queue full.
    slow = repo / "slow" / "1"
    shutil.copytree(repo / "demo" / "1", slow)
    toml = (slow / "model.toml").read_text()
    edited = toml.replace("max_queue_delay_us = 500", "max_queue_delay_us = 300000").replace(
        "max_queue_size = 1024", "max_queue_size = 1")
    assert edited != toml, "the demo batching settings moved"
    (slow / "model.toml").write_text(edited)
    return repo


@pytest.fixture(scope="session")
def broken_repo(demo_repo, tmp_path_factory) -> Path:
    """The demo models and `broken`, a model that fails to load."""
    repo = tmp_path_factory.mktemp("broken-models")
    for name in ("demo", "catalogues"):
        shutil.copytree(demo_repo / name, repo / name)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.toml").write_text('kind = "three_tower"\n')
    return repo


@pytest.fixture(scope="session")
def daemon(demo_repo, tmp_path_factory):
    d = Daemon(demo_repo, tmp_path_factory.mktemp("rankd")).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def with_state(daemon):
    """Users 1..50 with histories (a user without state scores every item 0)."""
    with rankd.Client(daemon.unix) as c:
        for u in USERS:
            c.upsert_user(u, history=history(u))
    return daemon


@pytest.fixture
def own_daemon(demo_repo, tmp_path):
    """A daemon of the test's own, on a fixed port, so it can be restarted at
    the same addresses."""
    d = Daemon(demo_repo, tmp_path, port=free_port()).start()
    yield d
    d.stop()


def wait_gone(path: Path, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while path.exists() and time.time() < end:
        time.sleep(0.02)
