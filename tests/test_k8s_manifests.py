"""The Kubernetes manifests in docker/k8s/ parse and hold the invariants the service relies on.

Pure Python (PyYAML, no cluster, no kubectl): the two variants are rendered the way
``kubectl apply -k`` would for the few kustomize features they use (resources, images, strategic
merge patches of containers and env by name), then checked against the service itself: the
probe paths are real routes of the app, the ports match, the drain fits in the grace period.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
CONTAINER_PORT = 8000
Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these manifests: dicts recursively, lists of
    named dicts (containers, env, volumes, ports) by name, other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def render(folder: Path) -> list[Doc]:
    """The objects ``kubectl apply -k folder`` would create (for the features used here)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for res in kust.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else _load(path)
    for entry in kust.get("patches", []):
        for patch in _load(folder / entry["path"]):
            target = [d for d in docs if d["kind"] == patch["kind"]
                      and d["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(target) == 1, f"patch {entry['path']} matches {len(target)} objects"
            docs[docs.index(target[0])] = _merge(target[0], patch)
    for image in kust.get("images", []):
        for d in docs:
            for c in _pod_spec(d).get("containers", []) if d["kind"] == "Deployment" else []:
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def _pod_spec(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]


def _one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _scorer(docs: list[Doc]) -> Doc:
    containers = _pod_spec(_one(docs, "Deployment"))["containers"]
    assert [c["name"] for c in containers] == ["scorer"]
    return containers[0]


def _env(docs: list[Doc]) -> dict[str, str]:
    """The container's MLDCN_* environment: ConfigMaps from envFrom, then env (which wins)."""
    c = _scorer(docs)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        assert cm, f"envFrom names ConfigMap {name!r}, which is not in the manifests"
        env.update({k: str(v) for k, v in cm[0]["data"].items()})
    env.update({e["name"]: str(e["value"]) for e in c.get("env", [])})
    return env


def _cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


VARIANTS = {"cpu": BASE, "gpu": GPU}


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(VARIANTS[request.param])


def test_every_manifest_parses_and_names_its_kind() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = _load(path)
        assert docs, f"{path} is empty"
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), f"{path}: no apiVersion/kind"
            if d["kind"] != "Kustomization":
                assert d.get("metadata", {}).get("name"), f"{path}: {d['kind']} has no name"
    listed = {r for r in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]}
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_point_at_the_services_health_routes(variant: tuple[str, list[Doc]]) -> None:
    from service.app import create_app

    app = create_app(Settings(repo=Path("/nonexistent")))  # routes only: no lifespan runs
    routes = {getattr(r, "path", None) for r in app.routes}
    assert {READY_PATH, LIVE_PATH, METRICS_PATH} <= routes
    c = _scorer(variant[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": CONTAINER_PORT}
    assert int(_env(variant[1])["MLDCN_PORT"]) == CONTAINER_PORT
    assert _env(variant[1])["MLDCN_HOST"] == "0.0.0.0"
    expected = {"readinessProbe": READY_PATH, "livenessProbe": LIVE_PATH,
                "startupProbe": LIVE_PATH}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", CONTAINER_PORT), probe


def test_grace_period_covers_prestop_and_drain(variant: tuple[str, list[Doc]]) -> None:
    docs = variant[1]
    c = _scorer(docs)
    drain_s = float(_env(docs).get("MLDCN_DRAIN_GRACE_S",
                                   Settings.model_fields["drain_grace_s"].default))
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop_s = float(command[1])
    grace_s = _pod_spec(_one(docs, "Deployment"))["terminationGracePeriodSeconds"]
    assert grace_s > pre_stop_s + drain_s, (grace_s, pre_stop_s, drain_s)


def test_settings_in_the_environment_are_valid(variant: tuple[str, list[Doc]]) -> None:
    env = _env(variant[1])
    assert env["MLDCN_REPO"] == "/models"
    fields = {k.removeprefix("MLDCN_").lower(): v for k, v in env.items()}
    unknown = set(fields) - set(Settings.model_fields)
    assert not unknown, f"not settings of the service: {unknown}"
    Settings(**fields)  # validates every value


def test_resources_and_threads(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    c = _scorer(docs)
    res = c["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind
    cores = _cpu_cores(res["requests"]["cpu"])
    assert _cpu_cores(res["limits"]["cpu"]) >= cores
    threads = int(_env(docs)["MLDCN_INTRA_OP_THREADS"])
    assert 1 <= threads <= cores, "ONNX Runtime threads beyond the CPU request oversubscribe"
    gpus = res["limits"].get("nvidia.com/gpu")
    if name == "gpu":
        assert int(gpus) >= 1
        assert res["requests"].get("nvidia.com/gpu") == gpus
        assert _env(docs)["MLDCN_EXECUTION_PROVIDER"] == "cuda"
        assert any(t.get("key") == "nvidia.com/gpu" for t in _pod_spec(_one(docs, "Deployment"))
                   .get("tolerations", []))
        assert c["image"].startswith("mldcn-serve-gpu:")
    else:
        assert gpus is None
        assert c["image"].startswith("mldcn-serve:")


def test_pod_runs_as_the_images_non_root_user(variant: tuple[str, list[Doc]]) -> None:
    dockerfile = (K8S.parent / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    pod = _pod_spec(_one(variant[1], "Deployment"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    sc = _scorer(variant[1])["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True


def test_model_repository_volume(variant: tuple[str, list[Doc]]) -> None:
    docs = variant[1]
    c = _scorer(docs)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = mounts[_env(docs)["MLDCN_REPO"]]
    assert models.get("readOnly") is True
    volumes = {v["name"]: v for v in _pod_spec(_one(docs, "Deployment"))["volumes"]}
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
               for d in docs)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_service_hpa_and_pdb_match_the_deployment(variant: tuple[str, list[Doc]]) -> None:
    docs = variant[1]
    dep = _one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _selects(dep["spec"]["selector"]["matchLabels"], pod_labels)

    svc = _one(docs, "Service")
    assert _selects(svc["spec"]["selector"], pod_labels)
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        (CONTAINER_PORT, "http")]

    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1", "Deployment", dep["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"], "the HPA needs a metric"

    pdb = _one(docs, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # with the fewest replicas the HPA allows, the PDB must still let one pod be evicted
    if "maxUnavailable" in pdb["spec"]:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1
    else:
        assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must not drop below the replica count"


def test_prometheus_scrape_config_targets_metrics(variant: tuple[str, list[Doc]]) -> None:
    docs = variant[1]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == CONTAINER_PORT
    cm = [d for d in docs if d["kind"] == "ConfigMap" and "scrape" in d["metadata"]["name"]]
    assert len(cm) == 1
    (text,) = cm[0]["data"].values()
    (job,) = yaml.safe_load(text)["scrape_configs"]
    assert job["metrics_path"] == METRICS_PATH
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    label = keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
    assert re.fullmatch(label, pod_labels["app.kubernetes.io/name"])
    port_names = [p["name"] for p in _scorer(docs)["ports"]]
    assert any(re.fullmatch(keeps[("__meta_kubernetes_pod_container_port_name",)], n)
               for n in port_names)


def test_service_monitor_selects_the_service() -> None:
    (sm,) = _load(K8S / "servicemonitor.yaml")
    svc = _one(render(BASE), "Service")
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", METRICS_PATH)]


def test_pytorchjob_runs_mldcn_train_under_torchrun_on_a_shared_volume() -> None:
    """docker/k8s/training/pytorchjob.yaml: Master and Worker run the same pod; the command is
    torchrun with the operator's PET_* rendezvous and `-m model train` flags the real parser
    accepts; data, staging and run folder live on one ReadWriteMany claim."""
    import shlex

    from model.cli import build_parser

    pvc, job = _load(K8S / "training" / "pytorchjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs["Master"]["template"] == specs["Worker"]["template"]
    pod = specs["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["sh", "-c"]
    words = shlex.split(container["args"][0])
    assert words[:2] == ["exec", "torchrun"]
    for flag, var in (("--nnodes", "PET_NNODES"), ("--nproc-per-node", "PET_NPROC_PER_NODE"),
                      ("--node-rank", "PET_NODE_RANK"), ("--master-addr", "PET_MASTER_ADDR"),
                      ("--master-port", "PET_MASTER_PORT")):
        assert f"{flag}=${var}" in words
    module = words.index("-m")
    assert words[module + 1:module + 3] == ["model", "train"]
    args = build_parser().parse_args(words[module + 2:])
    assert args.device == "cuda" and args.nproc == 1  # torchrun starts the processes
    assert int(job["spec"]["nprocPerNode"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "work"]
    for path in (args.out, args.schema, *args.data, *args.valid_data, *args.test_data):
        assert path.startswith(mount["mountPath"] + "/"), path
    (volume,) = [v for v in pod["volumes"] if v["name"] == "work"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
