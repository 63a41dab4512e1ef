"""deploy/kubernetes: every manifest valid against the Kubernetes schemas, the kustomizations
render, and what they configure agrees with the code (settings, ports, probes, users).

No kustomize binary is reachable from CI, so `render` below does what `kustomize build` does
for the features these kustomizations use (resources, namespace, images, strategic-merge
patches matched by kind and name, merging lists of named items by name), and fails on any
other feature, so a kustomization cannot silently outgrow it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nhi.infra.config import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = sorted(p.parent for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
# Oldest and newest Kubernetes minor the bundled schemas cover that we support.
VERSIONS = ("1.29.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate: their structure is checked by hand in
# test_service_monitor_scrapes_both_components (it is the one CRD we ship).
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CLUSTER_SCOPED = {"Namespace"}
SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
DOCKER_USER = 10001  # deploy/Dockerfile: USER 10001


# ---- a kustomize subset -----------------------------------------------------------------------
def _load(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and "kind" in doc, f"{path}: not a Kubernetes object"
    return docs


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to these objects: maps recursively, lists of
    maps with a `name` merged by name, other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in base + patch):
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            match = [n for n, old in enumerate(out_list) if old["name"] == item["name"]]
            if match:
                out_list[match[0]] = _merge(out_list[match[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _images(obj: Any, images: dict[str, dict[str, str]]) -> None:
    if isinstance(obj, dict):
        if "image" in obj and isinstance(obj["image"], str):
            name, _, tag = obj["image"].partition(":")
            if name in images:
                new = images[name]
                obj["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag or 'latest')}"
        for value in obj.values():
            _images(value, images)
    elif isinstance(obj, list):
        for item in obj:
            _images(item, images)


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, for the subset described above."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    assert not unknown, f"{directory}: kustomize features this test cannot render: {unknown}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else _load(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only `path` patches are rendered"
        for patch in _load(directory / patch_entry["path"]):
            targets = [n for n, o in enumerate(objects) if _key(o) == _key(patch)]
            assert len(targets) == 1, f"{directory}: patch {_key(patch)} matches {len(targets)}"
            objects[targets[0]] = _merge(objects[targets[0]], patch)
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
    _images(objects, {i["name"]: i for i in kustomization.get("images", [])})
    keys = [_key(o) for o in objects]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects"
    return objects


RENDERED = {"base": render(BASE)} | {f"overlay {p.name}": render(p) for p in OVERLAYS}


def _find(
    objects: list[dict[str, Any]], kind: str, name: str | None = None
) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = _find(objects, kind, name)
    return found


def _pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }


# ---- schemas ----------------------------------------------------------------------------------
def _schema_checked(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) not in CRDS


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_file_is_valid(version: str) -> None:
    files = sorted(KUBE.rglob("*.yaml"))
    assert files
    for path in files:
        if path.name == "kustomization.yaml":
            continue
        for doc in _load(path):
            if not _schema_checked(doc):
                continue
            # A patch is a fragment, not an object: it is validated once merged, below.
            if path.parent.parent.name == "overlays":
                continue
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_kustomizations_are_valid(name: str, version: str) -> None:
    objects = RENDERED[name]
    assert objects
    for obj in objects:
        if _schema_checked(obj):
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_file_is_used_or_an_example() -> None:
    used: set[Path] = set()
    for kustomization in KUBE.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        used.add(kustomization)
        for entry in data.get("resources", []) + [p["path"] for p in data.get("patches", [])]:
            used.add((kustomization.parent / entry).resolve())
    unused = {p for p in KUBE.rglob("*.yaml") if p.resolve() not in used}
    assert {p.name for p in unused} <= {"secret.example.yaml"}, sorted(map(str, unused))


# ---- configuration agrees with Settings -------------------------------------------------------
def _nhi_variables(objects: list[dict[str, Any]]) -> dict[str, str | None]:
    """Every NHI_* variable set: ConfigMap and Secret keys, and env entries (None: from a
    secret reference)."""
    found: dict[str, str | None] = {}
    for obj in objects:
        for key, value in (obj.get("data") or {}).items() | (obj.get("stringData") or {}).items():
            if key.startswith("NHI_"):
                found[key] = str(value)
        for spec in _pod_specs([obj]).values():
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for env in container.get("env", []):
                    if env["name"].startswith("NHI_"):
                        found.setdefault(env["name"], env.get("value"))
    return found


def test_every_nhi_variable_is_a_setting_with_a_valid_value() -> None:
    example = _load(BASE / "secret.example.yaml")
    for name, objects in RENDERED.items():
        variables = _nhi_variables(objects + example)
        assert "NHI_DATABASE_URL" in variables and "NHI_TEMPORAL_ADDRESS" in variables, name
        unknown = {
            v for v in variables if v.removeprefix("NHI_").lower() not in Settings.model_fields
        }
        assert not unknown, f"{name}: NHI_* variables Settings ignores: {sorted(unknown)}"
        values = {
            var.removeprefix("NHI_").lower(): value
            for var, value in variables.items()
            if value is not None
        }
        Settings(_env_file=None, **values)  # raises if any value is invalid


def test_pods_read_the_configmap_and_the_secret() -> None:
    for name, objects in RENDERED.items():
        configmaps = {o["metadata"]["name"] for o in _find(objects, "ConfigMap")}
        for pod, spec in _pod_specs(objects).items():
            for container in spec["containers"]:
                refs = container.get("envFrom", [])
                assert {
                    r["configMapRef"]["name"] for r in refs if "configMapRef" in r
                } <= configmaps
                assert any(r.get("configMapRef") for r in refs), f"{name} {pod}"
                secrets = [r["secretRef"] for r in refs if "secretRef" in r]
                assert secrets and not any(s.get("optional") for s in secrets), f"{name} {pod}"


def test_temporal_cloud_overlay_uses_an_api_key_from_a_secret() -> None:
    objects = RENDERED["overlay temporal-cloud"]
    config = _one(objects, "ConfigMap", "nhi-lifecycle")["data"]
    assert config["NHI_TEMPORAL_TLS"] == "true"
    assert config["NHI_TEMPORAL_ADDRESS"].endswith(":7233")
    assert "temporal.svc" not in config["NHI_TEMPORAL_ADDRESS"]
    for deployment in ("nhi-lifecycle-api", "nhi-lifecycle-worker"):
        [container] = _one(objects, "Deployment", deployment)["spec"]["template"]["spec"][
            "containers"
        ]
        [key] = [e for e in container["env"] if e["name"] == "NHI_TEMPORAL_API_KEY"]
        assert set(key) == {"name", "valueFrom"}, "the key must never be inline"
        assert key["valueFrom"]["secretKeyRef"]["name"] == "nhi-lifecycle-temporal"
        assert container["envFrom"], "the patch must add to the base's env, not replace it"
    job = _one(objects, "Job", "nhi-lifecycle-migrate")["spec"]["template"]["spec"]
    assert "env" not in job["containers"][0], "the migration needs no Temporal key"


# ---- pods: commands, probes, security, resources ----------------------------------------------
def _quantity_mib(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", value)
    assert match, value
    number, unit = float(match.group(1)), match.group(2)
    return number * {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[unit]


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_pods_run_unprivileged_on_a_read_only_root(name: str) -> None:
    for pod, spec in _pod_specs(RENDERED[name]).items():
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, pod
        assert security["runAsUser"] == DOCKER_USER, pod
        assert security["seccompProfile"]["type"] == "RuntimeDefault", pod
        assert spec.get("automountServiceAccountToken") is False, pod
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, pod
            assert ctx["allowPrivilegeEscalation"] is False, pod
            assert ctx["capabilities"]["drop"] == ["ALL"], pod
            [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], pod
            assert container["resources"]["requests"]["memory"], pod
            assert container["resources"]["limits"]["memory"], pod
            assert container["image"].startswith("registry.example.com/nhi-lifecycle:"), pod


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_deployments_probe_healthz_and_readyz_on_their_ports(name: str) -> None:
    objects = RENDERED[name]
    config = _one(objects, "ConfigMap", "nhi-lifecycle")["data"]
    expected_port = {
        "nhi-lifecycle-api": Settings.model_fields["api_port"].default,
        "nhi-lifecycle-worker": int(config["NHI_WORKER_HTTP_PORT"]),
    }
    for deployment in _find(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (deployment["metadata"]["name"], probe)
            assert ports[get["port"]] == expected_port[deployment["metadata"]["name"]]
        # The readiness answer must come back before the probe gives up: two 2 s checks.
        assert container["readinessProbe"]["timeoutSeconds"] >= 5
    api = _one(objects, "Deployment", "nhi-lifecycle-api")["spec"]["template"]["spec"]
    command = api["containers"][0]["command"]
    assert command[:2] == ["uvicorn", "api.app:app"]
    assert command[command.index("--port") + 1] == str(expected_port["nhi-lifecycle-api"])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    worker = _one(objects, "Deployment", "nhi-lifecycle-worker")["spec"]["template"]["spec"]
    assert worker["containers"][0]["command"] == ["python", "worker.py"]
    assert (ROOT / "worker.py").is_file()
    assert config["NHI_WORKER_HTTP_HOST"] == "0.0.0.0"


def test_worker_memory_is_sized_from_the_benchmark() -> None:
    # README "Performance": 277 MB with 10,000 open lifecycles at the default cache of 400.
    objects = RENDERED["base"]
    config = _one(objects, "ConfigMap", "nhi-lifecycle")["data"]
    assert int(config["NHI_WORKER_MAX_CACHED_WORKFLOWS"]) <= 400
    [worker] = _one(objects, "Deployment", "nhi-lifecycle-worker")["spec"]["template"]["spec"][
        "containers"
    ]
    resources = worker["resources"]
    assert _quantity_mib(resources["requests"]["memory"]) >= 277e6 / 2**20
    assert _quantity_mib(resources["limits"]["memory"]) > _quantity_mib(
        resources["requests"]["memory"]
    )
    assert "cpu" not in resources.get("limits", {}), "CPU limits throttle workflow tasks"


def test_migration_job_runs_once_before_the_rollout() -> None:
    job = _one(RENDERED["base"], "Job", "nhi-lifecycle-migrate")
    assert job["spec"]["backoffLimit"] == 0, "a failed migration must stop the release"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["containers"][0]["command"] == ["nhi", "migrate"]
    # Migrations never run inside the Deployments' pods.
    for deployment in _find(RENDERED["base"], "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        commands = [c.get("command", []) for c in pod["containers"] + pod.get("initContainers", [])]
        assert ["nhi", "migrate"] not in commands


# ---- selectors --------------------------------------------------------------------------------
def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_and_budgets_select_the_right_pods() -> None:
    objects = RENDERED["base"]
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in _find(objects, "Deployment")}
    for deployment in _find(objects, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
    for service in _find(objects, "Service"):
        name = service["metadata"]["name"]
        template = pods[name]
        assert _selects(service["spec"]["selector"], template["metadata"]["labels"]), name
        others = [n for n, t in pods.items() if n != name]
        assert not any(
            _selects(service["spec"]["selector"], pods[o]["metadata"]["labels"]) for o in others
        ), f"{name} also selects other pods"
        port_names = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    budgets = _find(objects, "PodDisruptionBudget")
    assert {b["metadata"]["name"] for b in budgets} == set(pods)
    for budget in budgets:
        name = budget["metadata"]["name"]
        assert _selects(budget["spec"]["selector"]["matchLabels"], pods[name]["metadata"]["labels"])
        replicas = _one(objects, "Deployment", name)["spec"]["replicas"]
        # A budget that allows no disruption at all would block every node drain.
        assert budget["spec"].get("minAvailable", 0) < replicas


def test_service_monitor_scrapes_both_components() -> None:
    objects = RENDERED["base"]
    [monitor] = _find(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in _find(objects, "Service") if _selects(selector, s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in services} == {
        "nhi-lifecycle-api",
        "nhi-lifecycle-worker",
    }
    scraped = set()
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}, endpoint
        assert endpoint["path"] == "/metrics"
        for service in services:
            if endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}:
                scraped.add(service["metadata"]["name"])
    assert scraped == {s["metadata"]["name"] for s in services}
