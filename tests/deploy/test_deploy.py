"""The deploy files, checked without a container engine or a cluster:
hadolint on every Dockerfile, the compose file against the Compose
specification schema (docker/schema/), every Kubernetes manifest against the
API schemas of KUBERNETES_VERSION, every flag and RANKD_* variable they use
against `rankd serve --help`, the files rankd is given (tokens, TLS) against
what is mounted where, the probes against TLS and tokens, the socket's
permissions against the containers that share it, rankd itself run with
the manifests' options (their paths moved into a temporary folder), and the
configuration reference in docs/configuration.md against `rankd config-reference`
and the config file parser."""

import copy

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("RANKD_BIN", ROOT / "target" / "release" / "rankd"))
KUBERNETES_VERSION = "1.33.0"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
COMPOSE = ROOT / "docker" / "compose.yaml"
MANIFESTS = sorted((ROOT / "docker" / "k8s").glob("*.yaml"))
# Read by rankd but not a `serve` option: the log filter (tracing's EnvFilter
# syntax, src/main.rs), and RANKD_BIN/RANKD_TOOLS of the test suite itself.
NOT_FLAGS = {"RANKD_LOG"}


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: scripts/test.sh installs it"
    return path


def test_the_files_exist():
    assert len(DOCKERFILES) == 2 and COMPOSE.exists() and len(MANIFESTS) >= 5


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    r = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    r = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout + r.stderr


def test_compose_matches_the_compose_specification():
    schema = json.loads((ROOT / "docker" / "schema" / "compose-spec.json").read_text())
    doc = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's own $schema
    validator.validate(doc)
    # The validator does reject what the specification does not allow.
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**doc, "servicez": {}})


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests(manifest):
    r = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INFO" in r.stdout or "valid" in r.stdout, r.stdout


def test_kubernetes_validate_rejects_a_bad_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two}\n")
    r = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0, r.stdout


def serve_help():
    out = subprocess.run([str(BIN), "serve", "--help"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out)), set(re.findall(r"RANKD_[A-Z0-9_]+", out))


def pod_spec(doc):
    return (doc or {}).get("spec", {}).get("template", {}).get("spec", {})


def rankd_containers(doc):
    """(pod spec, container) for every rankd container of a workload,
    native sidecars (init containers) included."""
    spec = pod_spec(doc)
    return [(spec, c) for c in spec.get("initContainers", []) + spec.get("containers", [])
            if "rankd" in c.get("image", "")]


def workloads():
    """(manifest name, document) for every document with a pod template."""
    return [(m.name, doc) for m in MANIFESTS for doc in yaml.safe_load_all(m.read_text())
            if pod_spec(doc)]


def options(c):
    """The rankd options of container `c`: its args (`--flag value` or
    `--flag=value`), then its RANKD_* variables as the flags they stand for
    (the args win, as in rankd)."""
    opts = {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for m in MANIFESTS for d in yaml.safe_load_all(m.read_text())
            if (d or {}).get("kind") == "ConfigMap"}
    env = [{"name": k, "value": v} for ref in c.get("envFrom") or [] if "configMapRef" in ref
           for k, v in maps.get(ref["configMapRef"]["name"], {}).items()]
    for e in env + (c.get("env") or []):
        if e["name"].startswith("RANKD_") and "value" in e:
            opts["--" + e["name"][len("RANKD_"):].lower().replace("_", "-")] = e["value"]
    args = (c.get("command") or []) + (c.get("args") or [])
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            flag, value = a.split("=", 1)
            opts[flag] = value
        elif a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            opts[a] = args[i + 1]
            i += 1
        elif a.startswith("--"):
            opts[a] = None
        i += 1
    return opts


def secrets_by_name():
    """Every Secret of the manifests, by name."""
    return {d["metadata"]["name"]: d for m in MANIFESTS for d in yaml.safe_load_all(m.read_text())
            if (d or {}).get("kind") == "Secret"}


FILE_FLAGS = ("--client-token-file", "--admin-token-file", "--tls-cert", "--tls-key")


def file_problems(doc, secrets):
    """What is wrong with the files a workload's rankd containers are given:
    each path of FILE_FLAGS must be a key of a Secret (of the manifests)
    mounted, without subPath, at the path's folder in that container; a TLS
    pair must come from a kubernetes.io/tls Secret; no token may come from a
    variable."""
    problems = []
    spec = pod_spec(doc)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for _, c in rankd_containers(doc):
        opts = options(c)
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
        for e in c.get("env") or []:
            if "secretKeyRef" in (e.get("valueFrom") or {}):
                problems.append(f"{c['name']}: {e['name']} takes a secret as a variable")
        for flag in FILE_FLAGS:
            path = opts.get(flag)
            if path is None:
                continue
            folder, _, name = path.rpartition("/")
            mount = mounts.get(folder)
            if mount is None:
                problems.append(f"{c['name']}: {flag} {path}: nothing is mounted at {folder}")
                continue
            if "subPath" in mount or "subPathExpr" in mount:
                problems.append(f"{c['name']}: {flag} {path}: a subPath mount is never updated")
            source = volumes.get(mount["name"], {}).get("secret")
            if source is None:
                problems.append(f"{c['name']}: {flag} {path}: {folder} is not a Secret volume")
                continue
            secret = secrets.get(source.get("secretName"))
            if secret is None:
                problems.append(f"{c['name']}: {flag} {path}: no Secret {source.get('secretName')}")
                continue
            files = {i["path"]: i["key"] for i in source.get("items", [])} or {
                k: k for k in {**secret.get("data", {}), **secret.get("stringData", {})}}
            if name not in files:
                problems.append(f"{c['name']}: {flag} {path}: Secret {secret['metadata']['name']} "
                                f"has no file {name} (it has {sorted(files)})")
            if flag.startswith("--tls-") and secret.get("type") != "kubernetes.io/tls":
                problems.append(f"{c['name']}: {flag} {path}: not a kubernetes.io/tls Secret")
        if ("--tls-cert" in opts) != ("--tls-key" in opts):
            problems.append(f"{c['name']}: --tls-cert and --tls-key go together")
    return problems


OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def probe_problems(doc):
    """What is wrong with the probes of a workload's rankd containers: HTTPS
    when --tls-cert is set, HTTP when not; with a client token file, only
    the routes that need no token; a named port the container has."""
    problems = []
    for _, c in rankd_containers(doc):
        opts = options(c)
        ports = {p.get("name") for p in c.get("ports") or []} | {p["containerPort"] for p in c.get("ports") or []}
        want = "HTTPS" if opts.get("--tls-cert") else "HTTP"
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
        if "readinessProbe" not in probes or "livenessProbe" not in probes:
            problems.append(f"{c['name']}: no readiness or liveness probe")
        for kind, probe in probes.items():
            get = probe.get("httpGet")
            if get is None:
                problems.append(f"{c['name']}: {kind} is not an httpGet probe")
                continue
            if get.get("scheme", "HTTP") != want:
                problems.append(f"{c['name']}: {kind} uses {get.get('scheme', 'HTTP')}, rankd serves {want}")
            if opts.get("--client-token-file") and get.get("path") not in OPEN_PATHS:
                problems.append(f"{c['name']}: {kind} {get.get('path')} needs a token")
            if get.get("port") not in ports:
                problems.append(f"{c['name']}: {kind} port {get.get('port')} is not a port of the container")
    return problems


def socket_problems(doc):
    """What is wrong with a socket shared in a pod: every other container
    that mounts the socket's folder must be able to connect, i.e. write to
    the socket file: its owner's bits if it runs as rankd's user, else the
    group bits of --uds-mode with --uds-group (default: the folder's
    group, the pod's fsGroup) among its groups."""
    problems = []
    spec = pod_spec(doc)
    pod_sc = spec.get("securityContext") or {}
    for _, c in rankd_containers(doc):
        opts = options(c)
        uds = opts.get("--uds", "/run/rankd/rankd.sock")  # the image's RANKD_UDS
        if not uds:
            continue
        folder = uds.rpartition("/")[0]
        volume = next((m["name"] for m in c.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == folder),
                      None)
        peers = [o for o in spec.get("initContainers", []) + spec.get("containers", [])
                 if o is not c and any(m["name"] == volume for m in o.get("volumeMounts") or [])]
        if volume is None or not peers:
            continue
        mode = int(opts.get("--uds-mode") or "0660", 8)
        group = opts.get("--uds-group") or pod_sc.get("fsGroup")
        sc = {**pod_sc, **(c.get("securityContext") or {})}
        for o in peers:
            osc = {**pod_sc, **(o.get("securityContext") or {})}
            groups = {osc.get("runAsGroup"), osc.get("fsGroup"), *osc.get("supplementalGroups", [])}
            if osc.get("runAsUser") is not None and osc.get("runAsUser") == sc.get("runAsUser"):
                if mode & 0o600 != 0o600:
                    problems.append(f"{o['name']}: runs as rankd's user, the socket mode {mode:04o} denies it")
            elif group is None or int(group) not in {g for g in groups if g is not None}:
                problems.append(f"{o['name']}: not in the socket's group {group}")
            elif mode & 0o060 != 0o060:
                problems.append(f"{o['name']}: the socket's mode {mode:04o} denies its group")
        if group is not None and pod_sc.get("fsGroup") is None and int(group) != sc.get("runAsGroup"):
            problems.append(f"{c['name']}: --uds-group {group} is neither rankd's group nor the fsGroup")
    return problems


def compose_problems(compose):
    """What is wrong with the files the compose file gives rankd: each path
    of FILE_FLAGS must be /run/secrets/TARGET of a secret the service is
    granted, defined at the top level by a file that exists."""
    problems = []
    defined = compose.get("secrets") or {}
    for name, svc in compose["services"].items():
        if "rankd" not in str(svc.get("image", "")):
            continue
        opts = options({"command": svc.get("command") or []})
        granted = {}
        for g in svc.get("secrets") or []:
            g = {"source": g} if isinstance(g, str) else g
            granted["/run/secrets/" + g.get("target", g["source"])] = g["source"]
        for flag in FILE_FLAGS:
            path = opts.get(flag)
            if path is None:
                continue
            source = granted.get(path)
            if source is None:
                problems.append(f"{name}: {flag} {path}: no secret of the service is mounted there")
            elif "file" not in defined.get(source, {}):
                problems.append(f"{name}: {flag} {path}: secret {source} is not defined by a file")
            elif not (COMPOSE.parent / defined[source]["file"]).is_file():
                problems.append(f"{name}: {flag} {path}: {defined[source]['file']} does not exist")
        for e in svc.get("environment") or {}:
            if "TOKEN" in e and not e.endswith("_FILE"):
                problems.append(f"{name}: {e} passes a token as a variable")
    return problems


def test_compose_gives_rankd_its_token_files_as_secrets():
    compose = yaml.safe_load(COMPOSE.read_text())
    opts = options({"command": compose["services"]["rankd"].get("command") or []})
    assert opts.get("--client-token-file") and opts.get("--admin-token-file"), opts
    assert compose_problems(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["rankd"]["secrets"] = broken["services"]["rankd"]["secrets"][1:]
    assert any("no secret of the service is mounted there" in p for p in compose_problems(broken))
    broken = copy.deepcopy(compose)
    for secret in broken["secrets"].values():
        secret["file"] = "./secrets/missing.tokens"
    assert any("does not exist" in p for p in compose_problems(broken))


def test_the_files_rankd_is_given_are_mounted_secrets():
    secrets = secrets_by_name()
    given = [(name, flag) for name, doc in workloads() for _, c in rankd_containers(doc)
             for flag in FILE_FLAGS if options(c).get(flag)]
    # The layouts use what they are meant to: tokens everywhere, TLS on the
    # standalone HTTP service.
    for manifest in ("sidecar.yaml", "sidecar-gpu.yaml", "standalone.yaml"):
        assert (manifest, "--client-token-file") in given and (manifest, "--admin-token-file") in given, manifest
    assert ("standalone.yaml", "--tls-cert") in given and ("standalone.yaml", "--tls-key") in given
    problems = [(name, p) for name, doc in workloads() for p in file_problems(doc, secrets)]
    assert problems == []


def test_a_file_that_is_not_mounted_is_found():
    secrets = secrets_by_name()
    doc = next(d for n, d in workloads() if n == "standalone.yaml")
    broken = copy.deepcopy(doc)
    c = rankd_containers(broken)[0][1]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/etc/rankd/tls"]
    assert any("nothing is mounted at /etc/rankd/tls" in p for p in file_problems(broken, secrets))
    broken = copy.deepcopy(doc)
    c = rankd_containers(broken)[0][1]
    c["args"] = [a.replace("client.tokens", "clients.tokens") for a in c["args"]]
    assert any("has no file clients.tokens" in p for p in file_problems(broken, secrets))
    broken = copy.deepcopy(doc)
    c = rankd_containers(broken)[0][1]
    c.setdefault("env", []).append({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "rankd-tokens",
                                                                                    "key": "client.tokens"}}})
    assert any("as a variable" in p for p in file_problems(broken, secrets))
    tls = {**secrets, "rankd-tls": {**secrets["rankd-tls"], "type": "Opaque"}}
    assert any("not a kubernetes.io/tls Secret" in p for p in file_problems(doc, tls))


def test_probes_use_https_when_tls_is_on():
    checked = [name for name, doc in workloads() if rankd_containers(doc)]
    assert {"sidecar.yaml", "sidecar-gpu.yaml", "standalone.yaml"} <= set(checked)
    problems = [(name, p) for name, doc in workloads() for p in probe_problems(doc)]
    assert problems == []


def test_a_plain_http_probe_on_the_tls_port_is_found():
    doc = next(d for n, d in workloads() if n == "standalone.yaml")
    broken = copy.deepcopy(doc)
    del rankd_containers(broken)[0][1]["readinessProbe"]["httpGet"]["scheme"]
    assert any("readinessProbe uses HTTP, rankd serves HTTPS" in p for p in probe_problems(broken))
    broken = copy.deepcopy(doc)
    rankd_containers(broken)[0][1]["livenessProbe"]["httpGet"]["path"] = "/v1/models"
    assert any("/v1/models needs a token" in p for p in probe_problems(broken))
    sidecar = next(d for n, d in workloads() if n == "sidecar.yaml")
    broken = copy.deepcopy(sidecar)
    rankd_containers(broken)[0][1]["startupProbe"]["httpGet"]["scheme"] = "HTTPS"
    assert any("startupProbe uses HTTPS, rankd serves HTTP" in p for p in probe_problems(broken))


def test_the_app_beside_rankd_may_connect_to_the_socket():
    shared = {name for name, doc in workloads() if rankd_containers(doc)
              and len(pod_spec(doc).get("initContainers", []) + pod_spec(doc).get("containers", [])) > 1}
    assert shared == {"sidecar.yaml", "sidecar-gpu.yaml"}, shared
    problems = [(name, p) for name, doc in workloads() for p in socket_problems(doc)]
    assert problems == []


def test_a_socket_the_app_cannot_open_is_found():
    doc = next(d for n, d in workloads() if n == "sidecar.yaml")
    broken = copy.deepcopy(doc)
    c = rankd_containers(broken)[0][1]
    c["args"][c["args"].index("--uds-mode") + 1] = "0600"
    assert any("denies its group" in p for p in socket_problems(broken))
    broken = copy.deepcopy(doc)
    del broken["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    c = rankd_containers(broken)[0][1]
    i = c["args"].index("--uds-group")
    del c["args"][i:i + 2]
    assert any("app: not in the socket's group None" in p for p in socket_problems(broken))


def run_manifest_options(manifest, tmp_path, replace=None):
    """rankd started with the options of `manifest`'s rankd container, as
    the image's entrypoint gets them (the demo models, HTTP on a free port
    instead of 8080), with /etc/rankd/ and /run/rankd/ moved into tmp_path:
    the Secrets' files (secret.yaml) written there, a self-signed
    certificate for rankd-tls; `replace` gives some flags other values. The
    ConfigMap is left out (its Kafka brokers are not here). Returns the
    process, its ready line and the Secrets' tokens by file."""
    doc = next(d for n, d in workloads() if n == manifest)
    c = rankd_containers(doc)[0][1]
    moved = {"/etc/rankd/": f"{tmp_path}/etc/", "/run/rankd/": f"{tmp_path}/run/"}

    def move(a):
        for old, new in moved.items():
            a = a.replace(old, new)
        return a

    secrets = secrets_by_name()
    for m in c.get("volumeMounts") or []:
        volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == m["name"])
        folder = Path(move(m["mountPath"].rstrip("/") + "/"))
        folder.mkdir(parents=True, exist_ok=True)
        if "secret" in volume and volume["secret"]["secretName"] == "rankd-tls":
            openssl = shutil.which("openssl")
            if openssl is None:
                pytest.skip("openssl is not on PATH: no certificate for the TLS check")
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=localhost", "-keyout", str(folder / "tls.key"),
                            "-out", str(folder / "tls.crt")], check=True, capture_output=True)
        elif "secret" in volume:
            for key, value in secrets[volume["secret"]["secretName"]].get("stringData", {}).items():
                (folder / key).write_text(value)
    models = tmp_path / "models"
    subprocess.run([str(BIN), "models", "generate", "--models", str(models)], check=True,
                   stdout=subprocess.DEVNULL)
    args = [move(a) for a in c.get("args") or []]
    for flag, value in (replace or {}).items():
        args[args.index(flag) + 1] = value
    log = open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen([str(BIN), "serve", "--models", str(models), "--http", "127.0.0.1:0",
                             "--snapshot-dir", str(tmp_path / "state"), *args],
                            stdout=subprocess.PIPE, stderr=log,
                            env={k: v for k, v in os.environ.items() if not k.startswith("RANKD_")})
    line = proc.stdout.readline().decode()
    if not line.startswith("ready: "):
        proc.kill()
        proc.wait()
        pytest.fail(f"no ready line: {line!r}\n{(tmp_path / 'stderr.log').read_text()}")
    return proc, line.strip(), {k: v.splitlines()[-1] for s in secrets.values()
                                for k, v in s.get("stringData", {}).items() if k.endswith(".tokens")}


def http_status(url, token=None, context=None):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_rankd_runs_with_the_standalone_options(tmp_path):
    import ssl
    proc, ready, tokens = run_manifest_options("standalone.yaml", tmp_path)
    try:
        https = next(p for p in ready.split("; ") if p.startswith("https://"))
        assert not any(p.startswith(("http://", "unix:")) for p in ready.split("; ")), ready
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        # What the probes and Prometheus ask, without a token.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http_status(https + path, context=unverified) == 200, path
        assert http_status(https + "/v1/models", context=unverified) == 401
        assert http_status(https + "/v1/models", tokens["client.tokens"], unverified) == 200
        assert http_status(https + "/v1/admin/config", tokens["client.tokens"], unverified) == 401
        assert http_status(https + "/v1/admin/config", tokens["admin.tokens"], unverified) == 200
        # Plain HTTP on the TLS port gets no answer.
        with pytest.raises(Exception):
            http_status(https.replace("https://", "http://") + "/healthz")
    finally:
        stop(proc)


def test_rankd_runs_with_the_sidecar_options(tmp_path):
    import stat
    import rankd
    # The group the socket gets is the test's own: a process may only give
    # its files a group it is in.
    doc = next(d for n, d in workloads() if n == "sidecar.yaml")
    args = rankd_containers(doc)[0][1]["args"]
    group = args[args.index("--uds-group") + 1]
    assert group == str(pod_spec(doc)["securityContext"]["fsGroup"])
    proc, ready, tokens = run_manifest_options("sidecar.yaml", tmp_path, {"--uds-group": str(os.getgid())})
    try:
        sock = tmp_path / "run" / "rankd.sock"
        assert f"unix:{sock}" in ready.split("; "), ready
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid(), oct(st.st_mode)
        # The app's way in: the socket, no token.
        with rankd.Client(f"unix://{sock}") as client:
            assert client.models()
        http = next(p for p in ready.split("; ") if p.startswith("http://"))
        assert http_status(http + "/readyz") == 200 and http_status(http + "/healthz") == 200
        assert http_status(http + "/v1/models") == 401
        assert http_status(http + "/v1/models", tokens["client.tokens"]) == 200
        assert http_status(http + "/v1/admin/config", tokens["admin.tokens"]) == 200
    finally:
        stop(proc)


def used_flags_and_vars():
    """(file, flag) for every flag given to rankd, (file, var) for every
    RANKD_* name anywhere in the deploy files."""
    flags, names = [], []
    for f in DOCKERFILES:
        for line in f.read_text().splitlines():
            if line.startswith(("ENTRYPOINT", "CMD")):
                flags += [(f.name, a) for a in re.findall(r'"(--[a-z][a-z0-9-]*)', line)]
    compose = yaml.safe_load(COMPOSE.read_text())
    for svc in compose["services"].values():
        if "rankd" in str(svc.get("image", "")):
            for key in ("command", "entrypoint"):
                flags += [(COMPOSE.name, a) for a in svc.get(key) or [] if a.startswith("--")]
    for m in MANIFESTS:
        for doc in yaml.safe_load_all(m.read_text()):
            for _, c in rankd_containers(doc):
                for a in (c.get("args") or []) + (c.get("command") or []):
                    if a.startswith("--"):
                        flags.append((m.name, a.split("=")[0]))
    for f in DOCKERFILES + [COMPOSE] + MANIFESTS:
        names += [(f.name, v) for v in re.findall(r"RANKD_[A-Z0-9_]+", f.read_text())]
    return flags, names


def unknown_options(flags, names, known_flags, known_vars):
    bad = [(f, a) for f, a in flags if a not in known_flags]
    bad += [(f, v) for f, v in names if v not in known_vars | NOT_FLAGS]
    return bad


def test_every_flag_and_variable_exists_in_rankd_serve():
    known_flags, known_vars = serve_help()
    assert "--uds" in known_flags and "RANKD_UDS" in known_vars, "the help moved"
    flags, names = used_flags_and_vars()
    assert flags and names, "nothing found to check"
    # The flags of native sidecars (init containers) and of compose count.
    assert ("sidecar.yaml", "--client-token-file") in flags and ("compose.yaml", "--admin-token-file") in flags
    bad = unknown_options(flags, names, known_flags, known_vars)
    assert bad == [], f"not options of `rankd serve`: {bad}"
    made_up = unknown_options([("x.yaml", "--tls-certificate")], [("x.yaml", "RANKD_TLS_CERTIFICATE")],
                              known_flags, known_vars)
    assert made_up == [("x.yaml", "--tls-certificate"), ("x.yaml", "RANKD_TLS_CERTIFICATE")]


BEGIN = "<!-- config-reference:begin (scripts/config-reference.sh rewrites this block) -->"
END = "<!-- config-reference:end -->"
CONFIGURATION = ROOT / "docs" / "configuration.md"


def test_the_documented_configuration_reference_is_the_cli_s():
    text = CONFIGURATION.read_text()
    assert BEGIN in text and END in text, "docs/configuration.md has no configuration reference block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    want = subprocess.run([str(BIN), "config-reference"], check=True, capture_output=True,
                          text=True).stdout.strip("\n")
    assert block == want, "docs/configuration.md and `rankd config-reference` differ: run scripts/config-reference.sh"
    for flag in ("--uds", "--http", "--models", "--kafka-brokers"):
        assert f"`{flag} " in want, flag


def reference_rows():
    """The configuration reference (docs/configuration.md), a list of cells
    per row (the header and the rule left out), split at unescaped `|` as GFM
    does."""
    text = CONFIGURATION.read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n").splitlines()
    assert block[0] == "| flag | env | file key | default | meaning |", block[0]
    assert block[1] == "|---|---|---|---|---|", block[1]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in block[2:]]


def unescaped_outside_code(cell, chars):
    """The characters of `chars` that a Markdown renderer would read as
    markup in `cell`: outside code spans and not backslash-escaped."""
    found = []
    for i, part in enumerate(cell.split("`")):
        if i % 2 == 0:
            found += [m.group(1) for m in re.finditer(r"(?<!\\)([" + re.escape(chars) + r"])", part)]
    return found


def test_the_configuration_reference_renders_as_a_table():
    rows = reference_rows()
    known_flags, known_vars = serve_help()
    assert all(len(r) == 5 for r in rows), [r for r in rows if len(r) != 5]
    assert [r for r in rows if unescaped_outside_code(" ".join(r), "<>*")] == []
    # The models help holds angle brackets; escaped, they show as text.
    models = next(r for r in rows if r[0] == "`--models DIR`")
    assert "DIR/\\<name\\>/\\<version\\>/model.toml" in models[4], models
    flags = {r[0].strip("`").split(" ")[0] for r in rows if r[0]}
    assert flags == known_flags - {"--help"}, flags ^ (known_flags - {"--help"})
    env = {r[1].strip("`") for r in rows if r[1]}
    assert env == known_vars - NOT_FLAGS, env ^ (known_vars - NOT_FLAGS)
    for flag, _, key, _, _ in rows:
        name = flag.strip("`").split(" ")[0]
        if name == "--kafka-property":
            assert key == "`[kafka_properties]`"
        elif name in ("--config", "--log-format"):
            assert key == "", (name, key)
        elif name:
            assert key == "`" + name[2:].replace("-", "_") + "`", (name, key)
    file_only = [r[2] for r in rows if not r[0]]
    assert file_only == ["`kafka_event_types`"], file_only
    # A cell that breaks the table is found.
    assert unescaped_outside_code("DIR/<name>/model.toml", "<>") == ["<", ">"]
    assert unescaped_outside_code("`a<b` and \\<c\\>", "<>") == []


def toml_value(default, key):
    """A value for `key` from the reference's default cell: the default
    itself when it is a value (in a code span), else a made-up one."""
    if default.startswith("`"):
        v = default.strip("`").replace("\\|", "|")
        if v.startswith("["):
            return v
        if re.fullmatch(r"0|[1-9][0-9]*", v):
            return v
        return json.dumps(v)
    return json.dumps(f"made-up-{key}")


def run_with_config(tmp_path, text):
    """`rankd serve --config FILE --max-body-bytes 0`: the flag makes the
    checks after the file was read fail, so rankd stops there; what it says
    tells whether the file was read."""
    path = tmp_path / "rankd.toml"
    path.write_text(text)
    r = subprocess.run([str(BIN), "serve", "--config", str(path), "--max-body-bytes", "0"],
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("RANKD_")})
    assert r.returncode != 0, r.stdout + r.stderr
    return r.stderr


def test_the_config_file_takes_every_key_of_the_reference(tmp_path):
    names, keys, tables = set(), [], []
    for _, _, key, default, _ in reference_rows():
        if key == "`[kafka_properties]`":
            names.add("kafka_properties")
            tables.append('[kafka_properties]\n"client.id" = "made-up"\n')
        elif key:
            names.add(key.strip("`"))
            keys.append(f"{key.strip('`')} = {toml_value(default, key.strip('`'))}\n")
    text = "".join(keys) + "".join(tables)
    err = run_with_config(tmp_path, text)
    assert "max_body_bytes must be > 0, got 0" in err, err
    # A key the reference does not list is refused, and the refusal lists
    # every key rankd knows: the reference's, no more, no fewer.
    err = run_with_config(tmp_path, "no_such_key = 1\n" + text)
    assert "unknown field `no_such_key`" in err, err
    known = set(re.findall(r"`([a-z_]+)`", err.split("expected one of", 1)[1]))
    assert known == names, known ^ names


def test_the_documented_config_file_example_is_read(tmp_path):
    text = CONFIGURATION.read_text()
    assert text.startswith("# Configuration\n"), text[:40]
    section = text.split("\n## ", 1)[0]  # the page's opening section, before "## Logs"
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    err = run_with_config(tmp_path, example)
    assert "max_body_bytes must be > 0, got 0" in err, err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
