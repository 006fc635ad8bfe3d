"""A live local Dagster for the fault tests: `dagster dev` (webserver, daemon, code server)
on the test servers, with its own instance in a temp folder, and the CLI beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import yaml

from ..conftest import free_port
from ..platform.conftest import REPO_ROOT, platform_environ

BIN = Path(sys.executable).parent


@dataclass
class LiveDagster:
    url: str
    port: int
    home: Path
    environ: dict[str, str]
    log: Path
    config: dict

    def graphql(self, query: str, timeout: float = 30) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def claimed_slots(self, pool: str) -> list[dict]:
        data = self.graphql(f'{{ instance {{ concurrencyLimit(concurrencyKey: "{pool}") '
                            f'{{ claimedSlots {{ runId stepKey }} }} }} }}')
        return data["instance"]["concurrencyLimit"]["claimedSlots"]

    def cli(self, *args: str, **kwargs) -> subprocess.Popen:
        """A dagster CLI command in its own process group (as a shell runs a job)."""
        return subprocess.Popen([str(BIN / "dagster"), *args], env=self.environ, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kwargs)

    @contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(self.home)}), dg.DagsterInstance.get() as instance:
            yield instance

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def instance_config(**run_monitoring) -> dict:
    """The repository's local dagster.yaml with the test's overrides: short monitoring
    intervals, and auto-materialize disabled. The automation sensors still tick (the asset
    daemon runs them while `use_sensors` is true, its default), as do the platform's other
    sensors and schedules; a run one of them started would show in the tests' checks of the
    runs they made (none has so far)."""
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["run_monitoring"] = {**config["run_monitoring"], **run_monitoring}
    config["auto_materialize"] = {"enabled": False}
    return config


@contextmanager
def live_dagster(pg_env, folder: Path, config: dict, overrides: dict[str, str] | None = None,
                 cwd: Path = REPO_ROOT) -> Iterator[LiveDagster]:
    """`dagster dev -w workspace.yaml` (as `make ui`) run in `cwd`, its instance and warehouse
    file under `folder`; the CLI beside it in the same environment."""
    home = folder / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # No observation schedule tick during the test (it would only add runs to look at).
    overrides = {"SOURCE_OBSERVE_CRON": "0 0 1 1 *", **(overrides or {})}
    environ = {**os.environ, **platform_environ(pg_env, folder, "local", overrides),
               "DAGSTER_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    log = folder / "dagster-dev.log"
    with log.open("wb") as out:
        # Its own session, default signal handling: SIGTERM to the group stops every process.
        proc = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            env=environ, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    live = LiveDagster(url=f"http://127.0.0.1:{port}", port=port, home=home, environ=environ, log=log,
                       config=config)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"dagster dev exited ({proc.returncode}):\n{live.log_tail()}"
            assert time.monotonic() < deadline, f"dagster dev not ready after 240 s:\n{live.log_tail()}"
            try:
                data = live.graphql("{ assetNodes { id } instance { daemonHealth { allDaemonStatuses "
                                    "{ daemonType healthy } } } }", timeout=10)
                daemons = {d["daemonType"]: d["healthy"] for d in
                           data["instance"]["daemonHealth"]["allDaemonStatuses"]}
                if data["assetNodes"] and daemons.get("SENSOR") and daemons.get("MONITORING"):
                    break
            except (OSError, AssertionError, KeyError, TypeError):
                pass
            time.sleep(1)
        yield live
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
