"""Images and the single-host compose file, checked statically (docker cannot run here), plus
the images' HEALTHCHECK command run for real against a live service on the shared runtime."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.chart import ROOT, SERVICES
from tests.support.docker import DOCKER, healthcheck_code, instructions
from tests.support.servers import free_port, make_settings, running_server
from tests.support.toy_service import BrightnessModel, build_toy

CONFIG = json.loads((ROOT / "config" / "production.json").read_text())


def _stages(ins: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for i in ins:
        if i[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(i)
    return stages


def _depends_on_client(svc: str) -> bool:
    import tomllib

    project = tomllib.loads((ROOT / "services" / svc / "pyproject.toml").read_text())["project"]
    return any(d.split()[0].startswith("cxr-client") for d in project["dependencies"])


@pytest.mark.parametrize("svc", SERVICES)
def test_dockerfile_is_multistage_cuda_nonroot_and_installs_only_its_service(svc: str) -> None:
    ins = instructions(DOCKER / f"{svc}.Dockerfile")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["CUDA_RUNTIME_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in args["CUDA_RUNTIME_IMAGE"]
    stages = _stages(ins)
    assert len(stages) >= 3
    final = stages[-1]
    assert final[0][1].startswith("${CUDA_RUNTIME_IMAGE}")
    copies = [a for k, a in ins if k == "COPY" and not a.startswith("--from")]
    sources = {a.split()[0] for a in copies}
    # the libraries it installs are exactly those its pyproject depends on (the DICOM node calls the others
    # through cxr_client)
    libs = ["libs/protos", "libs/serving"] + (["libs/client"] if _depends_on_client(svc) else [])
    assert sources == {"requirements/constraints.txt", *libs, f"services/{svc}"}
    for src in sources:
        assert (ROOT / src).exists(), src
    text = (DOCKER / f"{svc}.Dockerfile").read_text()
    for other in set(SERVICES) - {svc}:
        assert f"services/{other}" not in text and f"cxr_{other}" not in text, other
    pip = [a for k, a in ins if k == "RUN" and "pip install" in a]
    assert len(pip) == 1
    # cxr_serving's C extension is built (a compiler in the build stage) and the build fails without it
    build = stages[-2] if len(stages) >= 2 else []
    assert any(k == "RUN" and "apt-get install" in a and " gcc" in a for k, a in build)
    assert "import" in pip[0] and "cxr_serving._pixels" in pip[0]
    packages = " ".join(f"./{p}" for p in (*libs, f"services/{svc}"))
    assert f"pip install -c requirements/constraints.txt {packages}" in pip[0]
    # the final stage takes only the built interpreter and venv from the build stage
    assert {a for k, a in final if k == "COPY"} == {
        "--from=build /opt/python /opt/python",
        "--from=build /opt/venv /opt/venv",
    }
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) >= 1000
    entry = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    assert entry == ["python", "-m", f"cxr_{svc}"]
    assert (ROOT / "services" / svc / "src" / f"cxr_{svc}" / "__main__.py").exists()
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {CONFIG["services"][svc]["port"], CONFIG["services"][svc]["metrics_port"]} <= exposed
    health = next(a for k, a in final if k == "HEALTHCHECK")
    assert "grpc_health" in health and "--start-period=" in health
    env = " ".join(a for k, a in final if k == "ENV")
    assert f"CXR_HEALTH_ADDR=127.0.0.1:{CONFIG['services'][svc]['port']}" in env


@pytest.mark.parametrize("svc", SERVICES)
def test_service_package_does_not_depend_on_another_service(svc: str) -> None:
    pyproject = (ROOT / "services" / svc / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M)
    assert deps
    for other in set(SERVICES) - {svc}:
        assert f"cxr-{other}" not in deps.group(1)
    if svc != "rag":
        assert "chromadb" not in deps.group(1) and "openai" not in deps.group(1)


def test_dockerignore_is_an_allowlist_of_what_images_copy() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for svc in SERVICES:
        for k, a in instructions(DOCKER / f"{svc}.Dockerfile"):
            if k == "COPY" and not a.startswith("--from"):
                assert a.split()[0] in allowed
    assert "**/tests" in lines and "**/__pycache__" in lines


async def _run_check(code: str, addr: str) -> int:
    """Run the check in a child process without blocking the event loop the server runs on."""
    env = {**os.environ, "CXR_HEALTH_ADDR": addr}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_image_healthcheck_command_against_a_live_service() -> None:
    code = healthcheck_code(
        next(a for k, a in instructions(DOCKER / "classification.Dockerfile") if k == "HEALTHCHECK")
    )
    compose_code = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["classification"]["healthcheck"][
        "test"
    ][3]
    settings = make_settings()  # authentication on: the health service needs no key
    async with running_server(settings, build_toy(settings)) as server:
        assert await _run_check(code, f"127.0.0.1:{server.port}") == 0
        assert await _run_check(compose_code, f"127.0.0.1:{server.port}") == 0
    async with running_server(settings, build_toy(settings, BrightnessModel(fail_load=True)), wait_ready=False) as bad:
        assert await _run_check(code, f"127.0.0.1:{bad.port}") == 1  # up but NOT_SERVING
    assert await _run_check(code, f"127.0.0.1:{free_port()}") != 0  # nothing listening


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_whole_single_host_suite(compose: dict) -> None:
    assert set(compose["services"]) == {
        *SERVICES,
        "dicom",  # the DICOM node (issue 22): its own checks are in test_compose_runs_the_dicom_node
        "chroma",
        "vllm",
        "kong-config",
        "kong",
        "prometheus",
        "grafana",
    }
    for svc in SERVICES:
        s = compose["services"][svc]
        assert s["build"]["dockerfile"] == f"deploy/docker/{svc}.Dockerfile"
        assert (DOCKER / s["build"]["context"] / s["build"]["dockerfile"]).exists()
        assert "grpc_health" in " ".join(s["healthcheck"]["test"])


def test_compose_runs_the_dicom_node(compose: dict) -> None:
    node = compose["services"]["dicom"]
    assert node["build"]["dockerfile"] == "deploy/docker/dicom.Dockerfile"
    assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).exists()
    assert "grpc_health" in " ".join(node["healthcheck"]["test"])
    assert any(v.startswith("dicom-data:") for v in node["volumes"]) and "dicom-data" in compose["volumes"]
    assert {node["environment"][f"CXR_{s.upper()}_ENDPOINT"] for s in ("classification", "segmentation")} == {
        f"{s}:{CONFIG['services'][s]['port']}" for s in ("classification", "segmentation")
    }
    ins = instructions(DOCKER / "dicom.Dockerfile")
    assert json.loads(next(a for k, a in ins if k == "ENTRYPOINT")) == ["python", "-m", "cxr_dicom"]
    assert f"CXR_HEALTH_ADDR=127.0.0.1:{CONFIG['services']['dicom']['port']}" in " ".join(
        a for k, a in ins if k == "ENV"
    )


def test_compose_containers_are_locked_down(compose: dict) -> None:
    for name, s in compose["services"].items():
        assert s.get("cap_drop") == ["ALL"], name
        if name == "vllm":
            continue  # the vLLM image runs as root and writes caches (documented)
        uid = int(str(s["user"]).split(":")[0])
        assert uid != 0, name
        if name not in ("chroma",):
            assert s.get("read_only") is True, name


def test_compose_gpus_and_isolation(compose: dict) -> None:
    services = compose["services"]

    def gpus(name: str) -> int:
        devices = services[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return sum(d["count"] for d in devices if "gpu" in d["capabilities"])

    assert {n: gpus(n) for n in (*SERVICES, "vllm")} == {
        "classification": 1,
        "segmentation": 1,
        "rag": 0,
        "dicom": 0,
        "vllm": 1,
    }
    assert compose["networks"]["backend"]["internal"] and compose["networks"]["llm"]["internal"]
    reach_llm = {n for n, s in services.items() if "llm" in s.get("networks", [])}
    assert reach_llm == {"rag", "vllm", "chroma", "prometheus"}  # only rag (and the scraper) reach vLLM/Chroma
    public = {n for n, s in services.items() if s.get("ports")}
    assert public == {"kong", "prometheus", "grafana"}
    assert all(p.startswith("127.0.0.1:") for n in ("prometheus", "grafana") for p in services[n]["ports"])
    for svc in SERVICES:
        assert "frontend" not in services[svc]["networks"]


@pytest.mark.parametrize("svc", SERVICES)
def test_compose_services_get_their_admin_key_file(compose: dict, svc: str) -> None:
    """Kong's cxr-admin consumer forwards the admin key: each service must read the same secret as its
    admin keys, or every admin RPC is refused at the service (API_KEY_INVALID)."""
    from cxr_serving.settings import load_settings

    s = compose["services"][svc]
    admin_file = s["environment"]["CXR_ADMIN_API_KEY_FILE"]
    mounted = {m["target"]: m["source"] for m in s["secrets"]}
    api_key_file = CONFIG["security"]["api_key_file"]
    assert mounted[admin_file] == "admin-api-keys" and mounted[api_key_file] == "api-keys"
    assert compose["secrets"]["admin-api-keys"]["file"] != compose["secrets"]["api-keys"]["file"]
    settings = load_settings(ROOT / "config" / "production.json", environ={"CXR_ADMIN_API_KEY_FILE": admin_file})
    assert settings.security.admin_api_key_file == Path(admin_file)
    assert settings.security.api_key_file == Path(api_key_file) != Path(admin_file)


def test_compose_mounts_existing_repo_files_and_renders_every_kong_placeholder(compose: dict) -> None:
    for name, s in compose["services"].items():
        for vol in s.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("../"):
                assert (DOCKER / src).exists(), (name, src)
    kong_yml = (ROOT / "gateway" / "kong.yml").read_text()
    placeholders = set(re.findall(r'\$\{\{\s*env\s+"(DECK_[A-Z0-9_]+)"\s*\}\}', kong_yml))
    from_secrets = {"DECK_CXR_API_KEY": "api-keys", "DECK_CXR_ADMIN_API_KEY": "admin-api-keys"}
    env = set(compose["services"]["kong-config"]["environment"]) | set(from_secrets)
    assert placeholders <= env, placeholders - env
    for var, secret in from_secrets.items():  # read from the secret file when kong-config runs
        assert f'{var}="$$(head -n 1 /run/secrets/{secret})"' in compose["services"]["kong-config"]["command"][0]
        assert secret in compose["services"]["kong-config"]["secrets"] and secret in compose["secrets"]
    for svc in SERVICES:
        port = CONFIG["services"][svc]["port"]
        assert compose["services"]["kong-config"]["environment"][f"DECK_{svc.upper()}_PORT"] == str(port)
    prom = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for svc in SERVICES:
        assert f"{svc}:{CONFIG['services'][svc]['metrics_port']}" in targets


def test_client_image_has_the_cli_with_the_evaluate_extra_and_nothing_of_the_services() -> None:
    """deploy/docker/client.Dockerfile, the image of the chart's evaluation Job (evaluate.image)."""
    ins = instructions(DOCKER / "client.Dockerfile")
    copies = {a.split()[0] for k, a in ins if k == "COPY" and not a.startswith("--from")}
    assert copies == {"requirements/constraints.txt", "libs/protos", "libs/client"}
    allowed = {ln.strip()[1:] for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    assert copies <= allowed
    (pip,) = [a for k, a in ins if k == "RUN" and "pip install" in a]
    assert 'pip install -c requirements/constraints.txt ./libs/protos "./libs/client[evaluate]"' in pip
    final = _stages(ins)[-1]
    assert {a for k, a in final if k == "COPY"} == {
        "--from=build /opt/python /opt/python",
        "--from=build /opt/venv /opt/venv",
    }
    user = [a for k, a in final if k == "USER"]
    assert user and int(user[-1].split(":")[0]) >= 1000
    assert json.loads(next(a for k, a in final if k == "ENTRYPOINT")) == ["cxr"]
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "cxr" / "values.yaml").read_text())
    assert values["evaluate"]["image"]["repository"] == "cxr/client"
