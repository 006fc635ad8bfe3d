"""The warm dbt server (platform_assets/dbt_warm.py): a dbt command through its client is the
same command as through the environment's own dbt (output, exit code), runs in a fork of the
server, stops on SIGINT and when its client is killed, and without a server the client
falls back to the environment's dbt. On a tiny DuckDB project of the test's own, so nothing
here needs the replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from platform_assets import dbt_warm

PROJECT = {
    "dbt_project.yml": "name: tiny\nversion: '1.0.0'\nprofile: tiny\n",
    "profiles.yml": (
        "tiny:\n  target: dev\n  outputs:\n    dev:\n      type: duckdb\n"
        "      path: \"{{ env_var('TINY_DUCKDB') }}\"\n      threads: 1\n"
    ),
    "models/one.sql": "select 1 as id\n",
    "models/two.sql": "select id from {{ ref('one') }}\n",
    # a statement that runs until it is interrupted (minutes on any machine)
    "macros/slow.sql": (
        "{% macro slow() %}{% do run_query('select count(*) from range(100000000000) t(x) "
        "where x % 7 = 3') %}{% endmacro %}\n"
    ),
}


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "tiny"
    for name, text in PROJECT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    env = {**os.environ, "TINY_DUCKDB": str(tmp_path / "tiny.duckdb"), "DBT_PROFILES_DIR": str(root),
           "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DBT_TARGET_PATH": str(tmp_path / "target"),
           "DBT_LOG_PATH": str(tmp_path / "logs")}
    for name in (dbt_warm.ENV_SOCKET, dbt_warm.ENV_SERVER_PID):
        env.pop(name, None)
    return root, env


@pytest.fixture
def server():
    srv = dbt_warm.start_server()
    yield srv
    srv.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _run(cmd: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_warm_command_is_the_same_dbt_command(tiny, server):
    root, env = tiny
    client, plain = dbt_warm.client_executable(), dbt_warm.real_dbt()
    warm_env = {**env, **server.environ()}
    for args in (["ls", "--resource-type", "model", "-q"], ["build", "-q"], ["ls", "--target", "nope"]):
        cold = _run([plain, *args], root, env)
        warm = _run([client, *args], root, warm_env)
        print(f"\n{args}: exit {cold.returncode} / {warm.returncode}")
        assert warm.returncode == cold.returncode, (warm.stdout, warm.stderr)
        if cold.returncode == 0:
            assert warm.stdout == cold.stdout
        else:
            assert "does not have a target named 'nope'" in warm.stdout
    assert sorted(_run([client, "ls", "-q"], root, warm_env).stdout.split()) == ["tiny.one", "tiny.two"]
    # nothing left behind: every child was reaped
    assert _children(server.process.pid) == []


def test_interrupt_and_lost_client_stop_dbt(tiny, server):
    root, env = tiny
    env = {**env, **server.environ()}
    client = dbt_warm.client_executable()
    # SIGINT to the client (what dagster-dbt sends to cancel) reaches dbt: it stops, non-zero.
    proc = subprocess.Popen([client, "run-operation", "slow"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child, = _wait(lambda: _children(server.process.pid), 120, "the forked dbt")
    assert Path(f"/proc/{child}").exists()
    time.sleep(1)  # inside the statement
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    _wait(lambda: not _children(server.process.pid), 60, "the interrupted dbt to end")
    # A client killed outright (dagster-dbt's last resort): the server stops its dbt.
    proc = subprocess.Popen([client, "run-operation", "slow"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: _children(server.process.pid), 120, "the forked dbt")
    proc.kill()
    proc.wait()
    _wait(lambda: not _children(server.process.pid), dbt_warm.KILL_GRACE_S + 60, "the orphaned dbt to be stopped")


def test_without_a_server_the_client_runs_the_environment_dbt(tiny, server):
    root, env = tiny
    client = dbt_warm.client_executable()
    assert _run([client, "ls", "-q"], root, env).stdout.split() == ["tiny.one", "tiny.two"]
    # a server that has gone away: same
    gone = server.environ()
    server.stop()
    assert server.process.returncode == 0 and not os.path.exists(server.socket_path)
    result = _run([client, "ls", "-q"], root, {**env, **gone})
    assert result.returncode == 0 and result.stdout.split() == ["tiny.one", "tiny.two"], result.stderr


def test_the_server_stops_its_dbt_when_its_parent_goes(tiny, server):
    root, env = tiny
    env = {**env, **server.environ()}
    proc = subprocess.Popen([dbt_warm.client_executable(), "run-operation", "slow"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child, = _wait(lambda: _children(server.process.pid), 120, "the forked dbt")
    server.stop()  # closes the pipe, as the parent's death would
    assert server.process.returncode == 0
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/status").read_text().find("zombie") >= 0
    assert proc.wait(timeout=60) != 0


def test_a_dead_server_is_not_waited_for(server, monkeypatch):
    """A server that died is a zombie until the Dagster process reaps it: the client must see
    it as gone (and run dbt cold at once), not wait for it to start listening."""
    pid = server.process.pid
    assert dbt_warm._alive(pid)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30,
          "the killed server to be a zombie")
    assert not dbt_warm._alive(pid)
    monkeypatch.setenv(dbt_warm.ENV_SERVER_PID, str(pid))
    assert dbt_warm._connect(server.socket_path) is None


def test_a_server_given_a_parse_state_compiles_dbts_artifact_code_before_forking(tiny, tmp_path):
    """With the project's parse state, the server compiles the code dbt reads and writes it
    with (mashumaro compiles lazily, per process) and otherwise stays as it was: one thread,
    no child process (no multiprocessing resource tracker), commands unchanged."""
    root, env = tiny
    assert _run([dbt_warm.real_dbt(), "parse", "-q"], root, env).returncode == 0
    state = tmp_path / "target" / "partial_parse.msgpack"
    assert state.exists()
    # In a fresh interpreter: after the warm-up, reading the state compiles nothing more.
    probe = (
        "import sys\n"
        "from mashumaro.core.meta.code.builder import CodeBuilder\n"
        "from platform_assets import dbt_warm\n"
        "dbt_warm._import_dbt()\n"
        "if sys.argv[1] == 'warm':\n"
        "    dbt_warm._compile_artifact_codecs(sys.argv[2])\n"
        "compiled = []\n"
        "original = CodeBuilder.add_unpack_method\n"
        "def counting(self):\n"
        "    compiled.append(self.cls.__name__)\n"
        "    return original(self)\n"
        "CodeBuilder.add_unpack_method = counting\n"
        "from dbt.contracts.graph.manifest import Manifest\n"
        "Manifest.from_msgpack(open(sys.argv[2], 'rb').read())\n"
        "print(len(compiled))\n"
    )
    counts = {}
    for mode in ("cold", "warm"):
        out = subprocess.run([sys.executable, "-c", probe, mode, str(state)], capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["cold"] > 0 and counts["warm"] == 0, counts

    srv = dbt_warm.start_server(str(state))
    try:
        warm_env = {**env, **srv.environ()}
        client = dbt_warm.client_executable()
        assert sorted(_run([client, "ls", "-q"], root, warm_env).stdout.split()) == ["tiny.one", "tiny.two"]
        assert len(os.listdir(f"/proc/{srv.process.pid}/task")) == 1
        assert _children(srv.process.pid) == []
        build = _run([client, "build", "-q"], root, warm_env)
        assert build.returncode == 0, build.stdout + build.stderr
    finally:
        srv.stop()
    assert srv.process.returncode == 0


def test_templates_a_child_compiled_are_compiled_in_the_server_for_the_next_children(tiny, server, tmp_path):
    """A child reports the macro texts it compiled that the server had not; the server compiles
    them into dbt's template cache (its children inherit it) and removes the report. In fresh
    interpreters, as the child and the server are."""
    report = tmp_path / "templates-1.json"
    macro = "{% macro shout(x) %}{{ x | upper }}!{% endmacro %}"
    child = (
        "import sys\n"
        "from platform_assets import dbt_warm\n"
        "from dbt_common.clients.jinja import template_cache\n"
        "dbt_warm._import_dbt()\n"
        "known = dbt_warm._compiled_templates()\n"
        "template_cache.get_node_template(dbt_warm._MacroText(sys.argv[2]))\n"
        "dbt_warm._report_templates(sys.argv[1], known)\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(report), macro], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    import json
    assert json.loads(report.read_text()) == [macro]
    learner = (
        "import sys\n"
        "from platform_assets import dbt_warm\n"
        "from dbt_common.clients.jinja import template_cache\n"
        "dbt_warm._import_dbt()\n"
        "before = len(template_cache.file_cache)\n"
        "print(dbt_warm._learn_templates(sys.argv[1]), len(template_cache.file_cache) - before)\n"
        "template = template_cache.file_cache[sys.argv[2]]\n"
        "print(template.module.dbt_macro__shout('warm'))  # dbt's name for the macro\n"
        "print(dbt_warm._learn_templates(sys.argv[1]))\n"  # gone: nothing more
    )
    out = subprocess.run([sys.executable, "-c", learner, str(report), macro], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "WARM!", "0"]
    assert not report.exists()
    # A broken or foreign report is ignored, and removed.
    report.write_text('{"not": "a list"}')
    assert dbt_warm._learn_templates(str(report)) == 0 and not report.exists()

    # Through the server: commands after the first use what it learned, same results, and no
    # report is left behind.
    root, env = tiny
    warm_env = {**env, **server.environ()}
    client = dbt_warm.client_executable()
    for _ in range(2):
        build = _run([client, "build"], root, warm_env)
        assert build.returncode == 0 and "PASS=2" in build.stdout, build.stdout + build.stderr
    # The server sends the client its exit code first and only then reads and removes the
    # child's report (before its next fork): the client can be back before the report is gone.
    folder = os.path.dirname(server.socket_path)
    deadline = time.monotonic() + 30
    while os.listdir(folder) != ["dbt.sock"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(folder) == ["dbt.sock"]
