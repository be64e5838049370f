#!/usr/bin/env python3
"""Validate the switchyard chart's rendered manifests (`helm template` output).

1. Schemas. Every resource against the Kubernetes OpenAPI schemas of each
   --kube-version, strict (an unknown field is an error), with kubernetes-validate
   (PyPI; it ships the schemas, no cluster or network needed). A ServiceMonitor
   (monitoring.coreos.com/v1) against the schema of the prometheus-operator CRD models
   of cloudcoil-models-prometheus-operator (PyPI), made strict the same way.
2. What the chart promises (docs/src/operations/kubernetes.md): non-root, read-only
   root file system, no capabilities; the image's entrypoint with this pod's config;
   liveness and readiness on the admin port's /health; a preStop sleep and a grace
   period above it plus proxy.shutdown_timeout_ms; every listener of the config a
   container port and a Service port, on a wildcard address; every file the config
   names mounted, from a Secret key that exists; per-pod [coordination] instance names
   for a StatefulSet; Service, PodDisruptionBudget and ServiceMonitor selectors that
   match.
3. With --switchyard BIN: every config file of the ConfigMap, with the Secret's files
   (placeholders for an existing Secret's) written to a temporary directory, passes
   `BIN check`.
4. With --same-as FILE: FILE (another Helm's rendering) holds the same resources.

Prints one line per check group; exits 1 if anything failed, 2 if it could not run.
"""

import argparse
import base64
import copy
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover
    print("validate: kubernetes-validate is missing (pip install kubernetes-validate)", file=sys.stderr)
    sys.exit(2)

import jsonschema

CONFIG_DIR = "/etc/switchyard/"
SECRETS_DIR = "/etc/switchyard/secrets/"
ENTRYPOINT = ["/usr/bin/switchyard", "--config", None, "--log-format", "json", "--log-to", "stdout"]


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def closed(schema):
    """The schema with additionalProperties: false wherever properties are listed and
    nothing else is said of other keys: an unknown field becomes an error, as with
    `kubectl --validate=strict`."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and "patternProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


_servicemonitor_validator = None


def servicemonitor_validator():
    global _servicemonitor_validator
    if _servicemonitor_validator is None:
        try:
            from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
        except ImportError:
            print(
                "validate: cloudcoil-models-prometheus-operator is missing (pip install it)",
                file=sys.stderr,
            )
            sys.exit(2)
        schema = closed(ServiceMonitor.model_json_schema(by_alias=True))
        _servicemonitor_validator = jsonschema.Draft202012Validator(schema)
    return _servicemonitor_validator


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def check_schemas(docs, versions, errors):
    for doc in docs:
        if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "ServiceMonitor":
            for e in sorted(servicemonitor_validator().iter_errors(doc), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in e.absolute_path)
                errors.append(f"{name_of(doc)}: {path}: {e.message} (prometheus-operator CRD schema)")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                errors.append(f"{name_of(doc)}: {path}: {e.message} (Kubernetes {version}, strict)")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{name_of(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}")


def port_of(addr):
    m = re.fullmatch(r"(.*):(\d+)", addr)
    return (m.group(1), int(m.group(2))) if m else (addr, None)


def walk_config(node, path=""):
    """(key path, kind, value) of every *_file and *_env string in a parsed config."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else k
            if isinstance(v, str) and k.endswith("_file"):
                yield p, "file", v
            elif isinstance(v, str) and k.endswith("_env"):
                yield p, "env", v
            else:
                yield from walk_config(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_config(v, f"{path}[{i}]")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_chart(docs, expect, errors):
    """What the chart promises. Returns what --switchyard needs: [(config key, TOML
    text)], {secret key: bytes or None}, [env names]."""
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
    if len(workloads) != 1 or workloads[0]["kind"] != expect:
        errors.append(f"expected one {expect}, found {[name_of(w) for w in workloads]}")
        return [], {}, []
    wl = workloads[0]
    spec = wl["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"]["labels"]
    ps = pod["spec"]
    if not matches(spec["selector"]["matchLabels"], pod_labels):
        errors.append(f"{name_of(wl)}: selector does not match the pod labels")
    for a in ("checksum/config", "checksum/secret"):
        if a not in pod["metadata"].get("annotations", {}):
            errors.append(f"{name_of(wl)}: no {a} annotation (a changed config would not roll the pods)")

    sc = ps.get("securityContext", {})
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") != 10001:
        errors.append(f"{name_of(wl)}: pod securityContext must run as non-root user 10001: {sc}")
    containers = ps["containers"]
    if len(containers) != 1:
        errors.append(f"{name_of(wl)}: expected one container")
    c = containers[0]
    csc = c.get("securityContext", {})
    if csc.get("readOnlyRootFilesystem") is not True:
        errors.append("container: readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        errors.append("container: allowPrivilegeEscalation is not false")
    caps = csc.get("capabilities", {})
    if caps.get("drop") != ["ALL"] or caps.get("add"):
        errors.append(f"container: capabilities must drop ALL and add none: {caps}")
    if not c.get("resources", {}).get("requests"):
        errors.append("container: no resource requests")

    cmd = c.get("command", [])
    if len(cmd) != len(ENTRYPOINT) or any(e is not None and e != x for e, x in zip(ENTRYPOINT, cmd)):
        errors.append(f"container: command {cmd} is not the image's entrypoint with a config file")
        return [], {}, []
    if c.get("args") != ["run"]:
        errors.append(f"container: args {c.get('args')}, expected ['run']")
    config_arg = cmd[2]

    cports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if "admin" not in cports:
        errors.append("container: no port named admin")
    for probe in ("livenessProbe", "readinessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != "/health" or get.get("port") != "admin":
            errors.append(f"container: {probe} is not GET /health on the admin port: {c.get(probe)}")

    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = ps.get("terminationGracePeriodSeconds", 30)

    # The projected volume at /etc/switchyard: config files and secrets/.
    mounts = {m["mountPath"].rstrip("/") + "/": m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in ps.get("volumes", [])}
    if mounts.get(CONFIG_DIR) is None:
        errors.append("container: nothing mounted at /etc/switchyard")
        return [], {}, []
    projected = volumes[mounts[CONFIG_DIR]].get("projected", {})
    cm_items, secret_items, secret_name = {}, {}, None
    for src in projected.get("sources", []):
        if "configMap" in src:
            cm_name = src["configMap"]["name"]
            for it in src["configMap"].get("items", []):
                cm_items[it["path"]] = it["key"]
        if "secret" in src:
            secret_name = src["secret"]["name"]
            for it in src["secret"].get("items", []):
                secret_items[it["path"]] = it["key"]
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for d in by_kind.get("Secret", [])}
    cm = configmaps.get(cm_name)
    if cm is None:
        errors.append(f"the pods' ConfigMap {cm_name} is not rendered")
        return [], {}, []
    secret = secrets.get(secret_name) if secret_name else None
    if secret is not None:
        for path, key in secret_items.items():
            if key not in secret.get("data", {}):
                errors.append(f"Secret {secret_name} has no key {key} (mounted at /etc/switchyard/{path})")

    # Which config file each pod reads.
    replicas = spec.get("replicas", 1)
    if expect == "StatefulSet":
        if config_arg != "/etc/switchyard/$(POD_NAME).toml":
            errors.append(f"StatefulSet: the config path {config_arg} is not per pod")
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            errors.append("StatefulSet: no POD_NAME from metadata.name")
        pods = [f"{wl['metadata']['name']}-{i}" for i in range(replicas)]
        files = {p: f"{CONFIG_DIR}{p}.toml" for p in pods}
        headless = [
            s for s in by_kind.get("Service", []) if s["metadata"]["name"] == spec.get("serviceName")
        ]
        if not headless or headless[0]["spec"].get("clusterIP") != "None":
            errors.append(f"StatefulSet: its serviceName {spec.get('serviceName')} is not a rendered headless Service")
    else:
        files = {"every pod": config_arg}

    configs = []
    shutdown_ms = None
    listeners = None
    needed_secret_keys = {}
    envs = set()
    extra_env = {e["name"] for e in c.get("env", [])}
    for pod_name, path in files.items():
        if not path.startswith(CONFIG_DIR) or path[len(CONFIG_DIR):] not in cm_items:
            errors.append(f"{pod_name}: its config {path} is not in the projected ConfigMap items")
            continue
        key = cm_items[path[len(CONFIG_DIR):]]
        text = cm["data"].get(key)
        if text is None:
            errors.append(f"ConfigMap {cm_name} has no key {key}")
            continue
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            errors.append(f"ConfigMap {cm_name} key {key}: not TOML: {e}")
            continue
        configs.append((key, text))
        coord = cfg.get("coordination")
        if expect == "StatefulSet":
            if not coord or coord.get("instance") != pod_name:
                errors.append(f"{key}: [coordination] instance is not {pod_name}: {coord}")
        elif coord:
            errors.append(f"{key}: a Deployment's config has [coordination] (every pod would be one instance)")
        ms = cfg.get("proxy", {}).get("shutdown_timeout_ms", 10000)
        shutdown_ms = ms if shutdown_ms is None else max(shutdown_ms, ms)
        mine = {}
        for cname, cl in cfg.get("clusters", {}).items():
            for ep in ("rw", "ro"):
                addr = cl.get(f"listen_{ep}")
                if addr:
                    host, port = port_of(addr)
                    if host not in ("0.0.0.0", "[::]"):
                        errors.append(f"{key}: clusters.{cname}.listen_{ep} = {addr!r} is not a wildcard address")
                    mine[f"{cname}-{ep}"] = port
        http = cfg.get("admin", {}).get("http_listen")
        if not http:
            errors.append(f"{key}: no admin.http_listen (the probes need /health)")
        else:
            host, port = port_of(http)
            if host not in ("0.0.0.0", "[::]"):
                errors.append(f"{key}: admin.http_listen = {http!r} is not a wildcard address")
            mine["admin"] = port
        if listeners is not None and mine != listeners:
            errors.append(f"{key}: listeners differ between pods: {mine} vs {listeners}")
        listeners = mine
        for name, port in mine.items():
            if cports.get(name) != port:
                errors.append(f"{key}: listener {name} on port {port}, container port {name} is {cports.get(name)}")
        for kp, kind, val in walk_config(cfg):
            if kind == "env":
                envs.add(val)
                if val not in extra_env:
                    errors.append(f"{key}: {kp} = {val!r}, and the container has no such variable")
                continue
            if val.startswith(CONFIG_DIR):
                rel = val[len(CONFIG_DIR):]
                if rel not in secret_items:
                    errors.append(f"{key}: {kp} = {val!r} is not mounted")
                else:
                    needed_secret_keys[secret_items[rel]] = rel
            elif not any(val.startswith(m) for m in mounts):
                errors.append(f"{key}: {kp} = {val!r} is not mounted")
        if expect == "Deployment":
            break
    for name in set(cports) - set(listeners or {}):
        errors.append(f"container port {name} has no listener in the config")

    if shutdown_ms is not None and grace <= sleep + math.ceil(shutdown_ms / 1000):
        errors.append(
            f"terminationGracePeriodSeconds {grace} is not above the preStop sleep ({sleep} s) + shutdown_timeout_ms ({shutdown_ms} ms)"
        )
    if sleep <= 0:
        errors.append("container: no preStop sleep (the pod would close its listeners before the endpoints drop it)")

    # Services and the rest select these pods.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    exposed = set()
    for s in services.values():
        if not matches(s["spec"].get("selector"), pod_labels):
            errors.append(f"{name_of(s)}: selector does not match the pod labels")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort")
            if tp not in cports:
                errors.append(f"{name_of(s)}: targetPort {tp} is no container port")
            elif p["port"] != cports[tp]:
                errors.append(f"{name_of(s)}: port {p['port']} for {tp}, which listens on {cports[tp]}")
            exposed.add(tp)
    for name in cports:
        if name not in exposed:
            errors.append(f"container port {name} is in no Service")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if len(pdbs) != 1 or not matches(pdbs[0]["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("no PodDisruptionBudget selecting the pods")
    for sm in by_kind.get("ServiceMonitor", []):
        targets = [s for s in services.values() if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        if len(targets) != 1:
            errors.append(f"{name_of(sm)}: selects {len(targets)} Services, expected the admin one")
            continue
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in {p["name"] for p in targets[0]["spec"]["ports"]} or ep.get("path") != "/metrics":
                errors.append(f"{name_of(sm)}: endpoint {ep} is not /metrics on a port of {name_of(targets[0])}")
            token_file = None
            for _, text in configs[:1]:
                token_file = tomllib.loads(text).get("admin", {}).get("token_file")
            auth = ep.get("authorization", {}).get("credentials")
            if token_file:
                rel = token_file[len(CONFIG_DIR):] if token_file.startswith(CONFIG_DIR) else None
                if not auth or auth.get("name") != secret_name or auth.get("key") != secret_items.get(rel):
                    errors.append(f"{name_of(sm)}: /metrics needs the admin token ({token_file}); authorization is {auth}")

    # Files for `switchyard check`: the Secret's content, or None (an existing Secret).
    files_out = {}
    for key in needed_secret_keys:
        data = (secret or {}).get("data", {})
        files_out[key] = base64.b64decode(data[key]) if key in data else None
    return configs, files_out, sorted(envs)


def run_check(binary, configs, secret_files, envs):
    """`binary check` on every config, in a directory standing for /etc/switchyard.
    Returns (passed, errors)."""
    errors = []
    passed = 0
    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        os.makedirs(os.path.join(tmp, "secrets"))
        placeholders = []
        for key, content in secret_files.items():
            if content is None:
                content = f"placeholder-for-{key}".encode()
                placeholders.append(key)
            with open(os.path.join(tmp, "secrets", key), "wb") as f:
                f.write(content)
        env = dict(os.environ)
        for name in envs:
            env[name] = f"placeholder-for-{name}"
        for key, text in configs:
            path = os.path.join(tmp, key)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace(CONFIG_DIR, tmp + "/"))
            os.chmod(path, 0o600)
            proc = subprocess.run(
                [binary, "--config", path, "check"], cwd=tmp, env=env, capture_output=True, text=True, timeout=60
            )
            if proc.returncode != 0:
                errors.append(f"{key}: `switchyard check` failed: {(proc.stderr + proc.stdout).strip()}")
            else:
                passed += 1
    note = f" (placeholders for {', '.join(placeholders)}: from an existing Secret)" if placeholders else ""
    return passed, errors, note


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", help="helm template's output")
    ap.add_argument("--kube-version", action="append", required=True, help="e.g. 1.30.0; repeatable")
    ap.add_argument("--expect", choices=["Deployment", "StatefulSet"], required=True, help="the workload kind")
    ap.add_argument("--switchyard", metavar="BIN", help="run `BIN check` on the ConfigMap's configs")
    ap.add_argument("--same-as", metavar="FILE", help="another rendering that must hold the same resources")
    args = ap.parse_args()

    label = os.path.basename(args.manifest)
    docs = load(args.manifest)
    failed = False

    def report(what, errors, extra=""):
        nonlocal failed
        if errors:
            failed = True
            print(f"FAIL: {label}: {what}")
            for e in errors:
                print(f"    {e}")
        else:
            print(f"PASS: {label}: {what}{extra}")

    errors = []
    check_schemas(docs, args.kube_version, errors)
    kinds = ", ".join(sorted({d["kind"] for d in docs}))
    report(
        f"{len(docs)} resources ({kinds}) valid against the Kubernetes {', '.join(args.kube_version)} schemas (strict)",
        errors,
    )

    errors = []
    configs, secret_files, envs = check_chart(docs, args.expect, errors)
    report(f"{args.expect}, probes, drain, security context, mounts and selectors as the chart promises", errors)

    if args.same_as:
        other = load(args.same_as)
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        diff = []
        a = {key(d): d for d in docs}
        b = {key(d): d for d in other}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diff.append(f"{k[0]}/{k[1]} differs")
        report(f"the same resources as {os.path.basename(args.same_as)}", diff)

    if args.switchyard:
        passed, errors, note = run_check(args.switchyard, configs, secret_files, envs)
        report(f"{passed}/{len(configs)} config files of the ConfigMap pass `switchyard check`", errors, note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
