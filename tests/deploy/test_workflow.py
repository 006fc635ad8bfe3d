"""GitHub Actions workflows: schema-valid (check-jsonschema's vendored github-workflows
schema, offline) and the delivery pipeline's order: tests, then image, then stack, then
the services roll."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.decode import decode_str

from .test_dockerfile import of

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.y*ml"))
DEPLOY = REPO_ROOT / ".github" / "workflows" / "deploy.yml"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def run_lines(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def step_index(job: dict[str, Any], needle: str) -> int:
    for i, step in enumerate(job["steps"]):
        if needle in step.get("run", "") or needle in step.get("uses", ""):
            return i
    raise AssertionError(f"no step with {needle!r}")


def test_there_are_workflows():
    assert DEPLOY in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(workflow: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(workflow)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_can_fail(tmp_path: Path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  test:\n    steps: []\n")  # no runs-on
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0


def test_tests_gate_the_build():
    wf = load(DEPLOY)
    test, deploy = wf["jobs"]["test"], wf["jobs"]["deploy"]
    assert any("make test" in line for line in run_lines(test))
    assert any("postgresql" in line for line in run_lines(test)), "the suite needs PG binaries"
    assert not any("docker build" in line for line in run_lines(test))
    needs = deploy["needs"] if isinstance(deploy["needs"], list) else [deploy["needs"]]
    assert "test" in needs
    # Only pushes to main deploy.
    assert "github.event_name == 'push'" in deploy["if"]
    assert "refs/heads/main" in deploy["if"]


def test_deploy_order_and_oidc():
    deploy = load(DEPLOY)["jobs"]["deploy"]
    assert deploy["permissions"]["id-token"] == "write"
    creds = deploy["steps"][step_index(deploy, "aws-actions/configure-aws-credentials")]
    assert "role-to-assume" in creds["with"]
    assert not {"aws-access-key-id", "aws-secret-access-key"} & set(creds["with"])

    order = [
        step_index(deploy, "aws-actions/configure-aws-credentials"),
        step_index(deploy, "aws-actions/amazon-ecr-login"),
        step_index(deploy, "docker build"),
        step_index(deploy, "docker push"),
        step_index(deploy, "actions/upload-artifact"),
        step_index(deploy, "aws cloudformation deploy"),
        step_index(deploy, "--force-new-deployment"),
        step_index(deploy, "aws ecs wait services-stable"),
    ]
    assert order == sorted(order)
    build = deploy["steps"][step_index(deploy, "docker build")]["run"]
    assert "-f deploy/Dockerfile" in build and "$GITHUB_SHA" in build
    artifact = deploy["steps"][step_index(deploy, "actions/upload-artifact")]
    assert artifact["with"]["path"].endswith("manifest.json")


def test_pipeline_passes_every_required_stack_parameter():
    """A parameter without a default that the pipeline does not pass would fail the first
    stack creation; one it passes that the template lacks would fail every deploy."""
    deploy_step = next(
        line for line in run_lines(load(DEPLOY)["jobs"]["deploy"]) if "aws cloudformation deploy" in line
    )
    assert "--template-file deploy/aws/platform.yaml" in deploy_step
    template, _ = decode_str((REPO_ROOT / "deploy" / "aws" / "platform.yaml").read_text())
    params = json.loads(json.dumps(template))["Parameters"]
    passed = {
        token.strip('"').split("=", 1)[0]
        for token in deploy_step.split()
        if "=" in token and token.strip('"')[:1].isupper()
    }
    required = {name for name, p in params.items() if "Default" not in p}
    assert required <= passed, f"not passed by the pipeline: {sorted(required - passed)}"
    assert passed <= set(params), f"unknown to the template: {sorted(passed - set(params))}"


def test_the_image_is_parsed_for_the_stacks_warehouse_database():
    """dbt writes the profile's database into every relation of the image's manifest: the
    build takes it as a build arg, from the variable that gives the stack its RedshiftDatabase,
    and the image's parse step fails without it."""
    jobs = load(DEPLOY)["jobs"]
    build = next(s for job in jobs.values() for s in job["steps"] if "docker build" in s.get("run", ""))
    deploy = next(s for job in jobs.values() for s in job["steps"] if "aws cloudformation deploy" in s.get("run", ""))
    assert '--build-arg REDSHIFT_DB="$REDSHIFT_DATABASE"' in build["run"]
    assert '"RedshiftDatabase=$REDSHIFT_DATABASE"' in deploy["run"]
    assert build["env"]["REDSHIFT_DATABASE"] == deploy["env"]["REDSHIFT_DATABASE"] == "${{ vars.REDSHIFT_DATABASE }}"
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert "\nARG REDSHIFT_DB\n" in dockerfile
    (parse_step,) = [run for run in of("RUN") if "prepare-and-package" in run]
    assert 'REDSHIFT_DB="${REDSHIFT_DB:?' in parse_step
    # The step as the build's shell runs it (the command itself echoes its database): it stops
    # without the build arg, naming it, and parses for the database given.
    step = parse_step.replace("dagster-dbt project prepare-and-package", 'sh -c \'echo "$REDSHIFT_DB"\' --')
    env = {"PATH": "/usr/bin:/bin"}
    missing = subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "--build-arg REDSHIFT_DB" in missing.stderr, missing
    given = subprocess.run(["sh", "-c", step], env={**env, "REDSHIFT_DB": "analytics"}, capture_output=True,
                           text=True, timeout=30)
    assert (given.returncode, given.stdout.strip()) == (0, "analytics"), given
