"""A warm dbt: every dbt command of a Dagster process runs in a fork of one process that has
already imported dbt.

Profiled (docs/benchmarks.md), a dbt process spends about 3 s importing dbt (mostly
mashumaro compiling dbt's dataclasses) and building the JSON schemas it validates the
project and profile with, before it reads a single file; a full refresh of the platform is
four dbt commands, an incremental refresh as many. So the Dagster process starts one
server (`ensure_server`, from the dbt resource's setup for a run), which imports dbt once,
listens on a Unix socket, and forks a child per command. dagster-dbt is unchanged: its dbt
executable is a small client (`client_executable`) that hands the server its command line,
environment, working directory and stdin/stdout/stderr, forwards SIGINT/SIGTERM to the
child and exits with the child's exit code. The child is a plain `dbt` process in every other
respect: the same entry point, its own environment and folder, its own connections, and
stdout (dbt's JSON log lines) going straight to dagster-dbt.

What keeps it safe:
- The server imports dbt, its PostgreSQL/Redshift adapters and the JSON schemas, and nothing
  that starts a thread (DuckDB starts one on import: the child imports it, 0.1 s), and never
  runs dbt itself, so each child starts from the state a fresh `dbt` would have after its
  imports. A server that finds a second thread anyway refuses to start.
- Given the project's parse state (the dbt resource passes the one the manifest's
  preparation saved), the server also reads and writes it once before forking: dbt's
  dataclasses compile their (de)serialisation code lazily, per process, which cost every
  command about a second of CPU. Only that class-level code is kept (`_compile_artifact_codecs`).
- Each command also compiled the Jinja templates of the macros it calls (dbt keeps them in a
  process-wide cache keyed by the macro's text): about 100 macros, half a second, again in
  every command. A child reports the macro texts it compiled when it exits (a file in the
  server's private folder); the server compiles them into that same cache before its next
  fork, so later commands find them compiled (`_learn_templates`). Compiling a text needs
  nothing of the command that used it: a template is the same whichever node calls it.
- Without a server (not started, disabled with DBT_WARM_START=0, or gone) the client
  replaces itself with the environment's own `dbt` (exec): the same command, cold.
- The server exits when the Dagster process that started it goes away (a pipe it holds
  closes), and kills its children then; a child whose client goes away (dagster-dbt killed
  it) gets SIGINT, as dbt would from Ctrl-C, and SIGKILL 10 s later.

Client and server code use only the standard library at import time: the client starts as a
new interpreter for every dbt command.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV_SOCKET = "PLATFORM_DBT_SERVER"          # the server's socket, for the client
ENV_SERVER_PID = "PLATFORM_DBT_SERVER_PID"  # the server's pid, for the client while it starts
START_TIMEOUT_S = 60.0                      # a client waits this long for a starting server
KILL_GRACE_S = 10.0                         # SIGINT, then SIGKILL after this many seconds
_HEADER = struct.Struct("!I")


def real_dbt() -> str:
    """The dbt next to this interpreter (a Dagster process started as .venv/bin/dagster
    without the venv on PATH would not find `dbt` otherwise)."""
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.exists() else "dbt"


# -- the client: dagster-dbt's dbt executable -------------------------------------------------
def client_path() -> str:
    """Where `client_executable` writes the client for this interpreter and user."""
    digest = hashlib.sha1(sys.executable.encode()).hexdigest()[:10]
    return str(Path(tempfile.gettempdir()) / f"platform-dbt-{os.getuid()}-{digest}" / "dbt")


def client_executable() -> str:
    """The client as an executable file running `client_main` with this interpreter (written
    if missing or different; OSError if it cannot be)."""
    path = Path(client_path())
    text = (f"#!{sys.executable}\n"
            "# dbt through the platform's warm dbt server (platform_assets/dbt_warm.py)\n"
            "import sys\nfrom platform_assets.dbt_warm import client_main\nsys.exit(client_main())\n")
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".dbt.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return str(path)


def _alive(pid: int) -> bool:
    """The process runs (a server that exited stays a zombie until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _connect(path: str) -> socket.socket | None:
    """The server's socket, waiting while the server (still alive) imports dbt."""
    deadline = time.monotonic() + START_TIMEOUT_S
    server_pid = int(os.environ.get(ENV_SERVER_PID) or 0)
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except OSError:
            conn.close()
        if not server_pid or not _alive(server_pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def client_main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = os.environ.get(ENV_SOCKET)
    conn = _connect(path) if path else None
    if conn is None:
        dbt = real_dbt()  # the client runs on the interpreter of the process that wrote it
        os.execv(dbt, [dbt, *args]) if os.path.isabs(dbt) else os.execvp(dbt, [dbt, *args])
    request = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
    conn.sendall(request)
    replies = conn.makefile("rb")
    started = replies.readline()
    if not started:
        print("dbt: the warm dbt server closed the connection before starting dbt", file=sys.stderr)
        return 1
    pid = json.loads(started)["pid"]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    finished = replies.readline()
    if not finished:
        print("dbt: the warm dbt server went away while dbt ran", file=sys.stderr)
        return 1
    return int(json.loads(finished)["exit"])


# -- the server -------------------------------------------------------------------------------
class Server:
    """Handle of a running server (the Dagster process's side)."""

    def __init__(self, process: subprocess.Popen, socket_path: str, keepalive: int):
        self.process, self.socket_path, self._keepalive = process, socket_path, keepalive

    def environ(self) -> dict[str, str]:
        return {ENV_SOCKET: self.socket_path, ENV_SERVER_PID: str(self.process.pid)}

    def stop(self) -> None:
        if self._keepalive >= 0:
            os.close(self._keepalive)  # the server sees the pipe close, stops its children, exits
            self._keepalive = -1
        try:
            self.process.wait(timeout=KILL_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(parse_state: str | None = None) -> Server:
    """A new server, a child of this process (in a session of its own, so a Ctrl-C meant for
    this process reaches dbt through the client, not the server). `parse_state`: a dbt
    partial-parse state of the project, to compile dbt's artifact code with before forking."""
    folder = tempfile.mkdtemp(prefix="platform-dbt-server-")
    socket_path = os.path.join(folder, "dbt.sock")
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "platform_assets.dbt_warm", socket_path, str(read_end),
             *([parse_state] if parse_state else [])],
            pass_fds=(read_end,), stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Server(process, socket_path, write_end)


_server: Server | None = None
_server_lock = threading.Lock()


def ensure_server(parse_state: str | None = None) -> Server:
    """This process's server (started on first use, stopped when the process exits), with
    its socket and pid in os.environ for the dbt processes dagster-dbt
    starts (it hands them a copy of os.environ)."""
    global _server
    with _server_lock:
        if _server is None or _server.process.poll() is not None:
            _server = start_server(parse_state)
            atexit.register(_server.stop)
        os.environ.update(_server.environ())
        return _server


def _import_dbt() -> None:
    """What every dbt command would import and build before reading the project."""
    import dbt.cli.main  # noqa: F401
    from dbt.contracts.project import (
        Configuration,
        PackageConfig,
        ProfileConfig,
        Project,
        ProjectFlags,
    )
    from dbt.contracts.selection import SelectorFile

    for cls in (Project, ProjectFlags, SelectorFile, Configuration, PackageConfig, ProfileConfig):
        cls.json_schema()
    for adapter in ("postgres", "redshift"):  # not duckdb: importing it starts a thread
        try:
            module = __import__(f"dbt.adapters.{adapter}", fromlist=["Plugin"])
            module.Plugin.credentials.json_schema()
        except ImportError:
            continue


def _compile_artifact_codecs(parse_state: str | None) -> None:
    """Compile the (de)serializers every dbt command compiles before it runs anything.

    dbt's dataclasses compile their to/from-dict and msgpack code lazily (mashumaro), on a
    process's first use: each command spent about a second of CPU reading the partial-parse
    state and writing manifest.json. Reading a parse state of the project (`parse_state`,
    the one the manifest's preparation saved) and serialising it once compiles that code
    here, before the fork. Only class-level code is cached: the manifest is dropped, dbt's
    global flags are put back, and the manifest's lock is a fork-context one (a spawn-context
    lock would start multiprocessing's resource tracker, which the children would share)."""
    if not parse_state or not os.path.isfile(parse_state):
        return
    import multiprocessing
    from argparse import Namespace
    from unittest import mock

    import dbt.contracts.graph.manifest as manifest_module
    from dbt.flags import get_flags, set_flags

    saved = get_flags()
    with mock.patch.object(manifest_module, "get_mp_context", lambda: multiprocessing.get_context("fork")):
        manifest = manifest_module.Manifest.from_msgpack(Path(parse_state).read_bytes())
        set_flags(Namespace(SEND_ANONYMOUS_USAGE_STATS=False))
        try:
            manifest.writable_manifest().to_dict(omit_none=False)
            manifest.to_msgpack()
        finally:
            set_flags(saved)
    del manifest


class _MacroText:
    """What dbt's template cache reads of a macro: its text."""

    def __init__(self, macro_sql: str):
        self.macro_sql = macro_sql


def _compiled_templates() -> set[str]:
    """The macro texts whose templates this process has compiled (dbt's cache keys)."""
    from dbt_common.clients.jinja import template_cache

    return set(template_cache.file_cache)


def _report_templates(path: str, known: set[str]) -> None:
    """In the child, as it exits: the macro texts it compiled that the server had not."""
    new = sorted(_compiled_templates() - known)
    if new:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(new, f)
        os.replace(tmp, path)


def _learn_templates(path: str) -> int:
    """In the server, after a child exits: compile the templates it reported, so the next
    children inherit them. Returns how many were compiled."""
    from dbt_common.clients.jinja import template_cache

    try:
        with open(path) as f:
            texts = json.load(f)
        os.unlink(path)
    except (OSError, ValueError):
        return 0
    compiled = 0
    for text in texts if isinstance(texts, list) else []:
        if not isinstance(text, str) or text in template_cache.file_cache:
            continue
        try:
            template_cache.get_node_template(_MacroText(text))
        except Exception:  # noqa: BLE001 - an optimisation: the child compiles it itself
            continue
        compiled += 1
    return compiled


def _child(request: dict, fds: list[int], report_to: str | None = None) -> None:
    """In the forked child: become the dbt process the client asked for. Never returns.
    `report_to`: where to report the macro templates it compiled (`_report_templates`)."""
    code = 1
    known = _compiled_templates() if report_to else set()
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdout.reconfigure(line_buffering=True)
        sys.argv = ["dbt", *request["argv"]]
        from dbt.cli.main import cli

        try:
            cli.main(args=request["argv"], prog_name="dbt", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the command's stderr, as dbt would
        import traceback

        traceback.print_exc()
    finally:
        try:
            # What a normal interpreter exit does (multiprocessing's finalizers release the
            # semaphores dbt made, logging flushes dbt.log), without unwinding into the server.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            if report_to:
                _report_templates(report_to, known)
        finally:
            os._exit(code)


def serve(socket_path: str, keepalive_fd: int, parse_state: str | None = None) -> None:
    _import_dbt()
    try:
        _compile_artifact_codecs(parse_state)
    except Exception as exc:  # noqa: BLE001 - an optimisation: dbt compiles the code itself
        print(f"warm dbt server: could not pre-compile dbt's artifact code from {parse_state}: {exc!r}",
              file=sys.stderr)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        sys.exit(f"warm dbt server: {threads} threads after importing dbt; not forking (dbt runs cold)")
    # Children are reaped through their pidfds; the server's own signals stay default.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(keepalive_fd, selectors.EVENT_READ, "parent")
    running: dict[int, dict] = {}  # pid -> {conn, pidfd, kill_at}

    def templates_report(pid: int) -> str:
        return os.path.join(os.path.dirname(socket_path), f"templates-{pid}.json")

    def start(conn: socket.socket) -> None:
        msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
        if len(msg) < _HEADER.size or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        (size,) = _HEADER.unpack(msg)
        data = bytearray()
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        pid = os.fork()
        if pid == 0:
            listener.close()
            os.close(keepalive_fd)
            for other in running.values():
                other["conn"].close()
            conn.close()
            _child(json.loads(bytes(data)), fds, report_to=templates_report(os.getpid()))
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        running[pid] = {"conn": conn, "pidfd": pidfd, "kill_at": None}
        sel.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        sel.register(conn, selectors.EVENT_READ, ("client", pid))
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")

    def unregister(fileobj) -> None:
        try:
            sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass  # already

    def finish(pid: int) -> None:
        child = running.pop(pid)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        unregister(child["pidfd"])
        unregister(child["conn"])
        os.close(child["pidfd"])
        try:
            child["conn"].sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode() + b"\n")
        except OSError:
            pass
        child["conn"].close()
        # The client has its exit code: compile what the child reported before the next fork.
        _learn_templates(templates_report(pid))

    def interrupt(pid: int) -> None:
        child = running[pid]
        unregister(child["conn"])  # the client is gone, or the server stops: nothing more to read
        if child["kill_at"] is None:
            child["kill_at"] = time.monotonic() + KILL_GRACE_S
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    stopping = False
    while not stopping or running:
        deadlines = [c["kill_at"] for c in running.values() if c["kill_at"] not in (None, float("inf"))]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in sel.select(timeout):
            what = key.data
            if what == "accept":
                conn, _ = listener.accept()
                try:
                    start(conn)
                except OSError:
                    conn.close()
            elif what == "parent":
                # The Dagster process is gone (or stopped us): stop the children, then exit.
                sel.unregister(keepalive_fd)
                sel.unregister(listener)
                listener.close()
                stopping = True
                for pid in list(running):
                    if running[pid]["kill_at"] is None:
                        interrupt(pid)
            elif what[0] == "exited":
                finish(what[1])
            elif what[0] == "client" and what[1] in running:
                try:
                    gone = not running[what[1]]["conn"].recv(1, socket.MSG_PEEK)
                except OSError:
                    gone = True
                if gone:
                    interrupt(what[1])
        now = time.monotonic()
        for pid, child in running.items():
            if child["kill_at"] is not None and now >= child["kill_at"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child["kill_at"] = float("inf")
    folder = os.path.dirname(socket_path)
    try:
        os.unlink(socket_path)
        for leftover in os.listdir(folder):  # reports of children killed as they wrote them
            if leftover.startswith("templates-"):
                os.unlink(os.path.join(folder, leftover))
        os.rmdir(folder)
    except OSError:
        pass


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
