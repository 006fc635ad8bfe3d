"""CloudFormation templates under deploy/aws: cfn-lint clean, and the platform stack
created in moto's CloudFormation with the least-privilege and network rules asserted on
what moto actually created (IAM, EC2, RDS, ECS, ELB, KMS), or on the template where moto has
no model of the resource or ignores the property.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from cfnlint.api import lint_file
from cfnlint.decode import decode_str
from moto import mock_aws
from moto.cloudformation.parsing import resource_class_from_type

REPO_ROOT = Path(__file__).resolve().parents[2]
AWS_DIR = REPO_ROOT / "deploy" / "aws"
PLATFORM = AWS_DIR / "platform.yaml"
TEMPLATES = sorted(p for p in AWS_DIR.glob("*") if p.suffix in {".yaml", ".yml", ".json"})

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account
STACK = "platform"
ALLOWED_CIDR = "10.20.0.0/16"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/reporting-platform:0123abcd"
UI_DOMAIN = "dagster.internal.example.com"
IDP = "https://login.example.com/oauth2/default"
AUTHENTICATE_ACTIONS = {"authenticate-oidc", "authenticate-cognito"}
TLS_1_2_OR_NEWER = {"TLSv1.2", "TLSv1.3"}

# moto 5.2.5 has no CloudFormation model for these types. The moto stack is created
# without them (references replaced by stand-in values) and they are checked on the
# parsed template instead (test_resources_moto_cannot_model).
MOTO_UNSUPPORTED = {
    "AWS::S3::BucketPolicy",
    "AWS::SecretsManager::Secret",
    "AWS::SecretsManager::SecretTargetAttachment",
    "AWS::ServiceDiscovery::PrivateDnsNamespace",
    "AWS::ServiceDiscovery::Service",
}

# Actions whose resources must always be named, never "*".
SCOPED_ACTIONS = {
    "ecs:RunTask",
    "ecs:StopTask",
    "ecs:DescribeTasks",
    "ecs:TagResource",
    "iam:PassRole",
    "secretsmanager:GetSecretValue",
    "s3:GetObject",
    "s3:PutObject",
    "s3:ListBucket",
    "logs:GetLogEvents",
    "kms:Decrypt",
}


def load_template(path: Path) -> dict[str, Any]:
    """Long-form JSON-like dict (cfn-lint's decoder understands !Ref, !Sub, !GetAtt)."""
    template, matches = decode_str(path.read_text())
    assert not matches, [str(m) for m in matches]
    return json.loads(json.dumps(template))


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_document(raw: Any) -> dict[str, Any]:
    # moto hands inline policies back as the text it stored (JSON, or a Python repr of the
    # dict CloudFormation passed in).
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return ast.literal_eval(raw)


# ---------------------------------------------------------------------------- cfn-lint
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_reports_no_errors(template: Path):
    matches = lint_file(template)
    errors = [m for m in matches if m.rule.id.startswith("E")]
    assert not errors, "\n".join(str(m) for m in errors)


def test_templates_exist():
    assert PLATFORM in TEMPLATES


# ---------------------------------------------------------------------------- moto stack
def without_unsupported(template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The template minus the resources moto cannot create; Ref/GetAtt/Sub references to
    them become plausible stand-ins (an ARN for a secret, a name otherwise)."""
    unsupported = {
        name: res["Type"]
        for name, res in template["Resources"].items()
        if resource_class_from_type(res["Type"]) is None
    }

    def stand_in(name: str, attr: str | None = None) -> str:
        if unsupported[name] == "AWS::SecretsManager::Secret":
            return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{STACK}-{name}-AbCdEf"
        return f"stand-in-{name}" + (f"-{attr}" if attr else "")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"Ref"} and node["Ref"] in unsupported:
                return stand_in(node["Ref"])
            if set(node) == {"Fn::GetAtt"} and node["Fn::GetAtt"][0] in unsupported:
                return stand_in(*node["Fn::GetAtt"][:2])
            if set(node) == {"Fn::Sub"}:
                value = node["Fn::Sub"]
                text = value if isinstance(value, str) else value[0]

                def replace(match: re.Match[str]) -> str:
                    name, _, attr = match.group(1).partition(".")
                    return stand_in(name, attr or None) if name in unsupported else match.group(0)

                text = re.sub(r"\$\{([A-Za-z0-9.]+)\}", replace, text)
                return {"Fn::Sub": text if isinstance(value, str) else [text, walk(value[1])]}
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    resources = {}
    for name, res in template["Resources"].items():
        if name in unsupported:
            continue
        res = walk(res)
        if "DependsOn" in res:
            kept = [d for d in as_list(res["DependsOn"]) if d not in unsupported]
            if kept:
                res["DependsOn"] = kept
            else:
                del res["DependsOn"]
        resources[name] = res
    stripped = {**template, "Resources": resources, "Outputs": walk(template.get("Outputs", {}))}
    return stripped, unsupported


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(PLATFORM)


@pytest.fixture(scope="module")
def stack(template) -> Iterator[dict[str, Any]]:
    stripped, unsupported = without_unsupported(template)
    env = {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",  # moto only; never real credentials
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with mock_aws():
            ec2 = boto3.client("ec2", region_name=REGION)
            vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
            subnets = [
                ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"][
                    "SubnetId"
                ]
                for i, az in ((1, "a"), (2, "b"))
            ]
            redshift_sg = ec2.create_security_group(GroupName="redshift", Description="redshift", VpcId=vpc)["GroupId"]
            replica_sg = ec2.create_security_group(GroupName="replica", Description="replica", VpcId=vpc)["GroupId"]
            sm = boto3.client("secretsmanager", region_name=REGION)
            secret = json.dumps({"username": "u", "password": "generated-in-test"})
            redshift_secret = sm.create_secret(Name="redshift-dbt", SecretString=secret)["ARN"]
            replica_secret = sm.create_secret(Name="replica-readonly", SecretString=secret)["ARN"]
            oidc_secret = sm.create_secret(
                Name="dagster-ui-oidc", SecretString=json.dumps({"client_secret": "generated-in-test"})
            )["ARN"]
            # The HTTPS listener's certificate must exist in ACM (moto checks it, like ELB).
            certificate = boto3.client("acm", region_name=REGION).request_certificate(DomainName=UI_DOMAIN)[
                "CertificateArn"
            ]
            params = {
                "VpcId": vpc,
                "PrivateSubnetIds": ",".join(subnets),
                "WebserverAllowedCidr": ALLOWED_CIDR,
                "ImageUri": IMAGE,
                "RedshiftClusterIdentifier": "analytics",
                "RedshiftEndpoint": f"analytics.abc.{REGION}.redshift.amazonaws.com",
                "RedshiftSecretArn": redshift_secret,
                "RedshiftSecurityGroupId": redshift_sg,
                "ReplicaEndpoint": f"replica-1.abc.{REGION}.rds.amazonaws.com",
                "ReplicaDatabase": "saas",
                "ReplicaSecretArn": replica_secret,
                "ReplicaSecurityGroupId": replica_sg,
                "WebserverDomainName": UI_DOMAIN,
                "WebserverCertificateArn": certificate,
                "OidcIssuer": IDP,
                "OidcAuthorizationEndpoint": f"{IDP}/v1/authorize",
                "OidcTokenEndpoint": f"{IDP}/v1/token",
                "OidcUserInfoEndpoint": f"{IDP}/v1/userinfo",
                "OidcClientId": "0oa-dagster-ui",
                "OidcClientSecretArn": oidc_secret,
            }
            cf = boto3.client("cloudformation", region_name=REGION)
            cf.create_stack(
                StackName=STACK,
                TemplateBody=json.dumps(stripped),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
                Capabilities=["CAPABILITY_IAM"],
            )
            described = cf.describe_stacks(StackName=STACK)["Stacks"][0]
            resources = {
                r["LogicalResourceId"]: r for r in cf.describe_stack_resources(StackName=STACK)["StackResources"]
            }
            yield {
                "status": described["StackStatus"],
                "outputs": {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])},
                "resources": resources,
                "params": params,
                "unsupported": unsupported,
                "db_secret": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{STACK}-DatabaseSecret-AbCdEf",
                "iam": boto3.client("iam", region_name=REGION),
                "ec2": ec2,
                "rds": boto3.client("rds", region_name=REGION),
                "ecs": boto3.client("ecs", region_name=REGION),
                "logs": boto3.client("logs", region_name=REGION),
                "elbv2": boto3.client("elbv2", region_name=REGION),
                "kms": boto3.client("kms", region_name=REGION),
            }


def physical_id(stack, logical_id: str) -> str:
    return stack["resources"][logical_id]["PhysicalResourceId"]


def role_statements(stack, logical_id: str) -> list[dict[str, Any]]:
    iam, role = stack["iam"], physical_id(stack, logical_id)
    statements = []
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        doc = policy_document(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
        statements += as_list(doc["Statement"])
    return statements


def all_role_statements(stack) -> dict[str, list[dict[str, Any]]]:
    return {
        logical: role_statements(stack, logical)
        for logical, res in stack["resources"].items()
        if res["ResourceType"] == "AWS::IAM::Role"
    }


def statements_with(statements, action: str) -> list[dict[str, Any]]:
    return [s for s in statements if s["Effect"] == "Allow" and action in as_list(s["Action"])]


def test_moto_unsupported_types_are_the_known_ones(stack):
    assert set(stack["unsupported"].values()) == MOTO_UNSUPPORTED


def test_stack_is_created(stack):
    assert stack["status"] == "CREATE_COMPLETE"
    outputs = stack["outputs"]
    assert outputs["ClusterName"] == STACK
    assert outputs["ClusterArn"] == f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{STACK}"
    assert outputs["RunTaskDefinitionArn"].startswith(f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/{STACK}-run:")
    assert outputs["ImageUri"] == IMAGE
    for key in (
        "WebserverServiceName",
        "DaemonServiceName",
        "CodeServerServiceName",
        "RedshiftFederationRoleArn",
        "ComputeLogsBucketName",
        "AccessLogsBucketName",
        "LoadBalancerDnsName",
    ):
        assert outputs.get(key), key
    assert outputs["WebserverUrl"] == f"https://{UI_DOMAIN}"
    assert outputs["OidcRedirectUri"] == f"https://{UI_DOMAIN}/oauth2/idpresponse"


def test_services_and_task_definitions_exist(stack):
    ecs = stack["ecs"]
    services = ecs.describe_services(
        cluster=STACK,
        services=[stack["outputs"][k] for k in ("WebserverServiceName", "DaemonServiceName", "CodeServerServiceName")],
    )["services"]
    assert len(services) == 3
    run = ecs.describe_task_definition(taskDefinition=stack["outputs"]["RunTaskDefinitionArn"])
    containers = run["taskDefinition"]["containerDefinitions"]
    assert [c["name"] for c in containers] == ["run"]
    assert containers[0]["image"] == IMAGE


def test_every_dagster_container_gets_what_dagster_yaml_reads(stack):
    """Each container that loads the instance (all four) provides every env var of
    deploy/dagster.yaml, as plain environment or as a Secrets Manager secret."""
    dagster_yaml = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.yaml").read_text())

    def refs(node):
        if isinstance(node, dict):
            if set(node) == {"env"}:
                return {node["env"]}
            return set().union(*(refs(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(refs(v) for v in node))
        return set()

    needed = refs(dagster_yaml)
    ecs = stack["ecs"]
    for logical in ("WebserverTaskDefinition", "DaemonTaskDefinition", "CodeServerTaskDefinition", "RunTaskDefinition"):
        td = ecs.describe_task_definition(taskDefinition=physical_id(stack, logical))
        (container,) = td["taskDefinition"]["containerDefinitions"]
        provided = {e["name"] for e in container.get("environment", [])}
        provided |= {s["name"] for s in container.get("secrets", [])}
        assert needed <= provided, f"{logical} lacks {sorted(needed - provided)}"
        secrets = {s["name"]: s["valueFrom"] for s in container.get("secrets", [])}
        assert secrets["DAGSTER_PG_PASSWORD"].startswith(stack["db_secret"])
        env = {e["name"]: e["value"] for e in container.get("environment", [])}
        assert "DAGSTER_PG_PASSWORD" not in env


def test_ecs_actions_are_scoped_to_the_cluster(stack):
    cluster_arn = stack["outputs"]["ClusterArn"]
    statements = role_statements(stack, "ControlPlaneTaskRole")

    run_task = statements_with(statements, "ecs:RunTask")
    assert run_task, "the control plane must be able to launch runs"
    for s in run_task:
        assert as_list(s["Resource"]) == [f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/{STACK}-run:*"]
        assert s["Condition"]["ArnEquals"]["ecs:cluster"] == cluster_arn

    for action in ("ecs:StopTask", "ecs:DescribeTasks"):
        found = statements_with(statements, action)
        assert found, action
        for s in found:
            for resource in as_list(s["Resource"]):
                assert resource.startswith(f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/{STACK}/"), resource
            assert s["Condition"]["ArnEquals"]["ecs:cluster"] == cluster_arn


def test_pass_role_only_for_the_run_task_roles(stack, template):
    iam = stack["iam"]
    run_roles = {
        iam.get_role(RoleName=physical_id(stack, logical))["Role"]["Arn"]
        for logical in ("RunTaskRole", "TaskExecutionRole")
    }
    passing = {
        role: statements_with(statements, "iam:PassRole") for role, statements in all_role_statements(stack).items()
    }
    assert set(r for r, s in passing.items() if s) == {"ControlPlaneTaskRole"}
    for s in passing["ControlPlaneTaskRole"]:
        assert set(as_list(s["Resource"])) == run_roles
        assert s["Condition"]["StringEquals"]["iam:PassedToService"] == "ecs-tasks.amazonaws.com"
    # ...and those are the roles of the run task definition (moto does not store task
    # definition roles, so this part reads the template).
    run_td = template["Resources"]["RunTaskDefinition"]["Properties"]
    assert run_td["TaskRoleArn"] == {"Fn::GetAtt": ["RunTaskRole", "Arn"]}
    assert run_td["ExecutionRoleArn"] == {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]}


def test_secret_reads_only_named_secrets(stack):
    named = {stack["params"]["RedshiftSecretArn"], stack["params"]["ReplicaSecretArn"], stack["db_secret"]}
    for role, statements in all_role_statements(stack).items():
        for s in statements:
            actions = as_list(s["Action"])
            if not any(a.startswith("secretsmanager:") for a in actions):
                continue
            assert actions == ["secretsmanager:GetSecretValue"], (role, actions)
            assert set(as_list(s["Resource"])) <= named, (role, s["Resource"])


def test_no_wildcards_on_scoped_actions(stack):
    for role, statements in all_role_statements(stack).items():
        for s in statements:
            if s["Effect"] != "Allow":
                continue
            actions = as_list(s["Action"])
            assert not any(a == "*" or a.endswith(":*") for a in actions), (role, actions)
            if SCOPED_ACTIONS & set(actions):
                assert "*" not in as_list(s["Resource"]), (role, actions)
                assert all("*" != r and not r.endswith(":*:*") for r in as_list(s["Resource"]))


def test_webserver_reachable_only_from_the_allowed_network(stack):
    ec2 = stack["ec2"]
    groups = {
        logical: ec2.describe_security_groups(GroupIds=[physical_id(stack, logical)])["SecurityGroups"][0]
        for logical, res in stack["resources"].items()
        if res["ResourceType"] == "AWS::EC2::SecurityGroup"
    }
    for logical, group in groups.items():
        for perm in group["IpPermissions"]:
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm.get("IpRanges", [])), logical
            assert all(r["CidrIpv6"] != "::/0" for r in perm.get("Ipv6Ranges", [])), logical

    # The load balancer: HTTPS, and HTTP only to be redirected, from the allowed network.
    lb_rules = groups["LoadBalancerSecurityGroup"]["IpPermissions"]
    assert sorted((r["FromPort"], r["ToPort"]) for r in lb_rules) == [(80, 80), (443, 443)]
    for rule in lb_rules:
        assert [r["CidrIp"] for r in rule["IpRanges"]] == [ALLOWED_CIDR]
        assert rule["UserIdGroupPairs"] == []


def test_webserver_ingress_comes_only_from_the_load_balancer(stack, template):
    """Every security group the webserver tasks carry admits the load balancer's group
    alone, on the UI port alone. The groups are read from the service in the template (moto
    keeps no network configuration for services created by CloudFormation); their rules
    from moto, which also applies every standalone SecurityGroupIngress of the stack."""
    service = template["Resources"]["WebserverService"]["Properties"]
    refs = service["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
    assert refs == [{"Ref": "WebserverSecurityGroup"}]
    lb_group = physical_id(stack, "LoadBalancerSecurityGroup")
    groups = stack["ec2"].describe_security_groups(GroupIds=[physical_id(stack, r["Ref"]) for r in refs])
    for group in groups["SecurityGroups"]:
        assert group["IpPermissions"], group["GroupId"]
        for rule in group["IpPermissions"]:
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 3000, 3000)
            assert rule["IpRanges"] == [] and rule.get("Ipv6Ranges", []) == [] and rule.get("PrefixListIds", []) == []
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [lb_group]
    # ...and the target group it registers in is the one the HTTPS listener forwards to.
    (binding,) = service["LoadBalancers"]
    assert (binding["ContainerName"], binding["ContainerPort"]) == ("webserver", 3000)
    assert binding["TargetGroupArn"] == {"Ref": "WebserverTargetGroup"}


def listeners(stack) -> dict[int, dict[str, Any]]:
    elbv2 = stack["elbv2"]
    (lb,) = elbv2.describe_load_balancers(LoadBalancerArns=[physical_id(stack, "LoadBalancer")])["LoadBalancers"]
    assert lb["Scheme"] == "internal"
    found = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    return {listener["Port"]: listener for listener in found}


def rules_of(stack, listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The listener's rules, its default rule included."""
    return stack["elbv2"].describe_rules(ListenerArn=listener["ListenerArn"])["Rules"]


def ordered(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # ELB runs actions by Order; without one, in list order (moto drops Order on forwards,
    # which ELB requires to be the last action anyway).
    return sorted(enumerate(actions), key=lambda ia: (ia[1].get("Order", 50_000), ia[0]))


def unauthenticated_forwards(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    forwards, authenticated = [], False
    for _, action in ordered(actions):
        if action["Type"] in AUTHENTICATE_ACTIONS:
            authenticated = True
        elif action["Type"] == "forward" and not authenticated:
            forwards.append(action)
    return forwards


def test_authentication_check_can_fail():
    target = {"Type": "forward", "TargetGroupArn": "tg"}
    oidc = {"Type": "authenticate-oidc", "AuthenticateOidcConfig": {}}
    assert unauthenticated_forwards([target]) == [target]
    assert unauthenticated_forwards([{**target, "Order": 1}, {**oidc, "Order": 2}]) == [{**target, "Order": 1}]
    assert unauthenticated_forwards([{**oidc, "Order": 1}, {**target, "Order": 2}]) == []


def test_no_listener_forwards_without_authentication(stack, template):
    """On what moto created (every listener and every rule of the load balancer) and on the
    template (moto resolves no ListenerRule conditions, so rules are read there too)."""
    found = listeners(stack)
    assert set(found) == {80, 443}
    for port, listener in found.items():
        for rule in rules_of(stack, listener):
            assert not unauthenticated_forwards(rule["Actions"]), (port, rule)
        assert not unauthenticated_forwards(listener["DefaultActions"]), port

    for name, res in template["Resources"].items():
        if res["Type"] == "AWS::ElasticLoadBalancingV2::Listener":
            assert not unauthenticated_forwards(res["Properties"]["DefaultActions"]), name
        if res["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule":
            assert not unauthenticated_forwards(res["Properties"]["Actions"]), name


def test_http_listener_only_redirects_to_https(stack):
    http = listeners(stack)[80]
    assert http["Protocol"] == "HTTP"
    (rule,) = rules_of(stack, http)
    assert rule["IsDefault"] is True
    for actions in (http["DefaultActions"], rule["Actions"]):
        (action,) = actions
        assert action["Type"] == "redirect"
        redirect = action["RedirectConfig"]
        assert (redirect["Protocol"], redirect["Port"], redirect["StatusCode"]) == ("HTTPS", "443", "HTTP_301")
        assert redirect["Host"] == "#{host}"


def test_https_listener_signs_in_through_the_identity_provider_over_tls_1_2_or_newer(stack, template):
    https = listeners(stack)[443]
    params = stack["params"]
    assert https["Protocol"] == "HTTPS"
    assert [c["CertificateArn"] for c in https["Certificates"]] == [params["WebserverCertificateArn"]]
    (policy,) = stack["elbv2"].describe_ssl_policies(Names=[https["SslPolicy"]])["SslPolicies"]
    assert set(policy["SslProtocols"]) <= TLS_1_2_OR_NEWER, policy["SslProtocols"]

    first, last = (action for _, action in ordered(https["DefaultActions"]))
    assert first["Type"] == "authenticate-oidc"
    oidc = first["AuthenticateOidcConfig"]
    assert oidc["Issuer"] == params["OidcIssuer"]
    assert oidc["AuthorizationEndpoint"] == params["OidcAuthorizationEndpoint"]
    assert oidc["TokenEndpoint"] == params["OidcTokenEndpoint"]
    assert oidc["UserInfoEndpoint"] == params["OidcUserInfoEndpoint"]
    assert oidc["ClientId"] == params["OidcClientId"]
    assert oidc.get("OnUnauthenticatedRequest", "authenticate") == "authenticate"
    assert last == {"Type": "forward", "TargetGroupArn": physical_id(stack, "WebserverTargetGroup")}

    # The client secret is resolved from Secrets Manager at deploy time (moto passes the
    # dynamic reference through; ELB never returns it), never written in the template.
    (listener,) = (
        r
        for r in template["Resources"].values()
        if r["Type"] == "AWS::ElasticLoadBalancingV2::Listener" and r["Properties"]["Protocol"] == "HTTPS"
    )
    (authenticate,) = (a for a in listener["Properties"]["DefaultActions"] if a["Type"] == "authenticate-oidc")
    assert authenticate["AuthenticateOidcConfig"]["ClientSecret"] == {
        "Fn::Sub": "{{resolve:secretsmanager:${OidcClientSecretArn}:SecretString:client_secret}}"
    }
    assert "UseExistingClientSecret" not in authenticate["AuthenticateOidcConfig"]


def test_allowed_cidr_parameter_rejects_the_open_internet(template):
    param = template["Parameters"]["WebserverAllowedCidr"]
    assert "Default" not in param
    pattern = re.compile(param["AllowedPattern"])
    for bad in ("0.0.0.0/0", "0.0.0.0/1", "10.0.0.0/4", "", "10.0.0.0", "anywhere", "::/0"):
        assert not pattern.fullmatch(bad), bad
    for good in (ALLOWED_CIDR, "192.168.1.10/32", "10.0.0.0/8"):
        assert pattern.fullmatch(good), good


def test_ui_parameters_accept_only_https_endpoints_and_real_names(template):
    params = template["Parameters"]
    for name in ("OidcIssuer", "OidcAuthorizationEndpoint", "OidcTokenEndpoint", "OidcUserInfoEndpoint"):
        pattern = re.compile(params[name]["AllowedPattern"])
        assert pattern.fullmatch(f"{IDP}/v1/token"), name
        for bad in ("http://login.example.com/token", "login.example.com", "https://", "https://a b", ""):
            assert not pattern.fullmatch(bad), (name, bad)
    host = re.compile(params["WebserverDomainName"]["AllowedPattern"])
    assert host.fullmatch(UI_DOMAIN)
    for bad in ("https://dagster.example.com", "dagster", "Dagster.Example.com", "dagster.example.com/", ""):
        assert not host.fullmatch(bad), bad
    certificate = re.compile(params["WebserverCertificateArn"]["AllowedPattern"])
    assert certificate.fullmatch(f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/0a1b2c3d-4e5f-6789-abcd-ef0123456789")
    assert not certificate.fullmatch(f"arn:aws:iam::{ACCOUNT}:server-certificate/dagster")
    secret = re.compile(params["OidcClientSecretArn"]["AllowedPattern"])
    assert not secret.fullmatch("dagster-ui-oidc")
    for name in ("WebserverDomainName", "WebserverCertificateArn", "OidcClientId", "OidcClientSecretArn"):
        assert "Default" not in params[name], name


def test_database_is_private_encrypted_and_only_reachable_from_dagster(stack, template):
    (db,) = stack["rds"].describe_db_instances()["DBInstances"]
    assert db["PubliclyAccessible"] is False
    assert db["StorageEncrypted"] is True
    assert db["Engine"] == "postgres"

    rules = stack["ec2"].describe_security_groups(GroupIds=[physical_id(stack, "DatabaseSecurityGroup")])[
        "SecurityGroups"
    ][0]["IpPermissions"]
    assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(5432, 5432)}
    assert all(r["IpRanges"] == [] for r in rules)
    assert sorted(p["GroupId"] for r in rules for p in r["UserIdGroupPairs"]) == sorted(
        physical_id(stack, g) for g in ("TasksSecurityGroup", "WebserverSecurityGroup")
    )

    # A standby in a second AZ unless the stack says otherwise; kept at least a week,
    # undeletable, and with OS metrics every minute (moto keeps no deletion protection or
    # monitoring settings, so those are read on the template).
    assert db["MultiAZ"] is True
    assert template["Parameters"]["DbMultiAz"]["Default"] == "true"
    assert db["BackupRetentionPeriod"] >= 7
    props = template["Resources"]["Database"]["Properties"]
    assert props["MultiAZ"] == {"Ref": "DbMultiAz"}
    assert props["DeletionProtection"] is True
    assert props["MonitoringInterval"] in (1, 5, 10, 15, 30, 60)
    assert props["MonitoringRoleArn"] == {"Fn::GetAtt": ["DatabaseMonitoringRole", "Arn"]}
    iam, role = stack["iam"], physical_id(stack, "DatabaseMonitoringRole")
    (trust,) = policy_document(iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"])["Statement"]
    assert trust["Principal"] == {"Service": "monitoring.rds.amazonaws.com"}
    assert role_statements(stack, "DatabaseMonitoringRole") == []
    # moto does not attach a CloudFormation role's ManagedPolicyArns: read on the template.
    assert template["Resources"]["DatabaseMonitoringRole"]["Properties"]["ManagedPolicyArns"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"}
    ]

    # The password is generated by Secrets Manager and resolved at deploy time.
    for key in ("MasterUserPassword", "MasterUsername"):
        assert props[key] == {
            "Fn::Sub": "{{resolve:secretsmanager:${DatabaseSecret}:SecretString:%s}}"
            % ("password" if key == "MasterUserPassword" else "username")
        }


def test_redshift_federation_role_reads_only_the_replica_secret(stack, template):
    iam = stack["iam"]
    name = physical_id(stack, "RedshiftFederationRole")
    trust = policy_document(iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"])
    (statement,) = trust["Statement"]
    assert statement["Principal"] == {"Service": "redshift.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"

    assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
    # ...which moto would also report if the template attached one (it drops a
    # CloudFormation role's ManagedPolicyArns), so the template is read too.
    assert "ManagedPolicyArns" not in template["Resources"]["RedshiftFederationRole"]["Properties"]
    (only,) = role_statements(stack, "RedshiftFederationRole")
    assert only["Effect"] == "Allow"
    assert as_list(only["Action"]) == ["secretsmanager:GetSecretValue"]
    assert as_list(only["Resource"]) == [stack["params"]["ReplicaSecretArn"]]
    assert stack["outputs"]["RedshiftFederationRoleArn"] == iam.get_role(RoleName=name)["Role"]["Arn"]


def test_log_groups_have_retention(stack):
    groups = stack["logs"].describe_log_groups(logGroupNamePrefix=f"/ecs/{STACK}/")["logGroups"]
    assert {g["logGroupName"].rsplit("/", 1)[1] for g in groups} == {"webserver", "daemon", "code-server", "run"}
    assert all(g.get("retentionInDays") for g in groups)


def test_secrets_and_logs_are_under_customer_managed_keys(stack, template):
    kms, res = stack["kms"], template["Resources"]
    for logical in ("SecretsKey", "LogsKey"):
        key = physical_id(stack, logical)
        assert kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is True, logical
        policy = policy_document(kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
        for statement in policy["Statement"]:
            principal = statement["Principal"]
            assert principal != "*" and principal.get("AWS") != "*", (logical, statement)
            if "Service" in principal:
                # Only CloudWatch Logs, and only for this stack's log groups.
                assert logical == "LogsKey" and principal["Service"] == f"logs.{REGION}.amazonaws.com"
                context = statement["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]
                assert context == f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/{STACK}/*"
            else:
                assert principal == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, (logical, statement)

    # moto's log groups and secrets do not keep their KMS key: read on the template.
    log_groups = [name for name, r in res.items() if r["Type"] == "AWS::Logs::LogGroup"]
    assert len(log_groups) == 4
    for name in log_groups:
        assert res[name]["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["LogsKey", "Arn"]}, name
    assert res["DatabaseSecret"]["Properties"]["KmsKeyId"] == {"Ref": "SecretsKey"}
    assert res["SecretsKey"]["DeletionPolicy"] == res["DatabaseSecret"]["DeletionPolicy"] == "Retain"

    # Only the execution role (which injects the database secret) may decrypt, only that
    # key, and only through Secrets Manager.
    # (The key's ARN is built here: moto's DescribeKey fails on a key policy that
    # CloudFormation handed over as an object.)
    secrets_key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{physical_id(stack, 'SecretsKey')}"
    for role, statements in all_role_statements(stack).items():
        kms_statements = [s for s in statements if any(a.startswith("kms:") for a in as_list(s["Action"]))]
        if role != "TaskExecutionRole":
            assert not kms_statements, role
            continue
        (decrypt,) = kms_statements
        assert as_list(decrypt["Action"]) == ["kms:Decrypt"]
        assert as_list(decrypt["Resource"]) == [secrets_key_arn]
        assert decrypt["Condition"]["StringEquals"]["kms:ViaService"] == f"secretsmanager.{REGION}.amazonaws.com"


def test_resources_moto_cannot_model(template):
    res = template["Resources"]
    by_type: dict[str, list[str]] = {}
    for name, r in res.items():
        by_type.setdefault(r["Type"], []).append(name)

    # Buckets (moto ignores versioning and logging settings): encrypted, no public access,
    # versioned with noncurrent versions expiring, TLS only.
    assert sorted(by_type["AWS::S3::Bucket"]) == ["AccessLogsBucket", "ComputeLogsBucket"]
    policies = {res[p]["Properties"]["Bucket"]["Ref"]: res[p]["Properties"] for p in by_type["AWS::S3::BucketPolicy"]}
    for bucket in by_type["AWS::S3::Bucket"]:
        props = res[bucket]["Properties"]
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], bucket
        assert all(
            props["PublicAccessBlockConfiguration"][k] is True
            for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
        ), bucket
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}, bucket
        rules = props["LifecycleConfiguration"]["Rules"]
        assert any(r.get("NoncurrentVersionExpiration") and "Prefix" not in r for r in rules), bucket
        statements = policies[bucket]["PolicyDocument"]["Statement"]
        assert any(
            s["Effect"] == "Deny" and s["Condition"]["Bool"]["aws:SecureTransport"] == "false" for s in statements
        ), bucket
    # The platform bucket grants nothing; its requests are logged to the access-logs bucket.
    assert not any(s["Effect"] == "Allow" for s in policies["ComputeLogsBucket"]["PolicyDocument"]["Statement"])
    logging = res["ComputeLogsBucket"]["Properties"]["LoggingConfiguration"]
    assert logging["DestinationBucketName"] == {"Ref": "AccessLogsBucket"}
    # Log deliveries accept only SSE-S3 on their target bucket.
    (encryption,) = res["AccessLogsBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    # The access-logs bucket may only be written by the two log deliveries, under their prefixes.
    allows = [s for s in policies["AccessLogsBucket"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    writers = {s["Sid"]: s for s in allows}
    assert set(writers) == {"S3ServerAccessLogsOfThePlatformBucket", "LoadBalancerAccessLogs"}
    assert all(as_list(s["Action"]) == ["s3:PutObject"] for s in allows)
    s3_logs = writers["S3ServerAccessLogsOfThePlatformBucket"]
    assert s3_logs["Principal"] == {"Service": "logging.s3.amazonaws.com"}
    assert s3_logs["Resource"] == {"Fn::Sub": "${AccessLogsBucket.Arn}/" + logging["LogFilePrefix"] + "*"}
    assert s3_logs["Condition"]["ArnLike"]["aws:SourceArn"] == {"Fn::GetAtt": ["ComputeLogsBucket", "Arn"]}
    alb_logs = writers["LoadBalancerAccessLogs"]
    assert alb_logs["Principal"]["Fn::If"][0] == "ElbLogsByServicePrincipal"

    # The load balancer writes its access logs there (moto ignores load balancer attributes).
    lb = res["LoadBalancer"]
    attributes = {a["Key"]: a["Value"] for a in lb["Properties"]["LoadBalancerAttributes"]}
    assert attributes["access_logs.s3.enabled"] == "true"
    assert attributes["access_logs.s3.bucket"] == {"Ref": "AccessLogsBucket"}
    prefix = attributes["access_logs.s3.prefix"]
    assert alb_logs["Resource"] == {"Fn::Sub": "${AccessLogsBucket.Arn}/" + prefix + "/AWSLogs/${AWS::AccountId}/*"}
    assert "AccessLogsBucketPolicy" in as_list(lb["DependsOn"])

    # Dagster DB secret: generated, never a literal.
    (secret,) = by_type["AWS::SecretsManager::Secret"]
    secret_props = res[secret]["Properties"]
    assert "SecretString" not in secret_props
    assert secret_props["GenerateSecretString"]["GenerateStringKey"] == "password"
    (attachment,) = by_type["AWS::SecretsManager::SecretTargetAttachment"]
    assert res[attachment]["Properties"]["TargetId"] == {"Ref": "Database"}

    # Code server discovery: the name webserver and daemon use is the registered one.
    (namespace,) = by_type["AWS::ServiceDiscovery::PrivateDnsNamespace"]
    (discovery,) = by_type["AWS::ServiceDiscovery::Service"]
    registries = res["CodeServerService"]["Properties"]["ServiceRegistries"]
    assert registries == [{"RegistryArn": {"Fn::GetAtt": [discovery, "Arn"]}}]
    host = "{}.{}".format(res[discovery]["Properties"]["Name"], res[namespace]["Properties"]["Name"]["Fn::Sub"])
    for td in ("WebserverTaskDefinition", "DaemonTaskDefinition"):
        (container,) = res[td]["Properties"]["ContainerDefinitions"]
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert env["DAGSTER_CODE_SERVER_HOST"] == {"Fn::Sub": host}


def test_single_daemon_and_private_tasks(template):
    res = template["Resources"]
    daemon = res["DaemonService"]["Properties"]
    assert daemon["DesiredCount"] == 1
    assert daemon["DeploymentConfiguration"]["MaximumPercent"] == 100
    for name, r in res.items():
        if r["Type"] == "AWS::ECS::Service":
            vpc = r["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
            assert vpc["AssignPublicIp"] == "DISABLED", name
    assert res["LoadBalancer"]["Properties"]["Scheme"] == "internal"


def test_platform_code_gets_every_variable_it_requires_in_prod(stack):
    """platform_assets.settings lists what PLATFORM_ENV=prod needs; the code server (which
    imports the definitions) and every run task must provide all of it."""
    from platform_assets import settings

    required = set(settings.REQUIRED_VARIABLES["prod"])
    ecs = stack["ecs"]
    for logical in ("CodeServerTaskDefinition", "RunTaskDefinition"):
        td = ecs.describe_task_definition(taskDefinition=physical_id(stack, logical))
        (container,) = td["taskDefinition"]["containerDefinitions"]
        env = {e["name"]: e["value"] for e in container.get("environment", [])}
        secrets = {s["name"] for s in container.get("secrets", [])}
        assert env.get("PLATFORM_ENV") == "prod", logical
        missing = required - set(env) - secrets
        assert not missing, f"{logical} lacks {sorted(missing)}"
        # Credentials only ever arrive as secrets.
        assert not {k for k in env if k.endswith(("PASSWORD", "_USER"))}, logical
    # The replica URL carries no credentials; libpq reads them from PGUSER/PGPASSWORD.
    url = env["REPLICA_URL"]
    assert "@" not in url and url.startswith("postgresql://replica-1.")
    assert {"PGUSER", "PGPASSWORD"} <= secrets
