"""checkov over deploy/ (the CloudFormation template and the Dockerfile), offline, with the
pinned scanner of requirements-checkov.txt (its own venv, .venv-checkov, built by `make venv`
and `make test`): no failed check, and every skipped check waived inline with a reason in
words. The same evaluation is first run on a planted template and Dockerfile, so a scan
that reports nothing, or a reason-less skip, cannot pass for a clean tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
CONFIG = REPO_ROOT / ".checkov.yaml"
FRAMEWORKS = ("cloudformation", "dockerfile")

# What checkov writes when an inline skip carries no comment.
NO_COMMENT = "No comment provided"
# A reason names what is waived and why: a sentence, not a token.
MIN_REASON_WORDS = 8

# Keys of .checkov.yaml that would silence findings outside the resources themselves.
SILENCING_KEYS = {
    "skip-check",
    "check",
    "soft-fail",
    "soft-fail-on",
    "hard-fail-on",
    "skip-framework",
    "skip-path",
    "baseline",
    "skip-resources-without-violations",
    "external-checks-dir",
    "external-checks-git",
    "bc-api-key",
    "prisma-api-url",
}


def offline_env() -> dict[str, str]:
    """The caller's environment without any checkov/platform setting (an API key in a
    developer's shell would make checkov upload results), plus the two switches that keep
    it off the network besides --skip-download: no PyPI update check, no policy mapping
    download."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "CHECKOV_", "PRISMA_"))}
    env.update(CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE", LOG_LEVEL="WARNING")
    return env


def run_checkov(*args: str) -> dict[str, dict[str, Any]]:
    """checkov's JSON reports, by check type."""
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV.relative_to(REPO_ROOT)} is missing: run `make venv` (or `make test`), which builds it")
    proc = subprocess.run(
        [str(CHECKOV), *args, "--output", "json", "--skip-download"],
        cwd=REPO_ROOT,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    # 0: no failed check, 1: failed checks; anything else is checkov itself failing.
    assert proc.returncode in (0, 1), f"checkov exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports}


def describe(check: dict[str, Any]) -> str:
    lines = check.get("file_line_range") or ["?", "?"]
    return (
        f"{check['check_id']} {check['resource']} ({check['file_path']}:{lines[0]}-{lines[1]}): {check['check_name']}"
    )


def unreasoned(comment: str | None) -> bool:
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", comment or "")
    return (comment or "").strip() == NO_COMMENT or len(words) < MIN_REASON_WORDS


def problems(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Every failed check, every skip without a reason, every parsing error."""
    found = []
    for check_type, report in sorted(reports.items()):
        results = report.get("results", {})
        for check in results.get("failed_checks", []):
            found.append(f"[{check_type}] FAILED {describe(check)}")
        for check in results.get("skipped_checks", []):
            comment = check.get("check_result", {}).get("suppress_comment")
            if unreasoned(comment):
                found.append(f"[{check_type}] SKIPPED WITHOUT A REASON {describe(check)}: {comment!r}")
        for path in results.get("parsing_errors", []):
            found.append(f"[{check_type}] PARSING ERROR {path}")
    return found


@pytest.fixture(scope="module")
def deploy_reports() -> dict[str, dict[str, Any]]:
    return run_checkov("--config-file", str(CONFIG))


def test_config_scans_deploy_offline_and_silences_nothing():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["directory"] == ["deploy"]
    assert sorted(config["framework"]) == sorted(FRAMEWORKS)
    assert config["skip-download"] is True
    assert not SILENCING_KEYS & set(config), (
        f"findings silenced in {CONFIG.name}: {sorted(SILENCING_KEYS & set(config))}"
    )


def test_checkov_is_the_pinned_version():
    requirements = (REPO_ROOT / "requirements-checkov.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in requirements if "==" in line)
    proc = subprocess.run([str(CHECKOV), "--version"], env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == pins["checkov"].strip()


def test_the_evaluation_catches_failures_and_unreasoned_skips(tmp_path: Path):
    """A planted template (HTTP listener forwarding; a bucket waived without a reason) and
    a Dockerfile without HEALTHCHECK: each one must show up."""
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "bad.yaml").write_text(
        """AWSTemplateFormatVersion: "2010-09-09"
Resources:
  Balancer:
    Type: AWS::ElasticLoadBalancingV2::LoadBalancer
    Properties:
      Scheme: internal
      Subnets: [subnet-1, subnet-2]
  Group:
    Type: AWS::ElasticLoadBalancingV2::TargetGroup
    Properties: {Port: 80, Protocol: HTTP, VpcId: vpc-1}
  PlainListener:
    Type: AWS::ElasticLoadBalancingV2::Listener
    Properties:
      LoadBalancerArn: !Ref Balancer
      Protocol: HTTP
      Port: 80
      DefaultActions: [{Type: forward, TargetGroupArn: !Ref Group}]
  Bucket:
    Type: AWS::S3::Bucket
    Metadata:
      checkov:
        skip:
          - id: CKV_AWS_18
          - id: CKV_AWS_21
            comment: later
"""
    )
    (tmp_path / "Dockerfile").write_text('FROM python:3.11-slim\nUSER nobody\nCMD ["python"]\n')
    reports = run_checkov("--directory", str(tmp_path), *[a for f in FRAMEWORKS for a in ("--framework", f)])
    found = "\n".join(problems(reports))
    assert "FAILED CKV_AWS_2 AWS::ElasticLoadBalancingV2::Listener.PlainListener" in found, found
    assert "FAILED CKV_AWS_91 AWS::ElasticLoadBalancingV2::LoadBalancer.Balancer" in found, found
    assert "FAILED CKV_DOCKER_2 " in found, found
    assert "SKIPPED WITHOUT A REASON CKV_AWS_18 AWS::S3::Bucket.Bucket" in found, found
    assert "SKIPPED WITHOUT A REASON CKV_AWS_21 AWS::S3::Bucket.Bucket" in found, found


def test_deploy_has_no_unwaived_finding(deploy_reports):
    assert set(deploy_reports) == set(FRAMEWORKS), f"checkov reported {sorted(deploy_reports)}"
    found = problems(deploy_reports)
    summary = {t: r["summary"] for t, r in deploy_reports.items()}
    assert not found, (
        "checkov findings under deploy/ (fix them, or waive one inline with its reason):\n"
        + "\n".join(found)
        + f"\n{summary}"
    )


def test_every_resource_and_the_dockerfile_were_scanned(deploy_reports):
    """A scan that parsed nothing passes trivially: the template's resources and the
    Dockerfile must all have been evaluated."""
    from cfnlint.decode import decode_str

    template, _ = decode_str((REPO_ROOT / "deploy" / "aws" / "platform.yaml").read_text())
    cfn = deploy_reports["cloudformation"]
    assert cfn["summary"]["resource_count"] == len(template["Resources"])
    assert cfn["summary"]["passed"] > 100
    docker = deploy_reports["dockerfile"]
    assert docker["summary"]["resource_count"] >= 1
    assert {c["file_path"] for c in docker["results"]["passed_checks"]} == {"/Dockerfile"}


def test_waivers_are_the_reviewed_ones(deploy_reports):
    """Each waiver is a decision recorded in deploy/README.md; a new one needs the same."""
    skipped = {
        (c["check_id"], c["resource"]) for r in deploy_reports.values() for c in r["results"].get("skipped_checks", [])
    }
    assert skipped == {
        ("CKV_AWS_18", "AWS::S3::Bucket.AccessLogsBucket"),
        ("CKV_AWS_161", "AWS::RDS::DBInstance.Database"),
    }
    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    for check_id, _ in skipped:
        assert check_id in readme, f"{check_id} is waived but deploy/README.md does not say why"
