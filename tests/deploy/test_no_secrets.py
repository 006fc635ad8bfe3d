"""No plain-text secret in deploy/ or .github/: AWS keys, private keys, literal passwords
or tokens, credentials inside connection URLs, and CloudFormation parameters that would
echo a secret. The scanner is checked against planted examples first, so a scanner that
finds nothing cannot pass for a clean tree."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from cfnlint.decode import decode_str

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("deploy", ".github")
SKIP_PARTS = {"__pycache__", ".pytest_cache", "node_modules"}
MAX_BYTES = 2_000_000

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
AWS_SECRET_KEY = re.compile(r"(?i)aws_?secret_?access_?key\W{0,4}[=:]\W{0,4}[A-Za-z0-9/+]{40}\b")
# A key that names a credential: ...password, ...passwd, ...secret, ...token, ...api_key,
# ...access_key(_id) (so `PasswordLength`, `ReplicaSecretArn` or `secrets:` are not).
CREDENTIAL_KEY = re.compile(
    r"""(?ix)
    ["']?(?P<key>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key(?:[_-]?id)?))
    ["']?\s*(?P<sep>:(?=\s)|=|:$)\s*(?P<value>.*)$
    """
)
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://(?P<user>[^\s:/@{}$]+):(?P<password>[^\s@/]+)@")
SQL_PASSWORD = re.compile(r"(?i)\bPASSWORD\s+'(?P<value>[^']+)'")
# Values that are references to where the secret really lives, not the secret.
REFERENCE = re.compile(
    r"""(?x)
    \{\s*env\s*:            # dagster {env: VAR}
    | \$\{\{                 # GitHub expression ${{ secrets.X }} / ${{ vars.X }}
    | \{\{\s*resolve:        # CloudFormation dynamic reference
    | \$\{ | \$[A-Za-z_(]   # shell / Fn::Sub variable
    | !(?:Ref|Sub|GetAtt|ImportValue|Join|Select|If)\b
    | \bFn::|\bRef\b
    | env_var\(|os\.environ|getenv\(|EnvVar\(
    """
)
HARMLESS_WORDS = {
    "",
    "true",
    "false",
    "null",
    "none",
    "~",
    "read",
    "write",
    "yes",
    "no",
    "required",
    "optional",
    '""',
    "''",
    "[]",
    "{}",
}
NOECHO_NAME = re.compile(r"(?i)(password|passwd|secret|token|apikey|api_key|privatekey)$")


@dataclass(frozen=True)
class Finding:
    where: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.kind}: {self.text.strip()[:120]}"


def _literal_value(value: str, python: bool) -> str | None:
    """The literal a credential key is set to, or None if it is a reference/expression."""
    value = value.strip().rstrip("\\").strip()
    value = re.sub(r"\s+#.*$", "", value)  # trailing comment
    if value.lower() in HARMLESS_WORDS or value[:2] in {'""', "''"}:
        return None
    if REFERENCE.search(value):
        return None
    if value[:1] in "{[(|>&*":
        return None  # mapping, list, call, block scalar, anchor: not a scalar literal
    quoted = re.match(r"""^(['"])(.*?)\1""", value)
    if python:
        # In code, only a quoted string is a literal; names and calls are expressions.
        return quoted.group(2) if quoted and quoted.group(2) else None
    literal = quoted.group(2) if quoted else value.split()[0].rstrip(",;")
    return literal or None


def scan_text(text: str, where: str) -> list[Finding]:
    python = where.endswith(".py")
    markdown = where.endswith(".md")
    in_code_block = False
    findings = []
    for number, line in enumerate(text.splitlines(), start=1):
        if markdown and line.lstrip().startswith("```"):
            in_code_block = not in_code_block
        for regex, kind in (
            (AWS_KEY_ID, "AWS access key id"),
            (PRIVATE_KEY, "private key"),
            (AWS_SECRET_KEY, "AWS secret access key"),
        ):
            if regex.search(line):
                findings.append(Finding(where, number, kind, line))
        for match in URL_CREDENTIALS.finditer(line):
            if not REFERENCE.search(match.group("password")) and "{" not in match.group("password"):
                findings.append(Finding(where, number, "credentials in a URL", line))
        sql = SQL_PASSWORD.search(line)
        if sql and not REFERENCE.search(sql.group("value")):
            findings.append(Finding(where, number, "SQL password literal", line))
        stripped = line.strip()
        if stripped.startswith(("#", "//", "--")):
            continue
        if markdown and not in_code_block:
            continue  # prose and tables say "password: ..." without meaning a value
        # Every place a key can start: the line start and after a space, comma or brace.
        starts = [0] + [m.start() for m in re.finditer(r"(?<=[\s,{(])(?=[A-Za-z_\"'])", stripped)]
        for start in starts:
            match = CREDENTIAL_KEY.match(stripped[start:])
            if not match:
                continue
            key = match.group("key").lower()
            # GitHub's `permissions: id-token: write` names a permission, not a token.
            if key == "id-token":
                continue
            if _literal_value(match.group("value"), python) is not None:
                findings.append(Finding(where, number, f"literal value for {match.group('key')}", line))
    return findings


def scan_template_parameters(text: str, where: str) -> list[Finding]:
    """CloudFormation parameters that carry a secret must be NoEcho."""
    template, matches = decode_str(text)
    if matches or not isinstance(template, dict) or "Resources" not in template:
        return []
    findings = []
    for name, param in (template.get("Parameters") or {}).items():
        if NOECHO_NAME.search(name) and not param.get("NoEcho"):
            findings.append(Finding(where, 0, f"parameter {name} without NoEcho", name))
        if NOECHO_NAME.search(name) and "Default" in param:
            findings.append(Finding(where, 0, f"parameter {name} has a default value", name))
    return findings


def scanned_files() -> list[Path]:
    files = []
    for directory in SCANNED_DIRS:
        root = REPO_ROOT / directory
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_file() and not SKIP_PARTS & set(path.parts) and path.stat().st_size < MAX_BYTES:
                files.append(path)
    return files


def scan_file(path: Path) -> list[Finding]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return []  # binary
    where = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)
    findings = scan_text(text, where)
    if path.suffix in {".yaml", ".yml", ".json"} and "AWSTemplateFormatVersion" in text:
        findings += scan_template_parameters(text, where)
    return findings


# ------------------------------------------------------------------ the scanner can fail
# Planted examples, assembled at run time so that no scanner (this one included) finds a
# key-shaped string in this file's source.
PLANTED_KEY_ID = "AKIA" + "IOSFODNN7" + "EXAMPLE"
PLANTED = {
    "aws key id": (f"aws_access_key_id = {PLANTED_KEY_ID}\n", "x.ini"),
    "private key": ("-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow...\n", "id_rsa"),
    "yaml password": ("storage:\n  postgres:\n    password: hunter2-in-clear\n", "dagster.yaml"),
    "cfn password": ("      MasterUserPassword: SuperSecret123\n", "stack.yaml"),
    "env file": ("REDSHIFT_PASSWORD=s3cr3t-value\n", "prod.env"),
    "python": ('DB_PASSWORD = "correct-horse-battery"\n', "settings.py"),
    "url": ("url: postgresql://dagster:pl41n@db.example.com:5432/dagster\n", "x.yaml"),
    "sql": ("CREATE ROLE ro LOGIN PASSWORD 'pl41n';\n", "x.sql"),
    "workflow token": ("        with:\n          token: ghp_notarealtokenbutaliteral\n", "wf.yml"),
    "markdown code block": ("Run:\n```\nexport PGPASSWORD=pl41n-in-docs\n```\n", "README.md"),
}
CLEAN = {
    "dagster env": ("password: {env: DAGSTER_PG_PASSWORD}\n", "dagster.yaml"),
    "cfn resolve": (
        '      MasterUserPassword: !Sub "{{resolve:secretsmanager:${DatabaseSecret}:SecretString:password}}"\n',
        "stack.yaml",
    ),
    "cfn ref": ("      MasterUserPassword: !Ref DbPassword\n", "stack.yaml"),
    "ecs secret": (
        '            - {Name: PGPASSWORD, ValueFrom: !Sub "${ReplicaSecretArn}:password::"}\n',
        "stack.yaml",
    ),
    "github": ("          token: ${{ secrets.GITHUB_TOKEN }}\n", "wf.yml"),
    "permission": ("      id-token: write\n", "wf.yml"),
    "python expr": ('            "REPLICA_PASSWORD": ro,\n', "environment.py"),
    "python call": ("    password = passwords[role]\n", "cluster.py"),
    "empty": ('RUN REDSHIFT_PASSWORD="" dbt parse\n', "Dockerfile"),
    "length": ("        PasswordLength: 32\n", "stack.yaml"),
    "url ref": ("REPLICA_URL=postgresql://${REPLICA_USER}:${REPLICA_PASSWORD}@h:5432/db\n", "x.env"),
    "markdown prose": ("| `DAGSTER_PG_PASSWORD` | secret: generated DB secret, key `password` |\n", "README.md"),
    "url without credentials": ('- {Name: REPLICA_URL, Value: !Sub "postgresql://${Host}:5432/db"}\n', "stack.yaml"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_scanner_flags_planted_secret(name):
    text, where = PLANTED[name]
    assert scan_text(text, where), f"scanner missed the planted {name}"


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_scanner_accepts_references(name):
    text, where = CLEAN[name]
    assert scan_text(text, where) == []


def test_scanner_flags_echoing_template_parameter():
    template = (
        "AWSTemplateFormatVersion: '2010-09-09'\n"
        "Parameters:\n  DbPassword:\n    Type: String\n"
        "Resources:\n  Topic:\n    Type: AWS::SNS::Topic\n"
    )
    assert scan_template_parameters(template, "t.yaml")
    no_echo = template.replace("Type: String\n", "Type: String\n    NoEcho: true\n", 1)
    assert not scan_template_parameters(no_echo, "t.yaml")


# ------------------------------------------------------------------ the real tree
def test_scans_the_deploy_files():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in scanned_files()}
    assert {
        "deploy/dagster.yaml",
        "deploy/Dockerfile",
        "deploy/aws/platform.yaml",
        ".github/workflows/deploy.yml",
    } <= names


def test_no_plain_text_secrets_in_deploy_and_github():
    findings = [f for path in scanned_files() for f in scan_file(path)]
    assert not findings, "\n".join(str(f) for f in findings)
