"""Fixtures of the Python SDK tests: the `dhsa` binary (DHSA_CLI, set by CMake), a `dhsa serve` each
test module starts on a free loopback port and stops, fresh seeds, and a scratch directory."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

DHSA_CLI = os.environ.get("DHSA_CLI", "")


class Server:
    """`dhsa serve --workers N --listen 127.0.0.1:0` as a child process; `target` is its router."""

    def __init__(self, log_path, workers=2, extra=()):
        if not DHSA_CLI or not os.path.exists(DHSA_CLI):
            raise RuntimeError(f"DHSA_CLI must name the dhsa binary; got '{DHSA_CLI}'")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [DHSA_CLI, "serve", "--workers", str(workers), "--listen", "127.0.0.1:0",
             "--stripe-tokens", "512", "--threads", "1", *extra],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.target = self._wait_for_address()

    def _wait_for_address(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                m = re.search(r"router on (\S+:\d+)", f.read())
            if m:
                return m.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        with open(self.log_path) as f:
            raise RuntimeError(f"dhsa serve did not start:\n{f.read()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("serve") / "serve.log"))
    yield s
    s.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of this test alone (for tests that kill or stop it)."""
    s = Server(str(tmp_path / "serve.log"), workers=1)
    yield s
    s.stop()


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}", file=sys.stderr)
    return np.random.default_rng(seed)


def run_cli(*args, check=True):
    """Runs `dhsa ARGS`; returns the CompletedProcess (stdout and stderr as text)."""
    p = subprocess.run([DHSA_CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"dhsa {' '.join(map(str, args))} exited {p.returncode}:\n"
                             f"{p.stdout}\n{p.stderr}")
    return p
