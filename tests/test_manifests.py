"""Every manifest under deploy/ as the Kubernetes API server and KubeRay's operator would judge it, and
cluster.yaml as Ray's launcher autoscaler needs it (one Ray node per machine). Offline: no cluster, no Ray.

KubeRay manifests are validated against the v1 `openAPIV3Schema` of KubeRay's own CRDs (tests/kuberay/),
with fields the schema does not name refused (the API server's strict decoding), then against the
operator's reconcile-time rules (its `ValidateRayClusterSpec`), each a named check below. A failure names
its rule, the manifest and the field.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CRD_DIR = Path(__file__).resolve().parent / "kuberay"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

Doc = dict[str, Any]
Problems = list[str]


def load_yaml(path: Path) -> list[Doc]:
    # The C loader: the CRDs are ~1 MB each.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None]


def shipped_manifests() -> list[tuple[str, Doc]]:
    """(`file#index`, document) for every document of every manifest file under deploy/."""
    found = []
    for path in sorted(DEPLOY.iterdir()):
        if path.suffix in MANIFEST_SUFFIXES:
            found += [(f"{path.name}#{i}", doc) for i, doc in enumerate(load_yaml(path))]
    return found


@cache
def crd_schema(kind: str) -> Doc:
    (crd,) = load_yaml(CRD_DIR / CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


# --- Kubernetes' own structural checks -------------------------------------------------------------


def schema_violations(doc: Doc, schema: Doc) -> Problems:
    # OpenAPI v3.0 schemas are closest to JSON Schema draft 4 (formats such as int32 are not asserted).
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def unknown_fields(value: Any, schema: Doc, where: str = "") -> Problems:
    """Keys the schema does not name: the API server's strict field validation refuses them."""
    problems: Problems = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            at = f"{where}.{key}" if where else key
            if properties is not None and key in properties:
                problems += unknown_fields(item, properties[key], at)
            elif isinstance(extra, dict):
                problems += unknown_fields(item, extra, at)
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{at}: unknown field")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return problems


def duplicate_list_keys(value: Any, schema: Doc, where: str = "") -> Problems:
    """`x-kubernetes-list-type: map` lists (containers, env, ports, volumes...) allow each key once."""
    problems: Problems = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems += duplicate_list_keys(item, sub, f"{where}.{key}" if where else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            problems += [f"{where}: {key} appears twice" for key in {k for k in seen if seen.count(k) > 1}]
        for i, item in enumerate(value):
            problems += duplicate_list_keys(item, schema["items"], f"{where}[{i}]")
    return problems


# --- KubeRay's operator rules (ValidateRayClusterSpec), one function each --------------------------

# Kubernetes label syntax (apimachinery's IsQualifiedName / IsValidLabelValue).
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RAY_START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
FT_ANNOTATION = "ray.io/ft-enabled"


def cluster_spec(doc: Doc) -> Doc | None:
    spec = doc.get("spec") or {}
    return spec.get("rayClusterConfig") if doc.get("kind") == "RayService" else spec


def ray_groups(cluster: Doc) -> Iterator[tuple[str, Doc]]:
    """(name as the operator's messages give it, group spec): the head as `Head`, then every worker group."""
    yield "Head", cluster.get("headGroupSpec") or {}
    for group in cluster.get("workerGroupSpecs") or []:
        yield group.get("groupName", "?"), group


def containers(group: Doc) -> list[Doc]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def env_names(container: Doc) -> set[str]:
    return {item.get("name") for item in container.get("env") or []}


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_NAME.match(name))


def is_label_value(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or (len(value) <= 63 and bool(_NAME.match(value))))


def labels_not_in_ray_start_params(cluster: Doc, doc: Doc) -> Problems:
    return [
        f"{name}: rayStartParams['labels'] is not supported; use the group's top-level `labels:` map"
        for name, group in ray_groups(cluster)
        if "labels" in (group.get("rayStartParams") or {})
    ]


def group_labels_are_kubernetes_labels(cluster: Doc, doc: Doc) -> Problems:
    problems = []
    for name, group in ray_groups(cluster):
        for key, value in (group.get("labels") or {}).items():
            if not is_label_key(key):
                problems.append(f"{name}: invalid label key {key!r}")
            if not is_label_value(value):
                problems.append(f"{name}: invalid label value {value!r} for {key!r}")
    return problems


def resources_in_one_place(cluster: Doc, doc: Doc) -> Problems:
    return [
        f"{name}: resources set both in rayStartParams and in `resources:`; use only one"
        for name, group in ray_groups(cluster)
        if group.get("resources") and any((group.get("rayStartParams") or {}).get(p) for p in RAY_START_RESOURCE_PARAMS)
    ]


def worker_replica_bounds(cluster: Doc, doc: Doc) -> Problems:
    problems = []
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for group in cluster.get("workerGroupSpecs") or []:
        name, low, high = group.get("groupName"), group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{name}: must set both minReplicas and maxReplicas when autoscaling is disabled")
        problems += [f"{name}: negative {k}" for k in ("minReplicas", "maxReplicas") if (group.get(k) or 0) < 0]
        if low is not None and high is not None and low > high:
            problems.append(f"{name}: minReplicas {low} greater than maxReplicas {high}")
    return problems


def pod_templates_have_a_container(cluster: Doc, doc: Doc) -> Problems:
    return [f"{name}: pod template has no container" for name, group in ray_groups(cluster) if not containers(group)]


def gcs_fault_tolerance_through_options(cluster: Doc, doc: Doc) -> Problems:
    head = cluster.get("headGroupSpec") or {}
    params = head.get("rayStartParams") or {}
    env = env_names((containers(head) or [{}])[0])
    options = cluster.get("gcsFaultToleranceOptions")
    ft_on = options is not None or (doc.get("metadata") or {}).get("annotations", {}).get(FT_ANNOTATION) == "true"
    problems = []
    if not ft_on and "RAY_REDIS_ADDRESS" in env:
        problems.append("Head: RAY_REDIS_ADDRESS enables GCS fault tolerance; set gcsFaultToleranceOptions instead")
    if options is not None:
        if params.get("redis-password"):
            problems.append("Head: redis-password in rayStartParams; use gcsFaultToleranceOptions.redisPassword")
        problems += [
            f"Head: {var} env var; use gcsFaultToleranceOptions"
            for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS")
            if var in env
        ]
    if params.get("redis-username") or "REDIS_USERNAME" in env:
        problems.append("Head: redis username outside gcsFaultToleranceOptions.redisUsername")
    return problems


def token_auth_needs_ray_2_52(cluster: Doc, doc: Doc) -> Problems:
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        return []
    parts = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(cluster.get("rayVersion", "")))
    if parts is None:
        return ["authOptions.mode is 'token' but rayVersion is missing or invalid"]
    if tuple(int(p or 0) for p in parts.groups()) < (2, 52, 0):
        return [f"authOptions.mode is 'token' but Ray {cluster['rayVersion']} < 2.52.0"]
    return []


OPERATOR_RULES: list[Callable[[Doc, Doc], Problems]] = [
    labels_not_in_ray_start_params,
    group_labels_are_kubernetes_labels,
    resources_in_one_place,
    worker_replica_bounds,
    pod_templates_have_a_container,
    gcs_fault_tolerance_through_options,
    token_auth_needs_ray_2_52,
]


# --- rayfit's own rules for its pods ---------------------------------------------------------------

CACHE_ENV = "HF_HOME"
PERSISTENT_VOLUME_KINDS = ("persistentVolumeClaim", "hostPath")


def volume_mounts_name_pod_volumes(cluster: Doc, doc: Doc) -> Problems:
    """The API server refuses a container mounting a volume its pod does not declare."""
    problems = []
    for name, group in ray_groups(cluster):
        volumes = {v.get("name") for v in group.get("template", {}).get("spec", {}).get("volumes") or []}
        for container in containers(group):
            problems += [
                f"{name}: {container.get('name')} mounts undeclared volume {m.get('name')!r}"
                for m in container.get("volumeMounts") or []
                if m.get("name") not in volumes
            ]
    return problems


def model_cache_on_a_volume(cluster: Doc, doc: Doc) -> Problems:
    """Each Ray container's HF_HOME lies on a persistent volume: a recreated pod does not download weights again."""
    problems = []
    for name, group in ray_groups(cluster):
        spec = group.get("template", {}).get("spec", {})
        persistent = {v["name"] for v in spec.get("volumes") or [] if any(k in v for k in PERSISTENT_VOLUME_KINDS)}
        ray_container = (containers(group) or [{}])[0]  # KubeRay runs Ray in the first container
        home = next((e.get("value") for e in ray_container.get("env") or [] if e.get("name") == CACHE_ENV), None)
        if home is None:
            problems.append(f"{name}: no {CACHE_ENV} env var")
            continue
        mounts = [m for m in ray_container.get("volumeMounts") or [] if m.get("name") in persistent]
        if not any(home == m["mountPath"] or home.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts):
            problems.append(f"{name}: {CACHE_ENV}={home} is not on a persistentVolumeClaim or hostPath mount")
    return problems


RAYFIT_RULES: list[Callable[[Doc, Doc], Problems]] = [volume_mounts_name_pod_volumes, model_cache_on_a_volume]


# A core kind without an OpenAPI document offline: the fields the claims here use, nothing else.
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"  # the CRD's own
PVC_SCHEMA: Doc = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": ["PersistentVolumeClaim"]},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": _DNS_SUBDOMAIN.pattern}, "labels": {"type": "object"}},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["accessModes", "resources"],
            "additionalProperties": False,
            "properties": {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                },
                "storageClassName": {"type": "string"},
                "resources": {
                    "type": "object",
                    "required": ["requests"],
                    "additionalProperties": False,
                    "properties": {
                        "requests": {
                            "type": "object",
                            "required": ["storage"],
                            "additionalProperties": False,
                            "properties": {"storage": {"type": "string", "pattern": _QUANTITY}},
                        }
                    },
                },
            },
        },
    },
}


def claims_are_shipped(docs: list[Doc]) -> Problems:
    """Every persistentVolumeClaim a Ray pod mounts is created by a manifest here (`kubectl apply -f deploy/`)."""
    shipped = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    problems = []
    for doc in docs:
        cluster = cluster_spec(doc) if doc.get("kind") in CRD_FILES else None
        for name, group in ray_groups(cluster) if cluster else []:
            for volume in group.get("template", {}).get("spec", {}).get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in shipped:
                    problems.append(f"{name}: claim {claim!r} is not in deploy/")
    return problems


# --- The checker ----------------------------------------------------------------------------------


def check_manifest(doc: Doc) -> Problems:
    """Every problem with one manifest, each as `rule: where: what`."""
    kind = doc.get("kind")
    if kind == "PersistentVolumeClaim":
        return [f"persistent_volume_claim_schema: {p}" for p in schema_violations(doc, PVC_SCHEMA)]
    if kind not in CRD_FILES:
        return [f"known_kind: no schema shipped for kind {kind!r} (tests/kuberay/)"]
    schema = crd_schema(kind)
    problems = [f"crd_schema: {p}" for p in schema_violations(doc, schema)]
    problems += [f"crd_unknown_fields: {p}" for p in unknown_fields(doc, schema)]
    problems += [f"crd_list_map_keys: {p}" for p in duplicate_list_keys(doc, schema)]
    cluster = cluster_spec(doc)
    if cluster is None:
        return [*problems, "crd_schema: no RayCluster spec"]
    for rule in OPERATOR_RULES + RAYFIT_RULES:
        problems += [f"{rule.__name__}: {p}" for p in rule(cluster, doc)]
    return problems


MANIFESTS = shipped_manifests()


def rayservice() -> Doc:
    (doc,) = [doc for _, doc in shipped_manifests() if doc.get("kind") == "RayService"]
    return doc


def test_deploy_ships_a_rayservice_and_its_claims() -> None:
    kinds = sorted(doc.get("kind") for _, doc in MANIFESTS)
    assert kinds.count("RayService") == 1 and "PersistentVolumeClaim" in kinds


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[where for where, _ in MANIFESTS])
def test_manifest_passes_the_crd_schema_and_the_operators_rules(where: str, doc: Doc) -> None:
    assert check_manifest(doc) == [], where


def test_every_mounted_claim_is_shipped() -> None:
    assert claims_are_shipped([doc for _, doc in MANIFESTS]) == []


# --- The checker can fail: each rule refuses a manifest that breaks it ------------------------------


def worker_groups(doc: Doc) -> list[Doc]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def old_labels_in_ray_start_params(doc: Doc) -> None:
    """The shape deploy/rayservice.yaml had, which KubeRay refuses."""
    for group in worker_groups(doc):
        labels = group.pop("labels")
        group["rayStartParams"]["labels"] = ",".join(f"{k}={v}" for k, v in labels.items())


def typo_in_a_group_field(doc: Doc) -> None:
    worker_groups(doc)[0]["rayStartParam"] = worker_groups(doc)[0].pop("rayStartParams")


def resources_twice(doc: Doc) -> None:
    worker_groups(doc)[0]["resources"] = {"GPU": "1"}


def min_above_max(doc: Doc) -> None:
    worker_groups(doc)[0]["minReplicas"] = 2


def no_max_replicas(doc: Doc) -> None:
    del worker_groups(doc)[0]["maxReplicas"]


def label_value_with_a_comma(doc: Doc) -> None:
    worker_groups(doc)[0]["labels"]["rayfit.io/gpu"] = "gpu-a-0,gpu-a-1"


def no_container(doc: Doc) -> None:
    worker_groups(doc)[0]["template"]["spec"]["containers"] = []


def redis_without_ft_options(doc: Doc) -> None:
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [*head["env"], {"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]


def token_auth_on_old_ray(doc: Doc) -> None:
    doc["spec"]["rayClusterConfig"]["rayVersion"] = "2.46.0"


def cache_on_the_container_disk(doc: Doc) -> None:
    spec = worker_groups(doc)[0]["template"]["spec"]
    spec["volumes"] = [{"name": "model-cache", "emptyDir": {}}]


def cache_env_dropped(doc: Doc) -> None:
    container = worker_groups(doc)[0]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != CACHE_ENV]


def mount_of_an_undeclared_volume(doc: Doc) -> None:
    del worker_groups(doc)[0]["template"]["spec"]["volumes"]


def env_var_twice(doc: Doc) -> None:
    container = worker_groups(doc)[0]["template"]["spec"]["containers"][0]
    container["env"] = [*container["env"], {"name": CACHE_ENV, "value": "/tmp"}]


def replicas_as_text(doc: Doc) -> None:
    worker_groups(doc)[0]["replicas"] = "1"


@pytest.mark.parametrize(
    ("breakage", "rule"),
    [
        (old_labels_in_ray_start_params, "labels_not_in_ray_start_params"),
        (typo_in_a_group_field, "crd_unknown_fields"),
        (replicas_as_text, "crd_schema"),
        (env_var_twice, "crd_list_map_keys"),
        (resources_twice, "resources_in_one_place"),
        (min_above_max, "worker_replica_bounds"),
        (no_max_replicas, "worker_replica_bounds"),
        (label_value_with_a_comma, "group_labels_are_kubernetes_labels"),
        (no_container, "pod_templates_have_a_container"),
        (redis_without_ft_options, "gcs_fault_tolerance_through_options"),
        (token_auth_on_old_ray, "token_auth_needs_ray_2_52"),
        (cache_on_the_container_disk, "model_cache_on_a_volume"),
        (cache_env_dropped, "model_cache_on_a_volume"),
        (mount_of_an_undeclared_volume, "volume_mounts_name_pod_volumes"),
    ],
    ids=lambda v: v.__name__ if callable(v) else v,
)
def test_checker_refuses_a_broken_rayservice_naming_the_rule(breakage: Callable[[Doc], None], rule: str) -> None:
    doc = copy.deepcopy(rayservice())
    breakage(doc)
    problems = check_manifest(doc)
    assert any(p.startswith(f"{rule}: ") for p in problems), problems


def test_old_labels_shape_is_refused_for_every_group() -> None:
    doc = copy.deepcopy(rayservice())
    old_labels_in_ray_start_params(doc)
    refused = [p for p in check_manifest(doc) if p.startswith("labels_not_in_ray_start_params: ")]
    names = [group["groupName"] for group in worker_groups(doc)]
    assert len(refused) == len(names) and all(name in " ".join(refused) for name in names), refused


def test_a_claim_not_shipped_is_refused() -> None:
    docs = [doc for _, doc in MANIFESTS if doc["metadata"]["name"] != "rayfit-cache-gpu-a"]
    assert len(docs) == len(MANIFESTS) - 1
    assert any("'rayfit-cache-gpu-a'" in p for p in claims_are_shipped(docs))


def test_a_broken_claim_and_an_unknown_kind_are_refused() -> None:
    (claim, *_) = [doc for _, doc in MANIFESTS if doc.get("kind") == "PersistentVolumeClaim"]
    broken = copy.deepcopy(claim)
    broken["spec"]["resources"]["requests"]["storage"] = "100 GB"
    assert any(p.startswith("persistent_volume_claim_schema: ") for p in check_manifest(broken))
    assert check_manifest({"apiVersion": "v1", "kind": "Service"})[0].startswith("known_kind: ")


# --- cluster.yaml: one Ray node per machine, as the launcher's autoscaler assumes --------------------

START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
RAY_START_ARGS = re.compile(r"\$\([^()]*python -m placement ray-start-args([^()]*)\)")


def one_ray_node_per_machine(config: Doc) -> Problems:
    """Each machine's start commands run one `ray start`: Ray's autoscaler (v2, the `ray up` default) maps
    each launcher node to one Ray node through RAY_CLOUD_INSTANCE_ID, which every raylet started from one
    command would share."""
    problems = []
    for key in START_KEYS:
        text = " ".join(config.get(key) or [])
        starts = len(re.findall(r"\bray start\b", text))
        if starts != 1:
            problems.append(f"{key}: {starts} `ray start` commands")
        if "--per-gpu" in text or re.search(r"\|\s*bash", text):
            problems.append(f"{key}: runs generated start lines (one Ray node per GPU)")
    return problems


def test_cluster_yaml_starts_one_ray_node_per_machine() -> None:
    config = load_yaml(ROOT / "cluster.yaml")[0]
    assert one_ray_node_per_machine(config) == []


@pytest.mark.parametrize("key", START_KEYS)
def test_cluster_yamls_generated_arguments_are_one_node_holding_every_gpu(key: str) -> None:
    """The `$(python -m placement ray-start-args ...)` of each start command, as on a 2-GPU machine:
    arguments for its one `ray start` (no start lines of its own), one GPU slot per GPU."""
    (command,) = [c for c in load_yaml(ROOT / "cluster.yaml")[0][key] if "ray-start-args" in c]
    (args,) = RAY_START_ARGS.findall(command)
    done = subprocess.run(
        [sys.executable, "-m", "placement", "ray-start-args", *shlex.split(args), "--gpus", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    )
    printed = done.stdout.split()
    assert "ray" not in printed and "start" not in printed, done.stdout
    assert "--num-gpus=2" in printed and ('"gpu_slot_0"' in done.stdout and '"gpu_slot_1"' in done.stdout)
    assert ("--head" in printed) == (key == "head_start_ray_commands")


def test_one_node_rule_refuses_per_gpu_raylets_under_the_launcher() -> None:
    """cluster.yaml's former shape: a head, then one raylet per GPU piped into bash."""
    config = load_yaml(ROOT / "cluster.yaml")[0]
    config["worker_start_ray_commands"] = [
        "ray stop",
        "python -m placement ray-start-args --per-gpu --worker --address=$RAY_HEAD_IP:6379 | bash -e",
    ]
    config["head_start_ray_commands"] = [
        "ray stop",
        "ray start --head --port=6379 --num-gpus=0 && python -m placement ray-start-args --per-gpu --worker | bash -e",
    ]
    problems = one_ray_node_per_machine(config)
    assert any(p.startswith("worker_start_ray_commands: 0 ") for p in problems), problems
    assert any(p.startswith("head_start_ray_commands: runs generated") for p in problems), problems
