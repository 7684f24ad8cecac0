"""The cluster manifests parse and say what infra/README.md promises: GPU workers with a GPU limit,
credentials only by reference (Secrets, instance profiles), never as literal values, and raybranch
(not on PyPI) installed from this checkout: the image of infra/docker/Dockerfile on Kubernetes, the
uploaded checkout on AWS, a wheel in the working dir for jobs on a stock cluster."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
FILES = ["k8s/raycluster.yaml", "k8s/minio.yaml", "aws/cluster.yaml"]
SECRET_NAMES = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|ROOT_USER)", re.I)
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
WHEEL = f"raybranch-{VERSION}-py3-none-any.whl"
IMAGE_PLACEHOLDER = f"registry.example.com/raybranch:{VERSION}"
# `pip install ... raybranch` with raybranch as a requirement name (PyPI), not a path or wheel file
PYPI_INSTALL = re.compile(r"pip3?\s+install\b[^\n]*?(?<![\w./~${}-])raybranch(?![\w./-])")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def walk(obj):
    """Every dict anywhere in a document."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


@pytest.mark.parametrize("name", FILES)
def test_parses_and_sets_no_secret_literally(name):
    found = docs(name)
    assert found, name
    for d in found:
        for node in walk(d):
            if "name" in node and ("value" in node or "valueFrom" in node) and SECRET_NAMES.search(str(node["name"])):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], node  # from a Secret only
    text = (INFRA / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS key id
    assert not re.search(r"(?i)(secret_access_key|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", text)
    assert not re.search(r"s3://[^/\s]*:[^@\s]*@", text)  # no credentials in a URI


def test_raycluster_has_head_and_gpu_workers_with_store_env():
    (rc,) = docs("k8s/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (gpu,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for c in (head, worker):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAYBRANCH_STORE"]["value"].startswith("s3://")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "raybranch-s3", "key": key}


def test_raycluster_runs_the_raybranch_image_on_head_and_workers():
    """The stock rayproject/ray image has neither torch nor raybranch: both groups run the image of
    infra/docker/Dockerfile, under a placeholder registry the header tells the user to replace."""
    (rc,) = docs("k8s/raycluster.yaml")
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert images == {IMAGE_PLACEHOLDER}, images
    header = "".join(line for line in (INFRA / "k8s/raycluster.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    assert "infra/docker/Dockerfile" in header and "registry.example.com" in header and "placeholder" in header
    assert f"docker build -f infra/docker/Dockerfile -t {IMAGE_PLACEHOLDER} ." in header
    assert "docker push" in header
    args = dockerfile_args()
    assert rc["spec"]["rayVersion"] == args["RAY_VERSION"]  # the image's Ray is the cluster's


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", (INFRA / "docker/Dockerfile").read_text(), re.M))


def test_dockerfile_builds_ray_gpu_image_with_torch_and_raybranch_from_the_checkout():
    text = (INFRA / "docker/Dockerfile").read_text()
    args = dockerfile_args()
    assert re.fullmatch(r"2\.\d+\.\d+", args["RAY_VERSION"]) and re.fullmatch(r"py3\d+", args["PYTHON_VERSION"])
    assert args["RAY_VARIANT"] == "gpu"  # GPU by default; other variants by --build-arg
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "rayproject/ray:${RAY_VERSION}-${PYTHON_VERSION}-${RAY_VARIANT}" for f in froms), froms
    runs = re.sub(r"\\\n\s*", " ", " ".join(re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)))  # continuation lines joined
    # torch and torchvision are installed (by default from PyPI, whose Linux wheels carry CUDA)
    assert set(args["TORCH_PACKAGES"].split()) >= {"torch", "torchvision"}
    assert re.search(r"pip install [^\n]*\$\{TORCH_PACKAGES\}", runs)
    # raybranch: a wheel built from the copied checkout, then installed with Ray pinned
    copied = re.findall(r"^COPY (?:--chown=\S+ )?(.+) (\S+)$", text, re.M)
    sources = {src for srcs, _ in copied if not srcs.startswith("--from") for src in srcs.split()}
    assert {"pyproject.toml", "README.md", "raybranch"} <= sources
    assert re.search(r"pip wheel [^\n]*--no-deps /tmp/src -w /tmp/dist", runs)
    assert re.search(r"COPY --from=build \S* ?/tmp/dist/ /tmp/dist/", text)
    assert re.search(r"pip install [^\n]*-c /tmp/ray-constraint.txt /tmp/dist/raybranch-\*\.whl", runs)
    assert 'echo "ray==${RAY_VERSION}" > /tmp/ray-constraint.txt' in runs
    assert "import ray, torch, torchvision, raybranch" in runs  # the build fails on a broken image
    assert not PYPI_INSTALL.search(text)
    # the build context keeps what the Dockerfile copies
    ignored = [line.strip() for line in (INFRA / "docker/Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not {"pyproject.toml", "README.md", "raybranch", "raybranch/"} & set(ignored)
    readme = (INFRA / "docker/README.md").read_text()
    assert f"docker build -f infra/docker/Dockerfile -t raybranch:{VERSION} ." in readme and "docker push" in readme


def test_minio_has_deployment_service_pvc_and_bucket_job():
    kinds = {d["kind"]: d for d in docs("k8s/minio.yaml")}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service", "Job"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"]}
    assert env == {"MINIO_ROOT_USER": "raybranch-s3", "MINIO_ROOT_PASSWORD": "raybranch-s3"}
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} >= {9000}
    script = " ".join(kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "mc mb --ignore-existing store/raybranch" in script


def test_aws_launcher_uses_gpu_workers_instance_profile_and_s3():
    (cfg,) = docs("aws/cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["node_config"]["InstanceType"] == "m5.xlarge"
    gpu = types["ray.worker.gpu"]
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Name"] == "raybranch-s3"
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAYBRANCH_STORE=s3://" in starts and "AWS_SECRET_ACCESS_KEY" not in starts


def test_aws_launcher_installs_raybranch_from_the_uploaded_checkout():
    """Every node pip-installs a directory the file mounts fill from this checkout (relative to the
    repository root, where `ray up` runs), holding what a build needs; nothing named raybranch comes
    from PyPI, and Ray is pinned to the cluster's version."""
    (cfg,) = docs("aws/cluster.yaml")
    mounts = cfg["file_mounts"]
    setup = cfg["setup_commands"]
    for cmd in setup:
        assert not PYPI_INSTALL.search(cmd), cmd
    targets = [tok for cmd in setup if re.match(r"pip3? install", cmd)
               for tok in shlex.split(cmd)[2:] if tok.startswith("~/")]
    assert targets, setup
    for target in targets:
        under = {remote[len(target) + 1:]: local for remote, local in mounts.items()
                 if remote.startswith(target + "/")}
        assert {"pyproject.toml", "raybranch"} <= set(under), mounts
        for rel, local in under.items():
            assert not Path(local).is_absolute() and not local.startswith("~"), local  # from the checkout
            assert (REPO / local).resolve() == (REPO / rel).resolve() and (REPO / local).exists(), (rel, local)
        readme = re.search(r'^readme = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
        assert readme is None or readme.group(1) in under  # setuptools needs it to build
        assert "." not in mounts.values()  # the whole checkout (.venv, .local) would be hashed and copied
    assert any(re.search(r"pip install .*ray\[default,tune,train\]==" + re.escape(ray_version()), c) for c in setup)
    assert any("import raybranch, torch" in c for c in setup)


def ray_version() -> str:
    (rc,) = docs("k8s/raycluster.yaml")
    return rc["spec"]["rayVersion"]


def test_readme_runtime_env_ships_a_wheel_from_the_working_dir():
    """No advice to install raybranch from PyPI: every runtime_env in the docs that installs
    raybranch names this version's wheel inside the uploaded working dir, by Ray's placeholder
    (a relative path is resolved against an empty directory of the runtime env, and fails)."""
    texts = {name: (INFRA / name).read_text() for name in ("README.md", "k8s/raycluster.yaml", "aws/cluster.yaml")}
    specs = [(name, m) for name, t in texts.items() for m in re.findall(r"--runtime-env-json '([^']*)'", t)]
    assert specs
    for name, spec in specs:
        pip = json.loads(spec).get("pip", [])
        named = [p for p in pip if "raybranch" in p]
        assert named and all(p == f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/dist/{WHEEL}" for p in named), (name, pip)
    readme = texts["README.md"]
    assert "pip wheel --no-deps . -w dist/" in readme and "--working-dir ." in readme
    assert '"pip": ["raybranch"' not in readme and "infra/docker/Dockerfile" in readme
    # Ray leaves out of the working dir upload what .gitignore excludes: dist/ must not be ignored
    gitignore = (REPO / ".gitignore").read_text().splitlines() if (REPO / ".gitignore").exists() else []
    assert not [g for g in gitignore if g.strip().strip("/") in {"dist", "*.whl", "dist/*"}], gitignore
