"""The deploy files, checked without a container engine or a cluster:
hadolint on every Dockerfile, the compose file against the Compose
specification schema (docker/schema/), every Kubernetes manifest against the
API schemas of KUBERNETES_VERSION, every flag and RANKD_* variable they use
against `rankd serve --help`, and the README's configuration reference
against `rankd config-reference`."""

import json
import os
import re
import shutil
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
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                if "rankd" in c.get("image", ""):
                    for a in (c.get("args") or []) + (c.get("command") or []):
                        if a.startswith("--"):
                            flags.append((m.name, a.split("=")[0]))
    for f in DOCKERFILES + [COMPOSE] + MANIFESTS:
        names += [(f.name, v) for v in re.findall(r"RANKD_[A-Z0-9_]+", f.read_text())]
    return flags, names


def test_every_flag_and_variable_exists_in_rankd_serve():
    known_flags, known_vars = serve_help()
    assert "--uds" in known_flags and "RANKD_UDS" in known_vars, "the help moved"
    flags, names = used_flags_and_vars()
    assert flags and names, "nothing found to check"
    bad = [(f, a) for f, a in flags if a not in known_flags]
    bad += [(f, v) for f, v in names if v not in known_vars | NOT_FLAGS]
    assert bad == [], f"not options of `rankd serve`: {bad}"


BEGIN = "<!-- config-reference:begin (scripts/config-reference.sh rewrites this block) -->"
END = "<!-- config-reference:end -->"


def test_the_readme_configuration_reference_is_the_cli_s():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "the README has no configuration reference block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    want = subprocess.run([str(BIN), "config-reference"], check=True, capture_output=True,
                          text=True).stdout.strip("\n")
    assert block == want, "README.md and `rankd config-reference` differ: run scripts/config-reference.sh"
    for flag in ("--uds", "--http", "--models", "--kafka-brokers"):
        assert f"`{flag} " in want, flag


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
