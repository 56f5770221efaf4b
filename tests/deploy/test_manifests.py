"""deploy/: every manifest parses, names only real config keys, ports and metrics, and the
sample config is `streamtrain config show --commented`."""

import json
import os
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service import ops
from service.cli import build_parser, main
from service.config import ENV_PREFIX, SECTIONS, Config, load_config, overrides_from_args
from service.monitor import TrainingMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SKIP_DIRS = {DEPLOY / "kafka" / "lib", DEPLOY / "kafka" / "target"}  # fetched jars
SAMPLE = DEPLOY / "streamtrain.toml"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
CLUSTER = DEPLOY / "ray" / "cluster.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
IN_CONTAINER_CONFIG = "/etc/streamtrain/streamtrain.toml"
METRIC_RE = re.compile(r"\b(streamtrain_[a-z_]+)\b")
ENV_RE = re.compile(rf"\b({ENV_PREFIX}[A-Z0-9_]+)=(\S+)")
COMMAND_RE = re.compile(r"\bstreamtrain ((?:serve|produce|demo|config|checkpoint)\b[^&|;>\n]*)")
SUBCOMMANDS = ("serve", "produce", "demo", "config", "checkpoint", "train", "plot")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def deploy_files() -> list[Path]:
    return sorted(
        p for p in DEPLOY.rglob("*") if p.is_file() and not any(d in p.parents for d in SKIP_DIRS)
    )


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def real_keys() -> set[tuple[str, str]]:
    return {(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)}


def env_key(name: str) -> tuple[str, str]:
    """`STREAMTRAIN_KAFKA__BOOTSTRAP_SERVERS` -> ("kafka", "bootstrap_servers")."""
    section, sep, key = name[len(ENV_PREFIX) :].partition("__")
    assert sep, f"{name} is not STREAMTRAIN_<SECTION>__<KEY>"
    return section.lower(), key.lower()


def default_ports() -> dict[str, int]:
    cfg = Config()
    return {"metrics": cfg.metrics.port, "api": cfg.api.port}


# ---------------------------------------------------------------- what the manifests hold


def configmap_toml() -> str:
    (cm,) = [d for d in yaml_docs(RAYCLUSTER) if d["kind"] == "ConfigMap"]
    return cm["data"]["streamtrain.toml"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def streamtrain_services() -> dict[str, dict]:
    """Compose services that run the streamtrain image (its entrypoint is `streamtrain`)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def compose_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def kube_containers() -> list[dict]:
    (rc,) = [d for d in yaml_docs(RAYCLUSTER) if d["kind"] == "RayCluster"]
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"]]


def kube_env() -> dict[str, str]:
    return {
        e["name"]: e.get("value", "from-a-secret")
        for c in kube_containers()
        for e in c.get("env", [])
    }


def cluster_commands() -> list[str]:
    cluster = yaml.safe_load(CLUSTER.read_text())
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands")
    return [cmd for key in keys for cmd in cluster.get(key) or []]


def shell_commands(text: str) -> list[list[str]]:
    """The argv (after `streamtrain`) of every streamtrain command in shell text."""
    text = re.sub(r"(?m)(^|\s)#.*$", "", text)  # shell comments
    return [shlex.split(m) for m in COMMAND_RE.findall(text)]


def manifest_commands() -> list[tuple[str, list[str], dict[str, str], str]]:
    """Every streamtrain command the manifests run: (where, argv, its environment, the text
    of the config file it reads)."""
    sample = SAMPLE.read_text()
    out = []
    for name, svc in streamtrain_services().items():
        out.append((f"compose {name}", list(svc["command"]), compose_env(svc), sample))
    cmd = [json.loads(rest) for word, rest in dockerfile_instructions() if word == "CMD"]
    out.append(("Dockerfile CMD", cmd[-1], dockerfile_env(), sample))
    for text in cluster_commands():
        env = dict(ENV_RE.findall(text))
        for argv in shell_commands(text):
            out.append(("ray/cluster.yaml", argv, env, sample))
    (job,) = yaml_docs(RAYJOB)
    for argv in shell_commands(job["spec"]["entrypoint"]):
        out.append(("kuberay/rayjob.yaml", argv, kube_env(), configmap_toml()))
    return out


# ---------------------------------------------------------------- parsing


def test_every_yaml_and_json_file_under_deploy_parses():
    parsed = []
    for path in deploy_files():
        if path.suffix in (".yml", ".yaml"):
            assert yaml_docs(path), path
            parsed.append(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
            parsed.append(path)
    names = {p.relative_to(DEPLOY).as_posix() for p in parsed}
    assert {
        "compose.yaml",
        "ray/cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "prometheus/prometheus.yml",
        "grafana/streamtrain.json",
    } <= names


def test_the_sample_toml_is_config_show_commented(capsys):
    assert main(["config", "show", "--commented"]) == 0
    shown = capsys.readouterr().out
    assert SAMPLE.read_text() == shown, (
        "deploy/streamtrain.toml is stale: regenerate it with "
        "`env -i PATH=$PATH .venv/bin/streamtrain config show --commented "
        "> deploy/streamtrain.toml`"
    )
    assert shown == ops.sample_toml()


def test_the_sample_toml_lists_every_config_key_at_its_default(tmp_path):
    data = tomllib.loads(SAMPLE.read_text())
    assert {(s, k) for s, table in data.items() for k in table} == real_keys()
    assert load_config(SAMPLE, env={}) == Config()


# ---------------------------------------------------------------- config keys


def test_every_environment_variable_is_a_config_key_with_a_valid_value():
    sources = {
        "Dockerfile": dockerfile_env(),
        "kuberay": kube_env(),
        **{f"compose {n}": compose_env(s) for n, s in streamtrain_services().items()},
    }
    for text in cluster_commands():
        sources.setdefault("ray/cluster.yaml", {}).update(ENV_RE.findall(text))
    keys = real_keys()
    seen = set()
    for where, env in sources.items():
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for name in ours:
            assert env_key(name) in keys, f"{where}: {name} is not a config key"
            seen.add(name)
        load_config(env=ours)  # types and ranges, as the service would read them
    assert "STREAMTRAIN_KAFKA__BOOTSTRAP_SERVERS" in seen
    assert "STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD" in seen  # from a Secret on KubeRay


def test_every_streamtrain_command_parses_and_its_config_resolves(tmp_path):
    commands = manifest_commands()
    wheres = {where for where, *_ in commands}
    assert {
        "compose streamtrain",
        "compose producer",
        "Dockerfile CMD",
        "ray/cluster.yaml",
        "kuberay/rayjob.yaml",
    } <= wheres
    parser = build_parser()
    for i, (where, argv, env, config_text) in enumerate(commands):
        assert argv and argv[0] in SUBCOMMANDS, f"{where}: {argv}"
        try:
            ns = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `streamtrain {shlex.join(argv)}` does not parse")
        path = None
        if getattr(ns, "config", None) is not None:
            assert ns.config == IN_CONTAINER_CONFIG, where
            path = tmp_path / f"{i}.toml"
            path.write_text(config_text)
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        load_config(path, env=ours, overrides=overrides_from_args(ns))


def test_serve_runs_against_the_cluster_where_the_issue_says():
    serve = [(w, a) for w, a, *_ in manifest_commands() if a[0] == "serve"]
    for where in ("ray/cluster.yaml", "kuberay/rayjob.yaml"):
        (argv,) = [a for w, a in serve if w == where]
        ns = build_parser().parse_args(argv)
        assert overrides_from_args(ns)["trainer.ray_address"] == "auto", where
        assert ns.config == IN_CONTAINER_CONFIG, where
    for where in ("compose streamtrain", "Dockerfile CMD"):
        (argv,) = [a for w, a in serve if w == where]
        assert build_parser().parse_args(argv).config == IN_CONTAINER_CONFIG


def test_readme_commands_use_real_subcommands_and_flags():
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [argv for block in blocks for argv in shell_commands(block)]
    assert len(commands) >= 6
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"deploy/README.md: `streamtrain {shlex.join(argv)}` does not parse")


def test_the_configmap_config_is_valid_and_matches_the_worker_group():
    data = tomllib.loads(configmap_toml())
    keys = real_keys()
    assert all((s, k) in keys for s, table in data.items() for k in table)
    cfg = load_config(
        env={}, overrides={f"{s}.{k}": v for s, t in data.items() for k, v in t.items()}
    )
    (rc,) = [d for d in yaml_docs(RAYCLUSTER) if d["kind"] == "RayCluster"]
    (group,) = rc["spec"]["workerGroupSpecs"]
    # One single-CPU gradient worker per single-CPU worker pod.
    assert group["replicas"] == cfg.trainer.workers
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["cpu"] == "1"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cfg.stream.source == "kafka"
    assert cfg.metrics.host == "0.0.0.0" and cfg.api.host == "0.0.0.0"


# ---------------------------------------------------------------- ports


def test_ports_exposed_are_the_config_defaults():
    ports = default_ports()
    assert ports == {"metrics": 9464, "api": 8000}
    # Dockerfile
    exposed = {
        int(p) for w, rest in dockerfile_instructions() if w == "EXPOSE" for p in rest.split()
    }
    assert exposed == set(ports.values())
    (health,) = [rest for w, rest in dockerfile_instructions() if w == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{ports['api']}/healthz" in health
    # compose: published by the pod whose network streamtrain shares, and set in its env
    services = compose()["services"]
    published = {int(p.split(":")[1]) for p in services["pod"]["ports"]}
    assert set(ports.values()) <= published
    env = compose_env(services["streamtrain"])
    assert int(env["STREAMTRAIN_METRICS__PORT"]) == ports["metrics"]
    assert int(env["STREAMTRAIN_API__PORT"]) == ports["api"]
    # KubeRay: the head container and the Service
    head = kube_containers()[0]
    named = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert named["st-metrics"] == ports["metrics"] and named["st-api"] == ports["api"]
    (svc,) = [d for d in yaml_docs(RAYCLUSTER) if d["kind"] == "Service"]
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["metrics"]["port"] == ports["metrics"]
    assert by_name["api"]["port"] == ports["api"]
    assert {by_name["metrics"]["targetPort"], by_name["api"]["targetPort"]} <= set(named)
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    cm = tomllib.loads(configmap_toml())
    assert cm["metrics"]["port"] == ports["metrics"] and cm["api"]["port"] == ports["api"]
    # Prometheus scrapes the metrics port
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target.endswith(f":{ports['metrics']}")


# ---------------------------------------------------------------- metric names


def exported_names() -> set[str]:
    """Every series name a fresh TrainingMetrics exports (as the Grafana test derives them)."""
    metrics = TrainingMetrics(CollectorRegistry())
    suffixes = {
        "gauge": ("",),
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count"),  # the served scores': no quantiles, no _created
    }
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def test_every_metric_name_under_deploy_is_exported():
    names = exported_names()
    found: dict[str, set[str]] = {}
    for path in deploy_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for name in METRIC_RE.findall(text):
            found.setdefault(name, set()).add(path.relative_to(DEPLOY).as_posix())
    unknown = {n: sorted(w) for n, w in found.items() if n not in names}
    assert unknown == {}
    assert len(found) >= 20  # the rules and the dashboard were read
    assert "streamtrain_nope_total" not in names and "streamtrain_cost_ema_total" not in names


# ---------------------------------------------------------------- each deployment path


def test_the_ray_cluster_config_validates_as_ray_up_checks_it():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(cluster))
    types = cluster["available_node_types"]
    assert set(types) == {cluster["head_node_type"], "worker"}
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert types["worker"]["resources"]["CPU"] >= 1
    assert cluster["file_mounts"]["~/streamtrain"] == "."
    assert any("pip install" in c and "~/streamtrain" in c for c in cluster["setup_commands"])
    start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start
    # The check is not vacuous: a head type that is not defined is refused.
    broken = yaml.safe_load(CLUSTER.read_text())
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_the_ray_cluster_carries_token_authentication_to_every_node_and_the_driver():
    cluster = yaml.safe_load(CLUSTER.read_text())
    # The token file reaches every node where Ray looks for it by default...
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [
        cmd
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for cmd in cluster[key]
        if "ray start" in cmd
    ]
    assert len(starts) == 2
    # ...and each node is started in token mode: `ray start --address` does not turn it on
    # from the file (Ray 2.60), so a worker node without it is refused by the head.
    for cmd in starts + [c for c in cluster_commands() if "streamtrain serve" in c]:
        assert re.search(r"\bRAY_AUTH_MODE=token\b[^;&|]*(ray start|streamtrain serve)", cmd), cmd


def test_kuberay_turns_token_authentication_on():
    (rc,) = [d for d in yaml_docs(RAYCLUSTER) if d["kind"] == "RayCluster"]
    # The operator's Secret and RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container.
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    major, minor, *_ = (int(x) for x in rc["spec"]["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # the first Ray with token authentication
    for container in kube_containers():
        # Set by the operator from its Secret; a value here would override it.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {
            e["name"] for e in container.get("env", [])
        }


def test_kuberay_manifests_fit_together():
    docs = yaml_docs(RAYCLUSTER)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", "RayCluster", "Service"}
    rc = kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    (job,) = yaml_docs(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    svc = kinds["Service"]
    assert svc["spec"]["selector"] == {
        "ray.io/cluster": rc["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
        claim = volumes["checkpoints"]["persistentVolumeClaim"]["claimName"]
        assert claim == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    head = pods[0]
    assert head["volumes"][0]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    (config_mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "config"]
    assert f"{config_mount['mountPath']}/streamtrain.toml" == IN_CONTAINER_CONFIG
    ckpt_dir = tomllib.loads(configmap_toml())["checkpoint"]["dir"]
    for pod in pods:
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "checkpoints"]
        assert ckpt_dir.startswith(mount["mountPath"] + "/")
    for container in kube_containers():
        # KubeRay gives the port name `metrics` to Ray's own metrics export.
        assert "metrics" not in {p["name"] for p in container.get("ports", [])}


def test_compose_runs_the_stack_with_the_projects_files():
    doc = compose()
    services = doc["services"]
    assert {"kafka", "streamtrain", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    st = services["streamtrain"]
    assert st["command"][0] == "serve"
    assert (DEPLOY / st["build"]["context"] / st["build"]["dockerfile"]).resolve() == DOCKERFILE
    # Shared network namespace: the files' 127.0.0.1 addresses reach streamtrain and Prometheus.
    for name in ("streamtrain", "prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:pod", name
    mounts = {
        name: {
            v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve()
            for v in svc.get("volumes", [])
            if v.startswith(".")
        }
        for name, svc in services.items()
    }
    for name, by_target in mounts.items():
        for target, source in by_target.items():
            assert source.exists(), f"{name}: {source} mounted at {target} does not exist"
    prom = mounts["prometheus"]
    assert prom["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert prom["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamtrain.yml").read_text()
    )["providers"][0]
    grafana = mounts["grafana"]
    assert grafana["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    assert (grafana[provider["options"]["path"]] / "streamtrain.json").is_file()
    assert mounts["streamtrain"][IN_CONTAINER_CONFIG] == SAMPLE
    for name, svc in services.items():
        depends = svc.get("depends_on", [])
        assert set(depends) <= set(services), name
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, name


def test_the_dockerfile_builds_a_non_root_image_of_the_project():
    instructions = dockerfile_instructions()
    froms = [rest.split()[0] for w, rest in instructions if w == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert any(w == "RUN" and "pip install" in rest for w, rest in instructions)
    (user,) = [rest for w, rest in instructions if w == "USER"]
    assert user not in ("root", "0")
    for w, rest in instructions:
        if w == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    (entry,) = [json.loads(rest) for w, rest in instructions if w == "ENTRYPOINT"]
    assert entry == ["streamtrain"]


def test_the_shipped_clicks_schema_is_the_bundled_one():
    """The README's quickstart serves the clicks events with deploy/schemas/clicks.toml."""
    from workers.ingest.datasets import CLICKS_SCHEMA
    from workers.ingest.schema import load_schema, schema_from_dict

    assert load_schema(ROOT / "deploy/schemas/clicks.toml") == schema_from_dict(CLICKS_SCHEMA)
