"""Running the dbt project as the orchestrator does: the venv's dbt in a subprocess, with
the environment's settings in env vars, and every artefact (target, logs, DuckDB file)
under a per-test folder so that nothing collides with anyone else's dbt/target."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt"
DBT = Path(sys.executable).parent / "dbt"


@dataclass
class DbtResult:
    args: list[str]
    returncode: int
    output: str
    seconds: float
    results: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def statuses(self) -> dict[str, str]:
        return {r["unique_id"]: r["status"] for r in self.results}

    def describe(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return f"dbt {' '.join(self.args)} exited {self.returncode} after {self.seconds:.1f}s:\n{tail}"


@dataclass
class DbtRunner:
    """One engine's dbt: a target, its environment, its own target/log folders."""

    target: str
    env: dict[str, str]
    work_dir: Path

    def __call__(self, *args: str, check: bool = True, target_dir: str = "target",
                 extra_env: dict[str, str] | None = None) -> DbtResult:
        """Run dbt, with `extra_env` added to its environment. `target_dir` names the target
        folder: dbt re-parses the whole project whenever --vars change, so runs with other
        vars keep their own parse cache."""
        target_path = self.work_dir / target_dir
        cmd = [
            str(DBT), *args,
            "--project-dir", str(PROJECT_DIR),
            "--profiles-dir", str(PROJECT_DIR),
            "--target", self.target,
            "--target-path", str(target_path),
            "--log-path", str(self.work_dir / "logs"),
        ]
        results_file = target_path / "run_results.json"
        results_file.unlink(missing_ok=True)
        started = time.monotonic()
        proc = subprocess.run(
            cmd, env={**self.env, **(extra_env or {})}, cwd=self.work_dir, capture_output=True, text=True,
            timeout=600,
        )
        result = DbtResult(
            args=list(args), returncode=proc.returncode, output=proc.stdout + proc.stderr,
            seconds=time.monotonic() - started,
        )
        if results_file.exists():
            result.results = json.loads(results_file.read_text())["results"]
        if check and not result.ok:
            raise AssertionError(result.describe())
        return result

    def manifest(self, target_dir: str = "target") -> dict:
        return json.loads((self.work_dir / target_dir / "manifest.json").read_text())


def dbt_env(base: dict[str, str], **overrides: str) -> dict[str, str]:
    env = {**base, **overrides}
    env.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    # Each engine runs in its own process next to the other: keep them from oversubscribing.
    env.setdefault("DBT_THREADS", "2")
    return env
