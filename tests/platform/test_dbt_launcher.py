"""platform-dbt, the dbt executable of the platform's DbtCliResource: `--version` answers the
installed dbt-core without touching the network (dbt's own asks PyPI), and every other
command is dbt's, unchanged."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from platform_assets.dbt_project import DBT_EXECUTABLE

BIN = Path(sys.executable).parent


@contextmanager
def recording_proxy() -> Iterator[tuple[dict[str, str], list[bytes]]]:
    """An environment whose HTTP(S) proxy is a local listener, and what reached it: any
    request to the network goes there first, and is refused after being recorded."""
    seen: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(200))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy)
    try:
        yield env, seen
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_the_resource_runs_platform_dbt():
    assert Path(DBT_EXECUTABLE) == BIN / "platform-dbt"


def test_version_is_the_installed_dbt_core_without_the_network():
    with recording_proxy() as (env, seen):
        ours = subprocess.run([DBT_EXECUTABLE, "--version"], env=env, capture_output=True, text=True, timeout=60)
        assert ours.returncode == 0, ours.stderr
        assert f"installed: {version('dbt-core')}" in ours.stdout
        assert seen == [], seen
        # the control: dbt's own --version does go to the network (so the proxy would have seen ours)
        theirs = subprocess.run([str(BIN / "dbt"), "--version"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert theirs.returncode == 0, theirs.stderr
        assert any(b"pypi.org" in request for request in seen), seen


def test_other_commands_are_dbts_own(tmp_path):
    ours = subprocess.run([DBT_EXECUTABLE, "--help"], capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([str(BIN / "dbt"), "--help"], capture_output=True, text=True, timeout=120)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    # a failing command fails the same way, its arguments passed as given
    args = ["parse", "--project-dir", str(tmp_path / "no such project"), "--target", "it's \"quoted\""]
    ours = subprocess.run([DBT_EXECUTABLE, *args], capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([str(BIN / "dbt"), *args], capture_output=True, text=True, timeout=120)
    assert ours.returncode == theirs.returncode != 0
    assert "no such project" in ours.stdout + ours.stderr
