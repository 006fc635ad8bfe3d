"""The production run launcher starts the platform's jobs as ECS tasks sized by SIZING.

A real DagsterInstance carries the EcsRunLauncher of deploy/dagster.yaml (AWS behind moto's
`mock_aws`, `use_current_ecs_task_config` off because no launching ECS task exists here). The
platform's code location is loaded as the daemon loads it (a ModuleTarget on
`platform_assets.definitions`, served by a code server subprocess), a run of a job is created
from the *remote* job the way the UI / sensors / the run queue do, and launched. The test
then reads the task back from (moto) ECS: cluster, task definition, the
`dagster api execute_run` command for exactly that run, the cpu/memory overrides that come
from the job's `ecs/cpu` / `ecs/memory` run tags (platform_assets.dbt_assets.SIZING), and
the ECS tags. The run itself never executes (there is no container): only the launch is
under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import dagster as dg
import pytest
import yaml
from dagster import TimeWindowPartitionsDefinition
from dagster._core.remote_representation.external import RemoteJob, RemoteRepository
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._core.workspace.load_target import ModuleTarget
from moto import mock_aws

from platform_assets.dbt_assets import SIZING

from ..platform.conftest import platform_environ

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
LOCATION = "platform_assets"
REGION = "eu-west-1"
CLUSTER = "platform"
RUN_FAMILY = "platform-run"
RUN_CONTAINER = "run"


def prod_launcher_section() -> dict[str, Any]:
    """deploy/dagster.yaml's run_launcher, changed only where no ECS task launches it here."""
    section = yaml.safe_load(DAGSTER_YAML.read_text())["run_launcher"]
    config = dict(section["config"])
    # There is no launching task (ECS task metadata endpoint) to copy a network from.
    config["use_current_ecs_task_config"] = False
    return {**section, "config": config}


@pytest.fixture(scope="module")
def aws() -> Iterator[dict[str, str]]:
    """Fake credentials and moto for the whole module; ECS has the cluster and a run task
    definition with the container `run` that CloudFormation creates.

    Unlike the real one, it is registered with a bridge network and without
    `requiresCompatibilities: [FARGATE]`: moto 5.2.5 turns a FARGATE-compatible definition
    into awsvpc, whose network interface it cannot fake. moto still accepts
    `launchType: FARGATE` on RunTask for it."""
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "DAGSTER_RUN_TASK_DEFINITION": RUN_FAMILY,
        "DAGSTER_ECS_CLUSTER": CLUSTER,
    }
    with mock.patch.dict(os.environ, fake):
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
            os.environ.pop(name, None)
        with mock_aws():
            ecs = boto3.client("ecs", region_name=REGION)
            cluster_arn = ecs.create_cluster(clusterName=CLUSTER)["cluster"]["clusterArn"]
            task_definition = ecs.register_task_definition(
                family=RUN_FAMILY,
                networkMode="bridge",
                cpu="1024",
                memory="2048",
                containerDefinitions=[{"name": RUN_CONTAINER, "image": "platform:test", "memory": 2048}],
            )["taskDefinition"]
            yield {"cluster_arn": cluster_arn, "task_definition_arn": task_definition["taskDefinitionArn"]}


@pytest.fixture(scope="module")
def instance(aws):
    with dg.instance_for_test(overrides={"run_launcher": prod_launcher_section()}) as instance:
        yield instance


@pytest.fixture(scope="module")
def workspace(instance, pg_env, tmp_path_factory) -> Iterator[WorkspaceRequestContext]:
    """The code location as the daemon loads it: a code server subprocess importing
    platform_assets.definitions with the environment a deployed platform would have."""
    folder = tmp_path_factory.mktemp("ecs-launch")
    target = ModuleTarget(
        module_name="platform_assets.definitions", attribute="defs",
        working_directory=str(REPO_ROOT), location_name=LOCATION,
    )
    with mock.patch.dict(os.environ, platform_environ(pg_env, folder, "local")):
        with WorkspaceProcessContext(instance, target) as process_context:
            request_context = process_context.create_request_context()
            errors = {name: entry.load_error for name, entry in request_context.get_code_location_entries().items()
                      if entry.load_error}
            assert not errors, errors
            yield request_context


@pytest.fixture(scope="module")
def repository(workspace) -> RemoteRepository:
    (repo,) = workspace.get_code_location(LOCATION).get_repositories().values()
    return repo


def create_run_from_remote_job(
    instance, workspace: WorkspaceRequestContext, repo: RemoteRepository, job_name: str,
    extra_tags: dict[str, str] | None = None,
) -> DagsterRun:
    """A run as the UI, a sensor or a schedule creates it: from the remote job, with the
    job's tags merged under the request's."""
    location = workspace.get_code_location(LOCATION)
    remote_job: RemoteJob = repo.get_full_job(job_name)
    plan = location.get_execution_plan(
        remote_job, run_config={}, step_keys_to_execute=None, known_state=None, instance=instance
    )
    return instance.create_run(
        job_name=job_name,
        run_id=None,
        run_config={},
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**remote_job.tags, **(extra_tags or {})},
        root_run_id=None,
        parent_run_id=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        job_snapshot=remote_job.job_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot,
        asset_selection=None,
        asset_check_selection=None,
        resolved_op_selection=None,
        op_selection=None,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
        asset_graph=repo.asset_graph,
    )


def launched_task(instance, workspace: WorkspaceRequestContext, run: DagsterRun) -> dict[str, Any]:
    """Launch as the run queue daemon does, and read the new task back from ECS."""
    ecs = boto3.client("ecs", region_name=REGION)
    before = set(ecs.list_tasks(cluster=CLUSTER)["taskArns"])
    instance.launch_run(run.run_id, workspace)
    new = set(ecs.list_tasks(cluster=CLUSTER)["taskArns"]) - before
    assert len(new) == 1, f"one ECS task per run, got {new}"
    (task,) = ecs.describe_tasks(cluster=CLUSTER, tasks=list(new), include=["TAGS"])["tasks"]
    return task


def assert_launched_as_sized(instance, aws, run: DagsterRun, task: dict[str, Any], sizing: dict[str, str]):
    # Cluster and task definition: the configured ones; FARGATE as in prod.
    assert task["clusterArn"] == aws["cluster_arn"]
    assert task["taskDefinitionArn"] == aws["task_definition_arn"]
    assert task["taskDefinitionArn"].split("/")[-1].split(":")[0] == RUN_FAMILY
    assert task["launchType"] == "FARGATE"

    # The `run` container runs `dagster api execute_run` for exactly this run of this job.
    overrides = task["overrides"]
    (container,) = overrides["containerOverrides"]
    assert container["name"] == RUN_CONTAINER
    command = container["command"]
    assert command[:3] == ["dagster", "api", "execute_run"]
    args = dg.deserialize_value(command[3])
    assert type(args).__name__ == "ExecuteRunArgs"
    assert args.run_id == run.run_id
    assert args.job_origin.job_name == run.job_name
    assert args.job_origin.repository_origin.code_pointer.module == "platform_assets.definitions"
    assert args.instance_ref is not None

    # cpu/memory: the job's ecs/* run tags (SIZING) win over run_resources' defaults,
    # on the task (strings) and on the container (integers).
    assert {k: run.tags[k] for k in ("ecs/cpu", "ecs/memory")} == sizing
    assert overrides["cpu"] == sizing["ecs/cpu"]
    assert overrides["memory"] == sizing["ecs/memory"]
    assert container["cpu"] == int(sizing["ecs/cpu"])
    assert container["memory"] == int(sizing["ecs/memory"])

    # ECS tags: the run id and job (dagster's), the stack's own run_ecs_tags.
    tags = {t["key"]: t["value"] for t in task.get("tags", [])}
    assert tags["dagster/run_id"] == run.run_id
    assert tags["dagster/job_name"] == run.job_name
    launcher_config = prod_launcher_section()["config"]
    for tag in launcher_config.get("run_ecs_tags") or []:
        assert tags.get(tag["key"]) == tag["value"], tag
    for key in (launcher_config.get("propagate_tags") or {}).get("allow_list", []):
        if key in run.tags:
            assert tags.get(key) == run.tags[key], key

    # The run records its task (what run monitoring and termination use).
    stored = instance.get_run_by_id(run.run_id)
    assert stored.tags["ecs/task_arn"] == task["taskArn"]
    assert stored.tags["ecs/cluster"] == aws["cluster_arn"]
    assert stored.status == dg.DagsterRunStatus.STARTING


def test_launcher_is_the_prod_one_on_the_moto_task_definition(instance, aws):
    from dagster_aws.ecs import EcsRunLauncher

    launcher = instance.run_launcher
    assert isinstance(launcher, EcsRunLauncher)
    assert launcher.task_definition == aws["task_definition_arn"]
    assert launcher.container_name == RUN_CONTAINER
    assert launcher.run_task_kwargs == {"cluster": CLUSTER, "launchType": "FARGATE"}
    # The defaults the sized jobs override: each size differs from them, so the task
    # overrides below show which one won.
    defaults = {"ecs/cpu": launcher.run_resources.get("cpu"), "ecs/memory": launcher.run_resources.get("memory")}
    for name in ("unpartitioned", "daily"):
        assert SIZING[name] != defaults, name


def test_unpartitioned_models_run_launches_an_ecs_task_sized_by_its_tags(instance, aws, workspace, repository):
    run = create_run_from_remote_job(instance, workspace, repository, "unpartitioned_models")
    task = launched_task(instance, workspace, run)
    assert_launched_as_sized(instance, aws, run, task, SIZING["unpartitioned"])


def test_daily_facts_partition_run_launches_with_its_own_sizing(instance, aws, workspace, repository):
    assert SIZING["daily"] != SIZING["unpartitioned"]
    # Yesterday's partition (UTC): inside the daily partitions of any start date in the past.
    partition = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    # the time-partitioned ones (the customer exports are partitioned by company, not by day)
    daily_nodes = [n for n in repository.asset_graph.asset_nodes
                   if isinstance(n.partitions_def, TimeWindowPartitionsDefinition)]
    assert daily_nodes and all(n.partitions_def.has_partition_key(partition) for n in daily_nodes)
    run = create_run_from_remote_job(
        instance, workspace, repository, "daily_facts", extra_tags={"dagster/partition": partition}
    )
    task = launched_task(instance, workspace, run)
    assert_launched_as_sized(instance, aws, run, task, SIZING["daily"])
    tags = {t["key"]: t["value"] for t in task["tags"]}
    allow_list = (prod_launcher_section()["config"].get("propagate_tags") or {}).get("allow_list", [])
    if "dagster/partition" in allow_list:
        assert tags["dagster/partition"] == partition
