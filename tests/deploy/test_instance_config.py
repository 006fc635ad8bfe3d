"""deploy/dagster.yaml is a valid production Dagster instance config.

Validated with dagster's own machinery: the instance schema (`dagster_instance_config`),
each configurable class's `config_type()`, and finally a real `DagsterInstance` built from
the file (storage swapped for SQLite, AWS behind moto) so the launcher, coordinator,
compute log manager, pools, monitoring and retries are all constructed as in prod.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import PoolGranularity, dagster_instance_config
from dagster._serdes import class_from_code_pointer
from moto import mock_aws

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
REGION = "eu-west-1"
RUN_FAMILY = "platform-run"

# Values a prod task would get from its task definition (deploy/aws/platform.yaml).
PROD_ENV = {
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "from-secrets-manager",
    "DAGSTER_PG_HOST": "dagster.abc.eu-west-1.rds.amazonaws.com",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_RUN_TASK_DEFINITION": RUN_FAMILY,
    "DAGSTER_ECS_CLUSTER": "platform",
    "DAGSTER_COMPUTE_LOGS_BUCKET": "platform-compute-logs",
    "DAGSTER_COMPUTE_LOGS_PREFIX": "compute-logs",
    "AWS_REGION": REGION,
}


def env_refs(node: Any) -> set[str]:
    """Every `{env: NAME}` reference in a loaded YAML document."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set()


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    return yaml.safe_load(DAGSTER_YAML.read_text())


@pytest.fixture
def prod_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in PROD_ENV.items():
        monkeypatch.setenv(name, value)
    # Fake credentials for moto; never real ones.
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return PROD_ENV


@pytest.fixture
def instance_config(prod_env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    shutil.copy(DAGSTER_YAML, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    return dict(config)


def test_env_vars_referenced_are_exactly_the_documented_ones(raw_config):
    # The task definitions and deploy/README.md are written against this list.
    assert env_refs(raw_config) == set(PROD_ENV)
    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    undocumented = sorted(name for name in PROD_ENV if f"`{name}`" not in readme)
    assert not undocumented, f"not documented in deploy/README.md: {undocumented}"


def test_validates_against_dagster_instance_schema(instance_config):
    for key in (
        "storage",
        "run_coordinator",
        "run_launcher",
        "compute_logs",
        "concurrency",
        "run_monitoring",
        "run_retries",
        "telemetry",
    ):
        assert key in instance_config, key
    assert instance_config["telemetry"] == {"enabled": False}


def test_postgres_storage_reads_every_value_from_the_environment(instance_config):
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    pg = instance_config["storage"]["postgres"]
    assert set(pg["postgres_db"]) >= {"username", "password", "hostname", "db_name", "port"}
    for key in ("username", "password", "hostname", "db_name", "port"):
        assert set(pg["postgres_db"][key]) == {"env"}, f"{key} must come from the environment"

    processed = process_config(DagsterPostgresStorage.config_type(), pg)
    assert processed.success, processed.errors
    url = pg_url_from_config(processed.value)
    assert url.startswith("postgresql+psycopg2://dagster:from-secrets-manager@dagster.abc.")
    assert ":5432/dagster" in url and "sslmode=require" in url


@pytest.mark.parametrize("section", ["run_coordinator", "run_launcher", "compute_logs"])
def test_configurable_classes_load_and_their_config_validates(instance_config, section):
    entry = instance_config[section]
    cls = class_from_code_pointer(entry["module"], entry["class"])
    result = process_config(cls.config_type(), entry.get("config") or {})
    assert result.success, result.errors


def test_named_classes(instance_config):
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_aws.ecs import EcsRunLauncher
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    def load(section):
        entry = instance_config[section]
        return class_from_code_pointer(entry["module"], entry["class"])

    assert load("run_coordinator") is QueuedRunCoordinator
    assert load("run_launcher") is EcsRunLauncher
    assert load("compute_logs") is S3ComputeLogManager


def test_run_launcher_config(instance_config):
    from dagster_aws.ecs import EcsRunLauncher

    config = instance_config["run_launcher"]["config"]
    processed = process_config(EcsRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    value = processed.value
    # The task definition is the one CloudFormation registers (container `run`).
    assert value["task_definition"] == {"env": "DAGSTER_RUN_TASK_DEFINITION"}
    assert value["container_name"] == "run"
    assert value["run_task_kwargs"] == {"cluster": "platform", "launchType": "FARGATE"}
    # Network configuration comes from the launching task, not from config.
    assert value["use_current_ecs_task_config"] is True
    # No ListSecrets on every launch: the run task definition names its secrets.
    assert value["secrets_tag"] is None
    assert set(value["run_resources"]) == {"cpu", "memory"}
    assert {t["key"] for t in value["run_ecs_tags"]} >= {"platform"}


def test_run_limits_must_live_under_concurrency(raw_config, prod_env, tmp_path):
    """Why max_concurrent_runs is not under run_coordinator: with `concurrency.pools` set,
    dagster rejects run-queue limits in the coordinator config."""
    moved = yaml.safe_load(yaml.safe_dump(raw_config))
    moved["run_coordinator"]["config"]["max_concurrent_runs"] = moved["concurrency"]["runs"].pop("max_concurrent_runs")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(moved))
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurrent_runs"):
        dagster_instance_config(str(tmp_path))


def test_builds_a_real_instance(raw_config, prod_env):
    """The whole file except storage (PostgreSQL is covered above) builds a DagsterInstance:
    the ECS launcher resolves its task definition in (moto) ECS at construction."""
    from dagster_aws.ecs import EcsRunLauncher
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    overrides = {k: v for k, v in raw_config.items() if k != "storage"}
    with mock_aws():
        ecs = boto3.client("ecs", region_name=REGION)
        ecs.create_cluster(clusterName=PROD_ENV["DAGSTER_ECS_CLUSTER"])
        registered = ecs.register_task_definition(
            family=RUN_FAMILY,
            containerDefinitions=[{"name": "run", "image": "platform:sha", "memory": 2048}],
        )["taskDefinition"]
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=PROD_ENV["DAGSTER_COMPUTE_LOGS_BUCKET"],
            CreateBucketConfiguration={"LocationConstraint": REGION},
        )
        with dg.instance_for_test(overrides=overrides) as instance:
            launcher = instance.run_launcher
            assert isinstance(launcher, EcsRunLauncher)
            assert launcher.task_definition == registered["taskDefinitionArn"]
            assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

            concurrency = instance.get_concurrency_config()
            assert concurrency.pool_config.default_pool_limit >= 1
            assert concurrency.pool_config.pool_granularity == PoolGranularity.RUN
            queue = concurrency.run_queue_config
            assert queue is not None
            assert queue.max_concurrent_runs == raw_config["concurrency"]["runs"]["max_concurrent_runs"]
            assert any(limit["key"] == "dagster/backfill" for limit in queue.tag_concurrency_limits)

            assert instance.run_monitoring_enabled
            assert instance.run_monitoring_max_resume_run_attempts >= 1
            assert launcher.supports_resume_run
            assert instance.run_retries_enabled
            assert instance.run_retries_max_retries >= 1
