"""The customer portal's export API, served for real (`python -m bi serve` on a free port) over
exports the platform's own exporter wrote: sign-in, single sign-on, sessions that end, 401/403,
path tampering and symlinks, byte-for-byte files with their as-of time, and a large export
streamed, not held in memory."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from bi.__main__ import main, portal_environ
from bi.portal import PortalConfig, PortalError, verify_password, write_accounts
from platform_assets.export_writers import ExportTarget, duckdb_exporter, relations_from_manifest

from ..conftest import free_port
from ..platform.test_exports import AS_OF, MANIFEST, _company_ids, build_warehouse
from .secrets_race import another_process_makes_secrets, read_or_make_secrets

REPO_ROOT = Path(__file__).resolve().parents[2]
SSO_SECRET = "sso-" + "k" * 40


@dataclass
class Portal:
    url: str
    process: subprocess.Popen
    exports: Path
    home: Path
    a: int
    b: int
    passwords: dict[str, str]

    def signed_in(self, company_id: int) -> requests.Session:
        session = requests.Session()
        user = f"company-{company_id}"
        r = session.post(f"{self.url}/login", data={"username": user, "password": self.passwords[user]},
                         allow_redirects=False, timeout=30)
        assert r.status_code == 303, r.text
        return session


def start_portal(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe nobody reads: a chatty server never blocks
        return subprocess.Popen([sys.executable, "-m", "bi", "serve"], cwd=REPO_ROOT, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for_portal(url: str, process, log) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the portal did not answer /health in 60 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("portal")
    ids = _company_ids()
    build_warehouse(folder / "warehouse.duckdb", ids)
    exports = folder / "exports"
    with duckdb_exporter([f"ATTACH '{folder / 'warehouse.duckdb'}' AS wh (READ_ONLY)"],
                         relations_from_manifest(MANIFEST), ExportTarget(root=str(exports))) as export:
        for cid in ids:
            export(cid, AS_OF)
    a, b = ids[0], ids[-1]  # a small id and the largest bigint
    home = folder / "portal"
    passwords = write_accounts(home, [a, b])
    port = free_port()
    log = folder / "portal.log"
    process = start_portal({"PORTAL_HOME": str(home), "EXPORT_URI": str(exports), "PORTAL_PORT": str(port),
                            "PORTAL_SESSION_SECRET": "s" * 48, "PORTAL_SSO_SECRET": SSO_SECRET}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_portal(url, process, log)
        yield Portal(url, process, exports, home, a, b, passwords)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _raw_get(url: str, path: str, cookie: str | None) -> tuple[int, bytes]:
    """A GET of exactly `path`, not normalised by a client library."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": f"portal_session={cookie}"} if cookie else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_export_api_serves_each_company_only_its_own_file(portal):
    a, b, url = portal.a, portal.b, portal.url
    csv = "training_report.csv"
    assert requests.get(f"{url}/api/exports/{a}/{csv}", timeout=30).status_code == 401
    assert requests.get(f"{url}/", allow_redirects=False, timeout=30).headers["location"] == "/login"
    for user, password in ((f"company-{a}", "wrong"), ("company-1", portal.passwords[f"company-{a}"]), ("", "")):
        assert requests.post(f"{url}/login", data={"username": user, "password": password},
                             timeout=30).status_code == 401

    session = portal.signed_in(a)
    for name in ("training_report.csv", "training_report.parquet"):
        with session.get(f"{url}/api/exports/{a}/{name}", stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            assert r.content == (portal.exports / f"company_id={a}" / name).read_bytes()
            assert r.headers["X-Data-As-Of"] == AS_OF.isoformat()
            assert r.headers["Cache-Control"] == "private, no-store"
            assert f"company_{a}_{name}" in r.headers["content-disposition"]
    assert session.get(f"{url}/api/exports/{b}/{csv}", timeout=30).status_code == 403
    assert f"/api/exports/{a}/{csv}" in session.get(f"{url}/", timeout=30).text
    # no SUPERSET_URL: exports only, no embedding to ask a guest token for
    assert session.post(f"{url}/api/guest-token", timeout=30).status_code == 404

    cookie = session.cookies["portal_session"]
    other = (portal.exports / f"company_id={b}" / csv).read_bytes()
    for path in (f"/api/exports/{a}/../{b}/{csv}", f"/api/exports/{a}/..%2F{b}%2F{csv}",
                 f"/api/exports/{a}/%2e%2e%2f%2e%2e%2fportal%2faccounts.json", f"/api/exports/{a}/accounts.json",
                 f"/api/exports/{a}%2F..%2Fcompany_id={b}/{csv}", f"/api/exports/0{a}/{csv}",
                 f"/api/exports/-{a}/{csv}", f"/api/exports/{a}.0/{csv}", f"/api/exports/{a}/{csv}%00.parquet",
                 f"/api/exports/company_id={b}/{csv}", f"/api/exports/{b}/{csv}"):
        status, body = _raw_get(url, path, cookie)
        assert status in (400, 403, 404), (path, status)
        assert other not in body and b"scrypt$" not in body, path

    assert session.post(f"{url}/logout", allow_redirects=False, timeout=30).status_code == 303
    assert session.get(f"{url}/api/exports/{a}/{csv}", timeout=30).status_code == 401
    # the cookie kept from before signing out is no session any more
    assert _raw_get(url, f"/api/exports/{a}/{csv}", cookie)[0] == 401
    # a session cookie forged with another key is no session
    forged = requests.Session()
    forged.cookies.set("portal_session", cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB"))
    assert forged.get(f"{url}/api/exports/{a}/{csv}", timeout=30).status_code == 401


class _PastSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 3600


def test_single_sign_on_takes_only_a_fresh_token_signed_with_the_key(portal):
    url, b = portal.url, portal.b

    def sso(token: str) -> requests.Session:
        session = requests.Session()
        session.get(f"{url}/sso", params={"token": token}, allow_redirects=False, timeout=30)
        return session

    good = URLSafeTimedSerializer(SSO_SECRET, salt="portal-sso")
    session = sso(good.dumps({"sub": "jane@customer-b", "company_id": b}))
    r = session.get(f"{url}/api/exports/{b}/training_report.parquet", timeout=60)
    assert r.status_code == 200 and r.content == (portal.exports / f"company_id={b}" / "training_report.parquet"
                                                   ).read_bytes()
    assert session.get(f"{url}/api/exports/{portal.a}/training_report.parquet", timeout=30).status_code == 403

    expired = URLSafeTimedSerializer(SSO_SECRET, salt="portal-sso", signer=_PastSigner)
    bad = [
        URLSafeTimedSerializer("another-key", salt="portal-sso").dumps({"sub": "x", "company_id": b}),
        expired.dumps({"sub": "x", "company_id": b}),
        good.dumps({"sub": "x", "company_id": f"{b} or 1=1"}),
        good.dumps({"sub": "x", "company_id": True}),
        good.dumps({"sub": "x", "company_id": -b}),
        good.dumps({"sub": "x"}),
        "",
    ]
    used = good.dumps({"sub": "joe@customer-b", "company_id": b})
    assert sso(used).get(f"{url}/api/exports/{b}/training_report.csv", timeout=30).status_code == 200
    # a token signs in once, whatever its text: base64 decodes variants of a signature alike
    bad += [used, used + "=", used + "==", *(used[:-1] + c for c in "AQgw" if c != used[-1])]

    # a company folder that links to another company's is not served
    c = b - 1
    (portal.exports / f"company_id={c}").symlink_to(portal.exports / f"company_id={portal.a}")
    try:
        linked = sso(good.dumps({"sub": "x@c", "company_id": c}))
        assert linked.get(f"{url}/api/exports/{c}/training_report.csv", timeout=30).status_code == 404
    finally:
        (portal.exports / f"company_id={c}").unlink()
    for token in bad:
        r = requests.get(f"{url}/sso", params={"token": token}, allow_redirects=False, timeout=30)
        assert r.status_code == 401, token
        assert "portal_session" not in r.cookies, token


def test_a_large_export_is_streamed_not_held_in_memory(portal, tmp_path):
    big = portal.exports / f"company_id={portal.a}" / "training_report.csv"
    saved = tmp_path / "saved.csv"
    big.rename(saved)
    try:
        block = b"enrollment,company,course,status\n" * 32768  # about 1 MiB
        with open(big, "wb") as f:
            for _ in range(256):
                f.write(block)
        server = psutil.Process(portal.process.pid)
        session = portal.signed_in(portal.a)  # sign-in (scrypt) and a first download before the baseline
        assert session.get(f"{portal.url}/api/exports/{portal.a}/training_report.parquet", timeout=60).ok
        before = server.memory_info().rss
        peak, received = before, 0
        with session.get(f"{portal.url}/api/exports/{portal.a}/training_report.csv", stream=True, timeout=120) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(1 << 20):
                received += len(chunk)
                peak = max(peak, server.memory_info().rss)
        assert received == big.stat().st_size == 256 * len(block)
        assert peak - before < 64 << 20, f"the server grew by {(peak - before) >> 20} MiB for a 264 MiB file"
    finally:
        big.unlink(missing_ok=True)
        saved.rename(big)


def test_sessions_end_with_their_account_and_odd_files_are_not_served(portal, tmp_path):
    a, url = portal.a, portal.url
    accounts_file = portal.home / "accounts.json"
    saved = accounts_file.read_text()
    session = portal.signed_in(a)
    try:
        accounts = json.loads(saved)
        del accounts[f"company-{a}"]
        accounts_file.write_text(json.dumps(accounts))
        assert session.get(f"{url}/api/exports/{a}/training_report.csv", timeout=30).status_code == 401
    finally:
        accounts_file.write_text(saved)
    assert session.get(f"{url}/api/exports/{a}/training_report.csv", timeout=30).status_code == 401  # ended

    # signing in again ends the session the cookie had
    session = portal.signed_in(a)
    first = session.cookies["portal_session"]
    user = f"company-{a}"
    assert session.post(f"{url}/login", data={"username": user, "password": portal.passwords[user]},
                        allow_redirects=False, timeout=30).status_code == 303
    assert _raw_get(url, f"/api/exports/{a}/training_report.csv", first)[0] == 401
    assert session.get(f"{url}/api/exports/{a}/training_report.csv", timeout=30).status_code == 200
    # an unreadable accounts file: the portal says so (503), it does not fail with a traceback
    try:
        accounts_file.write_text("{not json")
        assert session.get(f"{url}/api/exports/{a}/training_report.csv", timeout=30).status_code == 503
        assert requests.post(f"{url}/login", data={"username": user, "password": "x"}, timeout=30).status_code == 503
    finally:
        accounts_file.write_text(saved)

    folder = portal.exports / f"company_id={a}"
    parquet = folder / "training_report.parquet"
    kept = tmp_path / "kept.parquet"
    parquet.rename(kept)
    try:
        parquet.write_bytes(kept.read_bytes()[:200])  # a file cut short: served as it is, with no as-of
        r = portal.signed_in(a).get(f"{url}/api/exports/{a}/training_report.parquet", timeout=30)
        assert r.status_code == 200 and r.content == parquet.read_bytes() and "X-Data-As-Of" not in r.headers
        parquet.unlink()
        parquet.symlink_to(portal.home / "accounts.json")  # a link out of the export folder
        r = portal.signed_in(a).get(f"{url}/api/exports/{a}/training_report.parquet", timeout=30)
        assert r.status_code == 404 and b"scrypt" not in r.content
    finally:
        parquet.unlink(missing_ok=True)
        kept.rename(parquet)

    status = {}
    for name, body in (("fields", "&".join(f"f{i}=1" for i in range(20))), ("size", "username=" + "x" * 10000)):
        status[name] = requests.post(f"{url}/login", data=body, timeout=30,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code
    assert status == {"fields": 400, "size": 413}


def test_portal_settings_are_checked_and_named(tmp_path):
    base = {"PORTAL_HOME": str(tmp_path), "EXPORT_URI": str(tmp_path), "PORTAL_SESSION_SECRET": "s" * 40}
    for extra, named in (({"PORTAL_HTTPS_ONLY": "1"}, "PORTAL_HTTPS_ONLY='1'"),
                         ({"PORTAL_SSO_SECRET": "short"}, "PORTAL_SSO_SECRET is shorter"),
                         ({"PORTAL_SESSION_SECRET": "short"}, "PORTAL_SESSION_SECRET is shorter"),
                         ({"EXPORT_URI": "s3://"}, "EXPORT_URI='s3://' names no bucket"),
                         ({"EXPORT_URI": "ftp://host/exports"}, "EXPORT_URI='ftp://host/exports' must be"),
                         ({"EXPORT_S3_USE_SSL": "maybe"}, "EXPORT_S3_USE_SSL='maybe'"),
                         ({"PORTAL_HOME": ""}, "PORTAL_HOME"),
                         ({"SUPERSET_URL": "http://127.0.0.1:1"},
                          "SUPERSET_PORTAL_USER, SUPERSET_PORTAL_PASSWORD, "
                          "SUPERSET_EMBEDDED_UUID or SUPERSET_PROVISIONED"),
                         ({"SUPERSET_URL": "http://127.0.0.1:1", "SUPERSET_PORTAL_USER": "u",
                           "SUPERSET_PORTAL_PASSWORD": "p", "SUPERSET_EMBEDDED_UUID": "../1"},
                          "SUPERSET_EMBEDDED_UUID is not a uuid: '../1'")):
        with pytest.raises(PortalError, match=re.escape(named)):
            PortalConfig.from_env({**base, **extra})
    assert PortalConfig.from_env({**base, "PORTAL_HTTPS_ONLY": "true"}).https_only
    prod = {"PLATFORM_ENV": "prod", "EXPORT_URI": str(tmp_path), "PORTAL_HOME": str(tmp_path)}
    with pytest.raises(PortalError, match="PORTAL_SESSION_SECRET is not set"):
        portal_environ(prod)
    assert not (tmp_path / "secrets.json").exists()
    (tmp_path / "accounts.json").write_text("{not json")
    with pytest.raises(PortalError, match=re.escape(str(tmp_path / "accounts.json"))):
        write_accounts(tmp_path, [1])


def test_the_local_portal_gets_its_own_settings_and_restarts_when_they_change(tmp_path, monkeypatch):
    """The portal process is given the portal's Superset account, never the Admin's password,
    Superset's keys or a stale embedded uuid from the caller's shell; `start` leaves a portal
    running with today's settings alone and restarts one started with others."""
    from bi.local import PORTAL_USER, PortalServer, SupersetServer

    shell = ("SUPERSET_SERVICE_USER", "SUPERSET_SERVICE_PASSWORD", "SUPERSET_GUEST_TOKEN_JWT_SECRET",
             "SUPERSET_SECRET_KEY", "SUPERSET_EMBEDDED_UUID", "SUPERSET_METADATA_URI")
    for name in shell:
        monkeypatch.setenv(name, f"shell-{name}")
    monkeypatch.setenv("SUPERSET_PUBLIC_URL", "https://bi.example.com")
    monkeypatch.delenv("PORTAL_SSO_SECRET", raising=False)
    (tmp_path / "exports").mkdir()
    portal = PortalServer(tmp_path / "portal", free_port(), SupersetServer(tmp_path / "bi", free_port()),
                          str(tmp_path / "exports"))
    env = portal.environ()
    assert env["SUPERSET_PORTAL_USER"] == PORTAL_USER and env["SUPERSET_PUBLIC_URL"] == "https://bi.example.com"
    assert not set(shell) & env.keys() and not [v for v in env.values() if v.startswith("shell-")]
    stranger = subprocess.Popen(["sleep", "120"])  # took the pid of a portal that crashed
    try:
        portal.home.mkdir(parents=True)
        portal.pidfile.write_text(str(stranger.pid))
        assert portal.owned_pid() is None
        assert portal.start() is not None
        assert stranger.poll() is None, "a process that is not the portal was stopped"
        pid = portal.running_pid()
        assert pid != stranger.pid
        assert portal.start() is None and portal.running_pid() == pid  # nothing changed: left running
        monkeypatch.setenv("PORTAL_SSO_SECRET", "k" * 48)
        assert portal.start() is not None
        assert portal.running_pid() not in (None, pid)
        assert requests.get(f"{portal.url}/health", timeout=30).status_code == 200
    finally:
        portal.stop()
        stranger.kill()
        stranger.wait()
    assert not portal.stampfile.exists() and not portal.pidfile.exists()


def test_make_up_generates_the_bi_secrets_once(tmp_path):
    """`make up` ends with `python -m bi secrets`: Superset's keys, its two accounts' passwords and the
    portal's session key exist, 0600, before anything starts, are kept by a second call, and
    none is printed."""
    env = {**os.environ, "LOCAL_DIR": str(tmp_path), "PLATFORM_ENV_FILE": str(tmp_path / "none.env"),
           "PORTAL_HOME": "", "EXPORT_URI": "", "PORTAL_SESSION_SECRET": "", "PLATFORM_ENV": "local"}
    runs, kept = [], []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-m", "bi", "secrets"], cwd=REPO_ROOT, env=env,
                                   capture_output=True, text=True, timeout=120))
        assert runs[-1].returncode == 0, runs[-1].stderr
        files = {path: path.read_text()
                 for path in (tmp_path / "bi" / "secrets.env", tmp_path / "portal" / "secrets.json")}
        kept.append(files)
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
    assert kept[0] == kept[1]
    values = [line.split("=", 1)[1] for line in kept[0][tmp_path / "bi" / "secrets.env"].splitlines()
              if "=" in line and not line.startswith("#")]
    values.append(json.loads(kept[0][tmp_path / "portal" / "secrets.json"])["session_secret"])
    assert len(values) == 5 and all(len(v) >= 32 for v in values)
    assert not any(v in run.stdout + run.stderr for v in values for run in runs)
    prod = subprocess.run([sys.executable, "-m", "bi", "secrets"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**env, "LOCAL_DIR": str(tmp_path / "prod"), "PLATFORM_ENV": "prod"})
    assert prod.returncode == 0 and "secrets store" in prod.stdout, prod.stderr
    assert not (tmp_path / "prod").exists()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "@$(PY) -m localenv up && $(PY) -m bi secrets" in makefile


def test_processes_that_find_no_secrets_at_once_keep_one_set(tmp_path):
    """Processes that find no secrets at the same moment (`make up` beside `make bi`) end with the
    set the files keep, not keys of their own: each reads, and creates only what is missing,
    under the folder's lock. Here another process holds the locks while they start, and writes
    the secrets before it lets go."""
    env = {"LOCAL_DIR": str(tmp_path), "PLATFORM_ENV_FILE": str(tmp_path / "none.env"),
           "PORTAL_HOME": str(tmp_path / "portal"), "PLATFORM_ENV": "local", "EXPORT_URI": str(tmp_path / "exports")}
    from bi.local import SECRET_NAMES

    superset = {name: f"{name.lower()}-made-by-another" for name in SECRET_NAMES}
    (tmp_path / "bi").mkdir()
    (tmp_path / "portal").mkdir()
    # spawn, not fork: an xdist worker has threads of its own, and a fork can copy a lock one holds
    context = multiprocessing.get_context("spawn")
    locked, go, ready, out = context.Event(), context.Event(), context.Queue(), context.Queue()
    holder = context.Process(target=another_process_makes_secrets, args=(tmp_path, superset, locked, go),
                             daemon=True)
    workers = [context.Process(target=read_or_make_secrets, args=(env, ready, out), daemon=True) for _ in range(6)]
    try:
        holder.start()
        assert locked.wait(60)
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=60)
        time.sleep(1)
        assert out.empty(), "a process read or made secrets without the lock"
        go.set()
        results = [out.get(timeout=60) for _ in workers]
        for process in [holder, *workers]:
            process.join(timeout=60)
            assert process.exitcode == 0
    finally:
        go.set()
        for process in [holder, *workers]:
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(timeout=10)
    assert results == [(superset, "made-by-another")] * len(workers)
    assert sorted(p.name for p in (tmp_path / "bi").iterdir()) == [".secrets.lock", "secrets.env"]
    assert all((tmp_path / folder / name).stat().st_mode & 0o777 == 0o600
               for folder, name in (("bi", "secrets.env"), ("portal", "secrets.json")))


def test_accounts_are_made_per_exported_company_and_kept(portal, tmp_path, monkeypatch, capsys):
    # the defaults: exports under LOCAL_DIR/exports, the portal's files under LOCAL_DIR/portal
    shutil.copytree(portal.exports, tmp_path / "exports")
    (tmp_path / "exports" / "company_id=99").symlink_to(tmp_path)  # a link is no company
    home = tmp_path / "portal"
    env = {**os.environ, "LOCAL_DIR": str(tmp_path), "PLATFORM_ENV_FILE": str(tmp_path / "none.env"),
           "PORTAL_HOME": "", "EXPORT_URI": "", "PORTAL_SESSION_SECRET": "", "PLATFORM_ENV": "local"}
    first = subprocess.run([sys.executable, "-m", "bi", "accounts"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    accounts = json.loads((home / "accounts.json").read_text())
    companies = sorted(int(p.name.split("=")[1]) for p in portal.exports.iterdir())
    assert sorted(a["company_id"] for a in accounts.values()) == companies
    lines = (home / "accounts.txt").read_text().splitlines()
    assert len(lines) == len(companies)
    user, password = lines[0].split()
    assert verify_password(password, accounts[user]["password"]) and not verify_password(password + "x",
                                                                                          accounts[user]["password"])
    for name in ("accounts.json", "accounts.txt", "secrets.json"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name
    assert password not in (home / "accounts.json").read_text() and password not in first.stdout

    again = subprocess.run([sys.executable, "-m", "bi", "accounts"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"portal accounts: {len(companies)} companies, 0 new"
    assert json.loads((home / "accounts.json").read_text()) == accounts

    for extra, named in (({"EXPORT_URI": "ftp://host/exports"}, "EXPORT_URI='ftp://host/exports'"),
                         ({"PORTAL_PORT": "http"}, "PORTAL_PORT='http'")):
        with monkeypatch.context() as patched:
            for name, value in {**env, **extra}.items():
                patched.setenv(name, value)
            assert main(["serve"]) == 2  # before serving anything
        assert named in capsys.readouterr().err
