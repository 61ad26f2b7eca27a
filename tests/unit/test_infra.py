"""infra/ agrees with the code: the KubeRay manifests and the cluster launcher config parse with
Ray's and sdray's own parsers, and their images, commands and GPUs agree with the Dockerfile and
the sdray configs they run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from sdray.cli import build_parser
from sdray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = (INFRA / "Dockerfile").read_text()
RAYJOB = yaml.safe_load((INFRA / "kuberay" / "rayjob-generate.yaml").read_text())
RAYSERVICE = yaml.safe_load((INFRA / "kuberay" / "rayservice.yaml").read_text())
LAUNCHER = yaml.safe_load((INFRA / "cluster.yaml").read_text())


def image_tag() -> str:
    """The tag the Dockerfile's build command gives the image."""
    return re.search(r"docker build .* -t (\S+) \.", DOCKERFILE)[1]


def image_path(path: str) -> Path:
    """Where a path inside the image comes from in the repository (WORKDIR /app, COPY x ./x)."""
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE, re.MULTILINE)[1]
    copied = re.findall(r"^COPY (\S+) \./\1$", DOCKERFILE, re.MULTILINE)
    relative = Path(path).relative_to(workdir)
    assert relative.parts[0] in copied, f"{path} is not copied into the image"
    return ROOT / relative


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def pinned(name: str) -> str:
    return re.search(
        rf"^{name}(?:\[[^\]]*\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.M
    )[1]


@pytest.mark.parametrize(
    "cluster_spec",
    [RAYJOB["spec"]["rayClusterSpec"], RAYSERVICE["spec"]["rayClusterConfig"]],
    ids=["rayjob", "rayservice"],
)
def test_kuberay_pods_run_the_dockerfile_image_at_its_ray_version(cluster_spec):
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)", DOCKERFILE, re.MULTILINE)
    assert base[1] == pinned("ray") == cluster_spec["rayVersion"]
    assert f"{base[2]}.{base[3]}" == "3.11"
    for container in containers(cluster_spec):
        assert container["image"] == image_tag()
        # Credentials only as pod environment from a Secret, never literal values.
        assert not [e for e in container.get("env", []) if "value" in e and "AWS" in e["name"]]
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_rayjob_entrypoint_is_an_sdray_command_the_image_can_run():
    command = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert command[0] == "python"
    script = image_path(command[1])
    assert script.relative_to(ROOT) == Path("pipelines/generate.py")
    args = build_parser().parse_args(["generate", *command[2:]])  # exits on a bad argument
    assert args.resume, "a retried RayJob (backoffLimit) must continue, not refuse its output"
    for uri in (args.input, args.output):
        assert "://" in uri, f"{uri}: pods share no local disk; use an object store URI"
    config = load_config(image_path(args.config), args.overrides)
    assert "://" in config.model.source
    assert config.model.device == "cuda"

    spec = RAYJOB["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "sdray-s3"}} in head["envFrom"]
    assert "runtimeEnvYAML" not in RAYJOB["spec"]  # Ray logs runtime environments
    (group,) = spec["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    actors_per_pod = gpus / config.batch.num_gpus_per_actor
    assert actors_per_pod >= 1 and actors_per_pod == int(actors_per_pod)
    assert group["maxReplicas"] * actors_per_pod >= config.batch.max_actors


def test_the_rayservice_gpus_agree_with_its_replicas():
    from sdray.config import config_from_dict

    app = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])["applications"][0]
    config = config_from_dict(app["args"]["config"], app["args"]["overrides"])
    (group,) = RAYSERVICE["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert config.model.device == "cuda"
    assert int(limits["nvidia.com/gpu"]) % config.serve.num_gpus_per_replica == 0
    assert "://" in config.model.source  # every pod copies it from the bucket


def test_the_launcher_config_validates_and_runs_the_image_on_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(json.loads(json.dumps(LAUNCHER)))
    validate_config(full)  # Ray's own launcher schema, with its defaults filled in
    assert full["docker"]["image"] == image_tag()
    assert full["setup_commands"] == []  # nothing installed over the image
    nodes = full["available_node_types"]
    assert nodes[full["head_node_type"]]["resources"] == {"CPU": 0}
    config = load_config(ROOT / "configs" / "gpu-sd15.yaml")
    (worker,) = [n for name, n in nodes.items() if name != full["head_node_type"]]
    actors_per_node = worker["resources"]["GPU"] / config.batch.num_gpus_per_actor
    assert actors_per_node >= 1
    assert worker["max_workers"] * actors_per_node >= config.batch.max_actors


# Distributions whose import name differs from their name.
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "python-multipart": "multipart"}


def test_every_runtime_requirement_is_imported_or_says_why_it_is_there():
    """A pin nobody imports (polars was one) is weight in every image; one that only a library
    needs says so in a comment beside it."""
    lines = (ROOT / "requirements.in").read_text().split("# tests / dev")[0].splitlines()
    sources = "\n".join(
        path.read_text()
        for folder in ("sdray", "pipelines", "tests")
        for path in (ROOT / folder).rglob("*.py")
    )
    unexplained = []
    for number, line in enumerate(lines):
        found = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==", line)
        if not found:
            continue
        name = found[1].lower()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        imported = re.search(rf"^\s*(?:import|from) {re.escape(module)}\b", sources, re.M)
        explained = "#" in line or lines[number - 1].startswith("#")
        if not (imported or explained):
            unexplained.append(name)
    assert not unexplained, f"pinned, never imported, no reason given: {unexplained}"


def test_the_runtime_never_imports_the_tooling():
    """Benchmarks and training live in sdray.tools; nothing the runtime runs imports them (the
    CLI reaches in only for `sdray bench`)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "sdray").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("sdray/tools/") or relative == "sdray/cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{relative}: {n}" for n in names if n.startswith("sdray.tools")]
    assert not offenders, offenders
    assert not list((ROOT / "sdray").glob("bench*.py")), "benchmarks belong in sdray/tools"
