"""Superset and the portal as local processes: Superset under `$LOCAL_DIR/bi`, the portal
under `$LOCAL_DIR/portal` (PORTAL_HOME, as `python -m bi serve` has it).

Superset's secrets (its SECRET_KEY and guest-token key, the service account's password) are
generated on the first `up` into `bi/secrets.env`, mode 0600, and handed to the processes
through their environment only; the portal keeps its session key in its own home
(bi/__main__.py). Superset's metadata is a SQLite file there; it serves through gunicorn
(threads) from `.venv-superset`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from platform_assets.settings import env_file_values

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPERSET_VENV = Path(os.environ.get("SUPERSET_VENV", REPO_ROOT / ".venv-superset"))
CONFIG_PATH = REPO_ROOT / "bi" / "superset" / "superset_config.py"
SERVICE_USER = "platform-service"
SECRET_NAMES = ("SUPERSET_SECRET_KEY", "SUPERSET_GUEST_TOKEN_JWT_SECRET", "SUPERSET_SERVICE_PASSWORD")


def load_or_create_secrets(folder: Path) -> dict[str, str]:
    """The installation's secrets, created once (0600) and read back afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secrets.env"
    values = env_file_values(path)
    missing = [n for n in SECRET_NAMES if not values.get(n)]
    if missing:
        values.update({n: secrets.token_urlsafe(48) for n in missing})
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("# generated on the first `make up`; never commit or print these\n")
            out.writelines(f"{k}={values[k]}\n" for k in SECRET_NAMES)
        os.replace(tmp, path)
    path.chmod(0o600)
    return {n: values[n] for n in SECRET_NAMES}


def wait_http(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{url}: the process exited ({proc.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")


class LocalServer:
    """A server in the background on 127.0.0.1:`port`, its log and pid file in `home`."""

    name: str  # the log's and the pid file's name
    home: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.home / f"{self.name}.pid"

    def running_pid(self) -> int | None:
        return running_pid(self.pidfile)

    def stop(self) -> None:
        stop_server(self.pidfile)


@dataclass
class SupersetServer(LocalServer):
    """One Superset installation: metadata, secrets and logs in `home`, served on `port`."""

    home: Path
    port: int
    portal_origins: tuple[str, ...] = ()
    workers: int = 1
    threads: int = 16
    name = "superset"

    def environ(self) -> dict[str, str]:
        s = load_or_create_secrets(self.home)
        return {
            **inherited("SUPERSET_"),
            "SUPERSET_CONFIG_PATH": str(CONFIG_PATH),
            "SUPERSET_SECRET_KEY": s["SUPERSET_SECRET_KEY"],
            "SUPERSET_GUEST_TOKEN_JWT_SECRET": s["SUPERSET_GUEST_TOKEN_JWT_SECRET"],
            "SUPERSET_METADATA_URI": f"sqlite:///{self.home / 'superset.db'}",
            "PORTAL_ORIGINS": " ".join(self.portal_origins),
            "FLASK_APP": "superset.app:create_app()",
            "SUPERSET_HOME": str(self.home),
        }

    def _run(self, *cmd: str, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            proc = subprocess.run(cmd, env=env or self.environ(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(Path(c).name for c in cmd[:3])} failed ({proc.returncode}); see {self.log}")

    def initialise(self) -> None:
        """Metadata schema, roles and the service account; once per home."""
        stamp = self.home / "initialised"
        if stamp.exists():
            return
        superset = str(SUPERSET_VENV / "bin" / "superset")
        self._run(superset, "db", "upgrade")
        self._run(superset, "init")
        # the password through the environment, never the command line (bi/superset/service_account.py)
        self._run(str(SUPERSET_VENV / "bin" / "python"), str(CONFIG_PATH.parent / "service_account.py"),
                  env={**self.environ(), "SUPERSET_SERVICE_USER": SERVICE_USER,
                       "SUPERSET_SERVICE_PASSWORD": load_or_create_secrets(self.home)["SUPERSET_SERVICE_PASSWORD"]})
        stamp.touch()

    def start(self, timeout: float = 120) -> subprocess.Popen | None:
        """gunicorn serving Superset, in its own session; returns once /health answers."""
        if self.running_pid():
            wait_http(f"{self.url}/health", None, None, timeout)
            return None
        self.initialise()
        cmd = [str(SUPERSET_VENV / "bin" / "gunicorn"), "-b", f"127.0.0.1:{self.port}",
               "-w", str(self.workers), "-k", "gthread", "--threads", str(self.threads),
               "--timeout", "120", "--keep-alive", "30", "--limit-request-line", "0", "--limit-request-field_size", "0",
               "superset.app:create_app()"]
        return spawn(cmd, self.environ(), self.home, self.log, self.pidfile, f"{self.url}/health", timeout)

# what a server inherits from the shell: not the rest (cloud credentials, tokens, a venv's paths)
INHERITED = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PLATFORM_ENV", "LOCAL_DIR",
             "PLATFORM_ENV_FILE")


def inherited(*prefixes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(prefixes)}


def running_pid(pidfile: Path) -> int | None:
    """The live process the pidfile names, if any."""
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, pidfile: Path, health_url: str,
          timeout: float) -> subprocess.Popen:
    """A server in a session of its own, output to `log`, pid in `pidfile`; returns once
    `health_url` answers, else stops it (a server that never answered is not left running)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)
    pidfile.write_text(str(proc.pid))
    try:
        wait_http(health_url, proc, log, timeout)
    except BaseException:
        stop_pid(proc.pid)
        pidfile.unlink(missing_ok=True)
        raise
    return proc


def stop_server(pidfile: Path) -> None:
    if pid := running_pid(pidfile):
        stop_pid(pid)
    pidfile.unlink(missing_ok=True)


def stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM to the process (gunicorn stops its workers), SIGKILL after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:  # the servers run in sessions of their own: gunicorn's workers go with their master
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        os.kill(pid, signal.SIGKILL)


@dataclass
class PortalServer(LocalServer):
    """The customer portal (`python -m bi serve`, bi/portal.py) from the platform's venv,
    embedding `superset`'s dashboard; its session key is the one PORTAL_HOME keeps."""

    home: Path  # PORTAL_HOME: the accounts, the session key, the log and the pid
    port: int
    superset: SupersetServer
    export_root: Path
    name = "portal"

    def environ(self) -> dict[str, str]:
        s = load_or_create_secrets(self.superset.home)
        return {**inherited("PORTAL_", "SUPERSET_"),
                "PORTAL_HOME": str(self.home), "PORTAL_HOST": "127.0.0.1", "PORTAL_PORT": str(self.port),
                "EXPORT_URI": str(self.export_root), "SUPERSET_URL": self.superset.url,
                "SUPERSET_SERVICE_USER": SERVICE_USER, "SUPERSET_SERVICE_PASSWORD": s["SUPERSET_SERVICE_PASSWORD"],
                "SUPERSET_PROVISIONED": str(self.superset.home / "provisioned.json")}

    def start(self, timeout: float = 60) -> subprocess.Popen | None:
        if self.running_pid():
            return None
        self.home.mkdir(parents=True, exist_ok=True)
        return spawn([sys.executable, "-m", "bi", "serve"], self.environ(), REPO_ROOT, self.log, self.pidfile,
                     f"{self.url}/health", timeout)


def provision(superset: SupersetServer, copy_path: Path, portal_origins: list[str]):
    """Import the dashboards against the BI copy, enable embedding; record the ids the
    portal needs in provisioned.json."""
    import json
    from dataclasses import asdict

    from .portal import write_private
    from .superset_api import SupersetClient

    client = SupersetClient(superset.url, SERVICE_USER, load_or_create_secrets(superset.home)[
        "SUPERSET_SERVICE_PASSWORD"])
    provisioned = client.provision(f"duckdb:///{copy_path}", portal_origins)
    # replaced whole: the running portal reads it for the embedded dashboard's uuid
    write_private(superset.home / "provisioned.json", json.dumps(asdict(provisioned), indent=1))
    return client, provisioned
