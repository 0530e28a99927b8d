"""Operational rules of Engram's rendered manifests that schema validation cannot see.

Usage: check_policy.py RENDER.yaml...  (each the output of `kubectl kustomize deploy/overlays/X`)
Prints one line per broken rule and exits 1 if there is any.
"""

import sys

import yaml

GRPC_PORT = 50051
METRICS_PORT = 9090
UID = 65532
# After SIGTERM the server keeps taking calls for the drain, then lets in-flight calls finish
# for the timeout (crates/engram-server/src/settings.rs defaults when a render sets neither).
SHUTDOWN_DEFAULTS = {"ENGRAM_SHUTDOWN_DRAIN_SECONDS": 0, "ENGRAM_SHUTDOWN_TIMEOUT_SECONDS": 25}


def load(path):
    with open(path) as file:
        return [document for document in yaml.safe_load_all(file) if document]


def find(resources, kind, name=None):
    return [
        resource
        for resource in resources
        if resource["kind"] == kind and name in (None, resource["metadata"]["name"])
    ]


def all_containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env_value(container, name):
    for variable in container.get("env", []):
        if variable["name"] == name:
            return variable
    return None


def pod_rules(where, pod_spec, config_maps):
    """Pod Security "restricted", resources, no API token, settings that exist."""
    problems = []
    pod_security = pod_spec.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True or pod_security.get("runAsUser") != UID:
        problems.append(f"{where}: pod must run as non-root uid {UID}")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    if pod_spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken must be false")
    if pod_spec.get("enableServiceLinks") is not False:
        problems.append(f"{where}: enableServiceLinks must be false (ENGRAM_* variables)")
    for container in all_containers(pod_spec):
        name = f"{where} container {container['name']}"
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            if not {"cpu", "memory"} <= resources.get(bound, {}).keys():
                problems.append(f"{name}: resources.{bound} needs cpu and memory")
        if not any(mount["mountPath"] == "/tmp" for mount in container.get("volumeMounts", [])):
            problems.append(f"{name}: /tmp must be a writable volume")
        for source in container.get("envFrom", []):
            reference = source.get("configMapRef", {}).get("name")
            if reference is not None and reference not in config_maps:
                problems.append(f"{name}: envFrom names a missing ConfigMap {reference}")
    return problems


def probe_rules(container):
    problems = []
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": "readiness"}
    for probe, service in expected.items():
        grpc = container.get(probe, {}).get("grpc")
        if grpc is None or grpc.get("port") != GRPC_PORT or grpc.get("service", "") != service:
            problems.append(f"{probe} must be gRPC on {GRPC_PORT} for service {service!r}")
    if container.get("livenessProbe", {}).get("initialDelaySeconds"):
        problems.append("livenessProbe: use the startupProbe instead of an initial delay")
    ports = {port["containerPort"] for port in container.get("ports", [])}
    if ports != {GRPC_PORT, METRICS_PORT}:
        problems.append(f"container ports must be {GRPC_PORT} and {METRICS_PORT}, got {ports}")
    # The kubelet and Prometheus reach the pod IP, not its loopback.
    if container.get("args", [])[-2:] != ["--listen", f"0.0.0.0:{GRPC_PORT}"]:
        problems.append(f"the server must be started with --listen 0.0.0.0:{GRPC_PORT}")
    metrics_listen = env_value(container, "ENGRAM_METRICS_LISTEN") or {}
    if metrics_listen.get("value") != f"0.0.0.0:{METRICS_PORT}":
        problems.append(f"ENGRAM_METRICS_LISTEN must be 0.0.0.0:{METRICS_PORT}")
    return problems


def container_settings(container, config_maps):
    """The ConfigMap settings a container reads (its own env entries aside)."""
    settings = {}
    for source in container.get("envFrom", []):
        settings.update(config_maps.get(source.get("configMapRef", {}).get("name"), {}))
    return settings


def grace_rules(pod_spec, container, settings):
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    if pre_stop is None:
        return ["preStop must be a sleep (endpoints drop the pod before SIGTERM)"]
    shutdown = {name: int(settings.get(name, default))
                for name, default in SHUTDOWN_DEFAULTS.items()}
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + sum(shutdown.values()):
        return [f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + "
                f"{shutdown}"]
    return []


def selector_rules(resources, pod_labels):
    problems = []
    selectors = [("Service " + service["metadata"]["name"], service["spec"]["selector"])
                 for service in find(resources, "Service")]
    selectors += [("PodDisruptionBudget", budget["spec"]["selector"]["matchLabels"])
                  for budget in find(resources, "PodDisruptionBudget")]
    for where, selector in selectors:
        if not selector.items() <= pod_labels.items():
            problems.append(f"{where}: selector {selector} does not match the server pods")
    for service in find(resources, "Service"):
        grpc = [port for port in service["spec"]["ports"] if port["port"] == GRPC_PORT]
        if not grpc or grpc[0].get("appProtocol") != "grpc":
            problems.append(f"Service {service['metadata']['name']}: port {GRPC_PORT} needs "
                            "appProtocol grpc")
    services = find(resources, "Service")
    if not any(service["spec"].get("clusterIP") == "None" for service in services):
        problems.append("a headless Service is needed for client-side balancing")
    return problems


def sqlite_rules(resources, deployment, server):
    """SQLite has one writer: one pod, never two at once, migrated on its own volume."""
    spec = deployment["spec"]
    pod_spec = spec["template"]["spec"]
    problems = []
    if spec.get("replicas") != 1:
        problems.append("SQLite: the Deployment needs exactly 1 replica")
    if spec.get("strategy", {}).get("type") != "Recreate":
        problems.append("SQLite: the Deployment needs the Recreate strategy")
    if find(resources, "HorizontalPodAutoscaler"):
        problems.append("SQLite: no HorizontalPodAutoscaler")
    claims = {volume["name"] for volume in pod_spec["volumes"] if "persistentVolumeClaim" in volume}
    if not any(mount["mountPath"] == "/data" and mount["name"] in claims
               for mount in server.get("volumeMounts", [])):
        problems.append("SQLite: /data must be a PersistentVolumeClaim")
    if not any(container.get("args") == ["migrate"]
               for container in pod_spec.get("initContainers", [])):
        problems.append("SQLite: an init container must run `engram migrate`")
    return problems


def postgres_rules(resources, deployment, server):
    """PostgreSQL: URL from a Secret, autoscaled and spread replicas, migrations in a Job."""
    database_url = env_value(server, "DATABASE_URL")
    problems = []
    if database_url is None or "secretKeyRef" not in database_url.get("valueFrom", {}):
        problems.append("PostgreSQL: DATABASE_URL must come from a Secret")
    if "replicas" in deployment["spec"]:
        problems.append("PostgreSQL: the autoscaler owns replicas; drop spec.replicas")
    autoscalers = find(resources, "HorizontalPodAutoscaler")
    if not autoscalers or autoscalers[0]["spec"].get("minReplicas", 1) < 2:
        problems.append("PostgreSQL: a HorizontalPodAutoscaler with minReplicas >= 2")
    if not deployment["spec"]["template"]["spec"].get("topologySpreadConstraints"):
        problems.append("PostgreSQL: replicas need topologySpreadConstraints")
    jobs = find(resources, "Job")
    if not jobs:
        problems.append("PostgreSQL: the migration Job is missing")
    for job in jobs:
        containers = job["spec"]["template"]["spec"]["containers"]
        if [container.get("args") for container in containers] != [["migrate"]]:
            problems.append("the migration Job must run `engram migrate`")
        if env_value(containers[0], "DATABASE_URL") != database_url:
            problems.append("the migration Job must use the server's DATABASE_URL")
    return problems


def check(path):
    resources = load(path)
    config_maps = {config_map["metadata"]["name"]: config_map.get("data", {})
                   for config_map in find(resources, "ConfigMap")}
    deployments = find(resources, "Deployment", "engram")
    if not deployments:
        return ["the Deployment engram is missing"]
    deployment = deployments[0]
    pod_spec = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod_spec["containers"] if c["name"] == "engram")
    settings = container_settings(server, config_maps)
    problems = pod_rules("Deployment", pod_spec, config_maps)
    problems += probe_rules(server)
    problems += grace_rules(pod_spec, server, settings)
    problems += selector_rules(resources, deployment["spec"]["template"]["metadata"]["labels"])
    on_sqlite = env_value(server, "DATABASE_URL") is None and settings.get(
        "DATABASE_URL", "").startswith("sqlite:")
    if on_sqlite:
        problems += sqlite_rules(resources, deployment, server)
    else:
        problems += postgres_rules(resources, deployment, server)
    images = {container["image"] for container in all_containers(pod_spec)}
    for job in find(resources, "Job"):
        job_pod = job["spec"]["template"]["spec"]
        problems += pod_rules(f"Job {job['metadata']['name']}", job_pod, config_maps)
        images |= {container["image"] for container in all_containers(job_pod)}
    if len(images) != 1:
        problems.append(f"the server and its migration must share one image: {sorted(images)}")
    for kind in ("ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"):
        if not find(resources, kind):
            problems.append(f"a {kind} is missing")
    return problems


def main(paths):
    failed = False
    for path in paths:
        for problem in check(path):
            print(f"{path}: {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
