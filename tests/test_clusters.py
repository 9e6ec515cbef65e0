"""The cloud cluster configurations, checked offline (no cloud credentials, no network):

- each ``clusters/*.yaml`` passes Ray's own cluster-config validation (its JSON schema on the file as
  written, then ``prepare_config`` + ``validate_config`` exactly as ``ray up`` does before bootstrapping),
  and deliberately broken copies are rejected;
- the safety properties raysd promises (dashboard on 127.0.0.1 only, no port opened beyond SSH, token
  authentication, bucket-scoped roles) hold in the YAMLs and in the one-time setup scripts, which run here
  against stub ``aws`` / ``gcloud`` commands that record their arguments;
- ``.rayignore`` keeps caches, data, experiments, results and the virtual environment out of the working
  directory ``ray job submit --working-dir .`` uploads (checked with Ray's own packaging code).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
GPU_INSTANCE = {"aws": "p4d.24xlarge", "gcp": "a2-highgpu-8g"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def ray_validate(config: dict) -> dict:
    """Ray's validation as `ray up` runs it, offline: the schema on the file as written, then defaults
    filled in (``prepare_config``) and ``validate_config``. Returns the prepared config."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def raysd_validate(config: dict) -> None:
    """What raysd adds: CPU and GPU stated on every node type, per-type min_workers <= max_workers."""
    for name, node in config["available_node_types"].items():
        res = node.get("resources", {})
        missing = [k for k in ("CPU", "GPU") if not isinstance(res.get(k), int)]
        if missing:
            raise ValueError(f"node type {name}: resources must state {' and '.join(missing)} explicitly")
        if node.get("min_workers", 0) > node.get("max_workers", config.get("max_workers", 0)):
            raise ValueError(f"node type {name}: min_workers {node['min_workers']} > max_workers {node['max_workers']}")


@pytest.fixture(scope="module", params=["aws", "gcp"])
def cloud(request) -> str:
    return request.param


def test_cluster_yaml_passes_ray_validation(cloud):
    config = load(f"{cloud}-a100.yaml")
    prepared = ray_validate(config)
    raysd_validate(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    instance_key = "InstanceType" if cloud == "aws" else "machineType"
    for node in workers.values():
        assert node["resources"] == {"CPU": 96, "GPU": 8}
        assert node["node_config"][instance_key] == GPU_INSTANCE[cloud]
        assert node["min_workers"] == 0  # autoscaling from zero: no idle A100s
    spot = [k for k, v in workers.items() if json.dumps(v["node_config"]).lower().count("spot")]
    assert len(spot) == 1 and len(workers) == 2, "one on-demand and one spot worker type"
    assert prepared["provider"]["type"] == cloud
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def _drop(path: list[str]):
    def edit(c: dict) -> None:
        node = c
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _set(path: list[str], value):
    def edit(c: dict) -> None:
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


BROKEN = {
    # name: (edit, which check rejects it, message pattern)
    "missing-provider": (_drop(["provider"]), "ray", r"'provider' is a required property"),
    "provider-without-type": (_drop(["provider", "type"]), "ray", r"'type' is a required property"),
    "node-type-without-resources": (_drop(["available_node_types", "a100_spot", "resources"]), "ray",
                                    r"'resources' is a required property"),
    "unknown-top-level-key": (_set(["dashboard_port"], 8265), "ray", r"'dashboard_port' was unexpected"),
    "unknown-node-type-key": (_set(["available_node_types", "a100_spot", "gpus"], 8), "ray", r"'gpus' was unexpected"),
    "fractional-gpu-count": (_set(["available_node_types", "a100_spot", "resources", "GPU"], 0.5), "ray",
                             r"0.5 is not of type 'integer'"),
    "min-workers-above-cluster-max": (_set(["available_node_types", "a100_spot", "min_workers"], 5), "ray",
                                      r"smaller than the sum of `min_workers`"),
    "unknown-head-node-type": (_set(["head_node_type"], "cpu_head"), "ray",
                               r"`head_node_type` must be one of `available_node_types`"),
    "min-workers-above-type-max": (_set(["available_node_types", "a100_ondemand", "min_workers"], 3), "raysd",
                                   r"a100_ondemand: min_workers 3 > max_workers 2"),
    "node-type-without-gpu-count": (_set(["available_node_types", "a100_spot", "resources"], {"CPU": 96}), "raysd",
                                    r"a100_spot: resources must state GPU"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copies_are_rejected(cloud, case):
    edit, checker, message = BROKEN[case]
    config = load(f"{cloud}-a100.yaml")
    edit(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)) as err:
        ray_validate(config)
        raysd_validate(config)  # only reached when Ray accepts the copy
    assert re.search(message, str(err.value)), str(err.value)
    if checker == "raysd":  # Ray itself accepts these; raysd's own check is what rejects them
        ray_validate(config)


def start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def test_cluster_yaml_is_safe_by_default(cloud):
    text = (CLUSTERS / f"{cloud}-a100.yaml").read_text()
    config = yaml.safe_load(text)
    prepared = ray_validate(config)
    # no Ray port faces the internet: the dashboard binds to the head's loopback, nothing opens 0.0.0.0/0
    assert "0.0.0.0" not in text
    [head_start] = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    if cloud == "aws":
        assert "IpPermissions" not in prepared["provider"].get("security_group", {})
        assert prepared["provider"]["security_group"]["GroupName"] == config["cluster_name"]
    else:
        for node in config["available_node_types"].values():
            assert node["node_config"]["tags"]["items"] == ["raysd"]
            [nic] = node["node_config"]["networkInterfaces"]
            assert nic["subnetwork"].endswith("/subnetworks/raysd-subnet")
    # token authentication on every node, with the token the user generated
    for cmd in start_commands(config):
        assert "RAY_AUTH_MODE=token" in cmd
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # least-privilege identities made by the setup script, distinct for head and workers
    for name, node in config["available_node_types"].items():
        role = "head" if name == config["head_node_type"] else "worker"
        if cloud == "aws":
            assert node["node_config"]["IamInstanceProfile"] == {"Name": f"raysd-a100-{role}"}
            assert node["node_config"]["MetadataOptions"] == {"HttpTokens": "required"}
        else:
            [sa] = node["node_config"]["serviceAccounts"]
            assert sa["email"] == f"raysd-{role}@__PROJECT__.iam.gserviceaccount.com"
    # data and caches on node-local disk; no credentials in the file
    setup = "\n".join(config["setup_commands"])
    assert "python -m raysd.data.download dcase20 --dest /mnt/local" in setup
    assert "export RAYSD_CACHE=/mnt/local/" in setup and "RAYSD_DCASE20_ROOT=/mnt/local/dcase2020" in setup
    # every node installs the tested set, not open ranges, and checks it; GPU nodes check that torch sees the GPUs
    assert config["file_mounts"]["~/raysd/constraints.txt"] == "./constraints.txt"
    installs = [c for c in config["setup_commands"] if "pip install" in c and "raysd" in c]
    assert installs and all("-c ~/raysd/constraints.txt" in c and ">=" not in c for c in installs)
    assert "--python 3.11" in setup and "python -m raysd.doctor --quick" in setup
    assert any("raysd.doctor --quick --require-cuda" in c for c in config["worker_setup_commands"])
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|private_key", text)
    # only small parts of the checkout are copied, and they exist
    for remote, local in config["file_mounts"].items():
        if local.startswith("./"):
            assert (REPO / local).exists(), local
    assert "." not in config["file_mounts"].values()


# ---------------------------------------------------------------------------------------------- setup scripts
STUB = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
joined = " ".join(args)
for sub, out, rc in json.loads(os.environ["STUB_RULES"]):
    if sub in joined:
        sys.stdout.write(out)
        sys.exit(rc)
"""


def run_setup(tmp_path: Path, script: str, tool: str, rules: list, *args: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run a copy of clusters/<script> with a stub ``tool`` on PATH; returns the result and the stub's calls."""
    work = tmp_path / "clusters"
    shutil.copytree(CLUSTERS, work, ignore=shutil.ignore_patterns("*.*.yaml"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / tool
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_RULES": json.dumps(rules)}
    proc = subprocess.run(["bash", str(work / script), *args], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def opt(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


AWS_RULES = [["sts get-caller-identity", "123456789012\n", 0], ["s3api head-bucket", "", 254],
             ["iam get-role", "", 254], ["iam get-instance-profile", "", 254],
             ["ec2 describe-vpcs", "vpc-0abc\n", 0], ["ec2 describe-security-groups", "None\n", 0],
             ["ec2 create-security-group", "sg-0123\n", 0]]


def _actions(statement: dict) -> list[str]:
    a = statement["Action"]
    return [a] if isinstance(a, str) else a


def _resources(statement: dict) -> list[str]:
    r = statement["Resource"]
    return [r] if isinstance(r, str) else r


def test_aws_setup_grants_bucket_scoped_roles_and_ssh_only(tmp_path):
    proc, calls = run_setup(tmp_path, "aws-setup.sh", "aws", AWS_RULES, "--bucket", "raysd-test-results",
                            "--ssh-cidr", "198.51.100.7/32", "--region", "us-west-2")
    assert proc.returncode == 0, proc.stderr
    config = load("aws-a100.yaml")
    bucket_arns = {"arn:aws:s3:::raysd-test-results", "arn:aws:s3:::raysd-test-results/*"}

    create = [c for c in calls if c[:2] == ["s3api", "create-bucket"]]
    assert len(create) == 1 and opt(create[0], "--create-bucket-configuration") == "LocationConstraint=us-west-2"
    [block] = [c for c in calls if c[:2] == ["s3api", "put-public-access-block"]]
    assert opt(block, "--public-access-block-configuration").count("=true") == 4

    policies = {opt(c, "--role-name"): json.loads(opt(c, "--policy-document"))
                for c in calls if c[:2] == ["iam", "put-role-policy"]}
    profiles = {opt(c, "--instance-profile-name") for c in calls if c[:2] == ["iam", "create-instance-profile"]}
    yaml_profiles = {n["node_config"]["IamInstanceProfile"]["Name"] for n in config["available_node_types"].values()}
    assert set(policies) == profiles == yaml_profiles == {"raysd-a100-head", "raysd-a100-worker"}
    for role, doc in policies.items():
        assert "__" not in json.dumps(doc), "unrendered placeholder"
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow" and "*" not in _actions(st)
            if any(a.startswith("s3:") for a in _actions(st)):
                assert all(a.startswith("s3:") for a in _actions(st)) and set(_resources(st)) <= bucket_arns
            elif role == "raysd-a100-worker":
                pytest.fail(f"the worker role may only use the bucket, got {st}")
            if _resources(st) == ["*"]:
                assert _actions(st) == ["ec2:Describe*"] or "Condition" in st, st
    head = policies["raysd-a100-head"]["Statement"]
    [pass_role] = [st for st in head if "iam:PassRole" in _actions(st)]
    assert _resources(pass_role) == ["arn:aws:iam::123456789012:role/raysd-a100-worker"]
    [terminate] = [st for st in head if "ec2:TerminateInstances" in _actions(st)]
    assert terminate["Condition"] == {"StringEquals": {"aws:ResourceTag/ray-cluster-name": config["cluster_name"]}}

    [sg] = [c for c in calls if c[:2] == ["ec2", "create-security-group"]]
    assert opt(sg, "--group-name") == config["provider"]["security_group"]["GroupName"]
    [ingress] = [c for c in calls if c[:2] == ["ec2", "authorize-security-group-ingress"]]
    rules = json.loads(opt(ingress, "--ip-permissions"))
    cidrs = [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort"), ip["CidrIp"]) for r in rules
             for ip in r.get("IpRanges", [])]
    assert cidrs == [("tcp", 22, 22, "198.51.100.7/32")]
    assert [r["UserIdGroupPairs"] for r in rules if "UserIdGroupPairs" in r] == [[{"GroupId": "sg-0123"}]]


@pytest.mark.parametrize("script, tool, extra", [("aws-setup.sh", "aws", []),
                                                 ("gcp-setup.sh", "gcloud", ["--project", "my-project-123"])])
@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.0/4", "my-laptop"])
def test_setup_scripts_refuse_wide_open_ssh(tmp_path, script, tool, extra, cidr):
    proc, calls = run_setup(tmp_path, script, tool, [], "--bucket", "raysd-test-results", "--ssh-cidr", cidr, *extra)
    assert proc.returncode != 0 and "--ssh-cidr" in proc.stderr
    assert calls == []


def test_gcp_setup_grants_bucket_scoped_accounts_and_ssh_only(tmp_path):
    proc, calls = run_setup(tmp_path, "gcp-setup.sh", "gcloud", [["describe", "", 1]], "--project", "my-project-123",
                            "--bucket", "raysd-test-results", "--ssh-cidr", "198.51.100.7/32")
    assert proc.returncode == 0, proc.stderr
    assert all(c[:3] == ["--project", "my-project-123", "--quiet"] for c in calls)
    calls = [c[3:] for c in calls]
    head_sa, worker_sa = (f"serviceAccount:raysd-{r}@my-project-123.iam.gserviceaccount.com" for r in ("head", "worker"))

    assert not any("0.0.0.0" in " ".join(c) for c in calls)
    firewall = {c[3]: c for c in calls if c[:3] == ["compute", "firewall-rules", "create"]}
    assert set(firewall) == {"raysd-allow-ssh", "raysd-allow-internal"}
    ssh, internal = firewall["raysd-allow-ssh"], firewall["raysd-allow-internal"]
    assert (opt(ssh, "--allow"), opt(ssh, "--source-ranges"), opt(ssh, "--target-tags")) == ("tcp:22", "198.51.100.7/32", "raysd")
    assert "--source-ranges" not in internal and opt(internal, "--source-tags") == opt(internal, "--target-tags") == "raysd"

    bucket = [c for c in calls if c[:3] == ["storage", "buckets", "add-iam-policy-binding"]]
    assert sorted((opt(c, "--member"), opt(c, "--role")) for c in bucket) == \
        sorted([(head_sa, "roles/storage.objectAdmin"), (worker_sa, "roles/storage.objectAdmin")])
    assert all(c[3] == "gs://raysd-test-results" for c in bucket)
    [create_bucket] = [c for c in calls if c[:3] == ["storage", "buckets", "create"]]
    assert "--public-access-prevention" in create_bucket and "--uniform-bucket-level-access" in create_bucket
    project = [c for c in calls if c[:2] == ["projects", "add-iam-policy-binding"]]
    assert [(opt(c, "--member"), opt(c, "--role")) for c in project] == [(head_sa, "roles/compute.instanceAdmin.v1")]
    [act_as] = [c for c in calls if c[:3] == ["iam", "service-accounts", "add-iam-policy-binding"]]
    assert act_as[3] == worker_sa.split(":", 1)[1] and opt(act_as, "--member") == head_sa
    assert opt(act_as, "--role") == "roles/iam.serviceAccountUser"

    out = tmp_path / "clusters" / "gcp-a100.my-project-123.yaml"
    config = yaml.safe_load(out.read_text())
    assert "__PROJECT__" not in out.read_text() and config["provider"]["project_id"] == "my-project-123"
    ray_validate(config)
    raysd_validate(config)
    emails = {n["node_config"]["serviceAccounts"][0]["email"] for n in config["available_node_types"].values()}
    assert emails == {head_sa.split(":", 1)[1], worker_sa.split(":", 1)[1]}


# ---------------------------------------------------------------------------------------------- working dir
@pytest.mark.parametrize("include_gitignore", [False, True])
def test_rayignore_keeps_bulk_out_of_the_job_upload(tmp_path, include_gitignore):
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "repo"
    kept = ["raysd/__init__.py", "raysd/data/download.py", "raysd/data/catalog.py", "search_spaces/dcase20.yaml",
            "clusters/aws-a100.yaml", "pyproject.toml", "tests/test_download.py"]
    dropped = [".venv/lib/python3.11/site-packages/torch/lib.so", "data/dcase2020/fan/train/normal_id_00_00000000.wav",
               "cache/features/abc/features.f32", "experiments/dcase20/studies/x.json", "results/dcase20/leaderboard.csv",
               "raysd/__pycache__/search.cpython-311.pyc", ".git/objects/ab/cdef", "raysd.egg-info/PKG-INFO",
               ".pytest_cache/v/cache/nodeids", "data/dcase2020/.raysd-download/dev_data_fan.zip.part",
               "clusters/gcp-a100.my-project.yaml", "build/lib/raysd/x.py"]
    for rel in kept + dropped:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "dist").mkdir()  # an empty folder would otherwise travel as a folder entry
    shutil.copy(REPO / ".rayignore", root / ".rayignore")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    out = tmp_path / "upload.zip"
    _zip_files(str(root), [], str(out), include_gitignore=include_gitignore)
    names = set(zipfile.ZipFile(out).namelist())
    assert set(kept) <= names
    assert not names & set(dropped), sorted(names & set(dropped))
    assert {n.split("/")[0] for n in names} == {"raysd", "search_spaces", "clusters", "tests", "pyproject.toml",
                                                ".rayignore", ".gitignore"}
