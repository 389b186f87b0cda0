"""Render the kustomizations under deploy/ with kustomize itself and check what it prints. Exit 1 listing
problems.

Rendering is `kubectl kustomize DIR` (or `kustomize build DIR`; the command in $KUSTOMIZE wins): what
`kubectl apply -k DIR` sends, whatever kustomize features an overlay uses (namespace, images, name
prefixes, strategic-merge patches, ...). Without kubectl or kustomize on PATH (nor in the virtual
environment's bin, where `make kubectl` puts one), rendering fails and says how to get one.

Checks, on kustomize's output:
- every YAML file beside a kustomization is listed in it, and every listed file exists;
- every rendered object validates strictly (no unknown fields) against the schemas of each Kubernetes
  version in KUBERNETES_VERSIONS, with the ``kubernetes-validate`` package; custom resources it has no
  schema for (cert-manager Certificates, Prometheus-operator ServiceMonitors and PrometheusRules) get their
  required fields checked instead;
- the governor Deployment has one replica and strategy Recreate, its arguments parse with `governor
  serve`'s own parser and its environment is one `governor serve` reads; the trainer's arguments parse with
  `tolaria-train`'s parser and its environment is one `tolaria-train` reads; an Indexed Job's completions
  match its WORLD_SIZE (or torchrun's --nnodes);
- the trainer Job restarts crashed ranks and stops on the governor's verdicts: restartPolicy Never, a
  backoffLimit above 0, a podFailurePolicy whose rules, tried in order, fail the Job on exactly the
  TERMINAL_EXIT_CODES and ignore no exit code (read by the trainer container itself: not under torchrun,
  which exits 1 whatever its worker's code), and disruptions ignored; its /dev/shm is a memory-backed
  emptyDir with a size limit (the last-known-good snapshot lives there);
- every container runs as non-root with a read-only root filesystem, no privilege escalation, and resource
  requests and limits; every Service selects a pod template and names ports those pods have; every Secret,
  key and claim a pod mounts is rendered; the NetworkPolicy selects the governor, lets the trainers in,
  and lets in labelled controllers from labelled namespaces; the trainer's governor address names a Service and
  its gRPC port.

Run: python deploy/check_manifests.py [KUSTOMIZATION_DIR ...]   (default: every one under deploy/)
     python deploy/check_manifests.py --render DIR             (kustomize's YAML stream on stdout)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

DEPLOY = Path(__file__).resolve().parent
# The oldest Kubernetes the manifests support (podFailurePolicy and the DisruptionTarget condition are on
# by default since 1.26 and GA in 1.31), one in between, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
KUSTOMIZATION = "kustomization.yaml"
GOVERNOR = "tolaria-governor"
TRAINER = "tolaria-trainer"
# Exit codes (tolaria.exit_codes) after which restarting a trainer cannot help: a usage error or a refusal
# by the governor (2), a HALT (3), a failed rollback (5, the governor HALTs the run) and the epoch cap (6).
# Every other failure (1 a crash, 4 governor unreachable under --fail-closed, 128+N killed by signal N:
# 137 OOM-killed, 139 segfault) is retried, up to backoffLimit.
TERMINAL_EXIT_CODES = ("USAGE", "HALTED", "ROLLBACK_FAILED", "EPOCH_CAP")
# Custom resources kubernetes-validate has no schema for: the spec fields each must have.
CUSTOM_RESOURCES = {
    ("cert-manager.io/v1", "Certificate"): ("secretName", "issuerRef"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("selector", "endpoints"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("groups",),
}

Obj = dict[str, Any]


class RenderError(Exception):
    """kustomize is not available, or refused the kustomization (its message is included)."""


def _yaml() -> YAML:
    return YAML(typ="safe", pure=True)


def kustomization_dirs(root: Path = DEPLOY) -> list[Path]:
    """Every directory under ``root`` with a kustomization.yaml whose kind is Kustomization (not Component)."""
    found = []
    for path in sorted(root.rglob(KUSTOMIZATION)):
        if _yaml().load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def kustomize_command() -> list[str]:
    """The command that renders a kustomization directory given as its last argument."""
    if os.environ.get("KUSTOMIZE"):
        return shlex.split(os.environ["KUSTOMIZE"])
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    if kubectl := shutil.which("kubectl", path=search):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize", path=search):
        return [kustomize, "build"]
    raise RenderError(
        "neither kubectl nor kustomize is on PATH: install kubectl (which embeds kustomize), or run "
        "`make kubectl` (a pinned kubectl into .venv/bin), or set KUSTOMIZE='kustomize build'"
    )


def render_text(directory: Path) -> str:
    """kustomize's YAML stream for ``directory``, as `kubectl apply -k` would send it."""
    command = [*kustomize_command(), str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RenderError(f"{shlex.join(command)}: {exc}") from None
    if done.returncode != 0:
        raise RenderError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def render(directory: Path) -> list[Obj]:
    """The objects kustomize renders for ``directory``."""
    return [doc for doc in _yaml().load_all(render_text(directory)) if doc]


# ----------------------------------------------------------------------------------------------- checks


def check_listing(directory: Path) -> list[str]:
    """Files beside a kustomization that it does not list, and listed files that do not exist."""
    spec = _yaml().load((directory / KUSTOMIZATION).read_text())
    listed = {(directory / r).resolve() for r in spec.get("resources") or []}
    problems = [f"{directory}: lists {p.name}, which does not exist" for p in sorted(listed) if not p.exists()]
    for path in sorted(directory.glob("*.yaml")):
        if path.name != KUSTOMIZATION and path.resolve() not in listed:
            problems.append(f"{directory}: {path.name} is not in its resources (kustomize would ignore it)")
    return problems


def _pod_specs(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, pod template) of every Deployment and Job."""
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "Job")]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def check_objects(objects: list[Obj]) -> list[str]:
    """Schema validation and the cross-object checks (see the module's docstring)."""
    import kubernetes_validate

    problems: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            problems.append(f"{_name(obj)} is defined twice")
        seen.add(key)
        required = CUSTOM_RESOURCES.get((obj["apiVersion"], obj["kind"]))
        if required is not None:
            spec = obj.get("spec") or {}
            problems += [f"{_name(obj)}: spec.{field} is required" for field in required if not spec.get(field)]
            if obj["kind"] == "Certificate" and not (spec.get("issuerRef") or {}).get("name"):
                problems.append(f"{_name(obj)}: spec.issuerRef.name is required")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                problems.append(f"{_name(obj)}: Kubernetes {version}: {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{_name(obj)}: Kubernetes {version}: {exc.message}")
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    cert_secrets = {o["spec"]["secretName"] for o in objects if o["kind"] == "Certificate" and "spec" in o}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    pods = _pod_specs(objects)
    for workload, template in pods:
        problems += _check_pod(workload, template, secrets, cert_secrets, claims, services)
    for service in services.values():
        selector = service["spec"].get("selector") or {}
        chosen = [t for _, t in pods if _selects(selector, t["metadata"].get("labels") or {})]
        if not chosen:
            problems.append(f"{_name(service)}: its selector {selector} matches no pod template")
        ports = {p.get("name") for t in chosen for c in t["spec"]["containers"] for p in c.get("ports") or []}
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in ports:
                problems.append(f"{_name(service)}: targetPort {target!r} is no port of the pods it selects")
    problems += _check_governor(objects, pods)
    return problems


def _check_pod(
    workload: Obj, template: Obj, secrets: dict[str, Obj], cert_secrets: set[str], claims: set[str], services: Any
) -> list[str]:
    problems = []
    spec = template["spec"]
    name = _name(workload)
    if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
        problems.append(f"{name}: the pod must set securityContext.runAsNonRoot")
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            secret_name = volume["secret"]["secretName"]
            if secret_name in cert_secrets:
                continue
            if secret_name not in secrets:
                problems.append(f"{name}: volume {volume['name']} mounts Secret {secret_name}, which is not rendered")
                continue
            for item in volume["secret"].get("items") or []:
                if item["key"] not in secrets[secret_name].get("data", {}):
                    problems.append(f"{name}: Secret {secret_name} has no key {item['key']!r}")
        if "persistentVolumeClaim" in volume and volume["persistentVolumeClaim"]["claimName"] not in claims:
            problems.append(f"{name}: volume {volume['name']} claims a PVC that is not rendered")
    volumes = {v["name"] for v in spec.get("volumes") or []}
    for container in spec["containers"]:
        where = f"{name} container {container['name']}"
        context = container.get("securityContext") or {}
        if not context.get("readOnlyRootFilesystem"):
            problems.append(f"{where}: set securityContext.readOnlyRootFilesystem: true")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: set securityContext.allowPrivilegeEscalation: false")
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            if not resources.get(part):
                problems.append(f"{where}: no resources.{part}")
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                problems.append(f"{where}: mounts volume {mount['name']!r}, which the pod does not define")
        for env in container.get("env") or []:
            if env["name"] in ("GOVERNOR_ADDRESS", "TOLARIA_GOVERNOR"):
                host, _, port = env.get("value", "").rpartition(":")
                service = services.get(host.split(".")[0])
                if service is None or int(port or 0) not in {p["port"] for p in service["spec"]["ports"]}:
                    problems.append(f"{where}: {env['name']}={env.get('value')} is not a Service and port here")
    return problems


def _program_args(container: Obj) -> tuple[str, list[str]]:
    """(program, its arguments): `governor serve` (the container named governor) or `tolaria-train` from the
    image's entrypoint, or tolaria_trainer under torchrun. By name, not image: an overlay may rename images."""
    command, args = container.get("command") or [], [str(a) for a in container.get("args") or []]
    if command == ["torchrun"]:
        return "torchrun", args
    return "governor" if container["name"] == "governor" else "tolaria-train", args


def _env_value(container: Obj, name: str) -> str | None:
    return next((str(e.get("value")) for e in container.get("env") or [] if e["name"] == name), None)


def _check_governor(objects: list[Obj], pods: list[tuple[Obj, Obj]]) -> list[str]:
    from governor_daemon.settings import ENV_VARS as GOVERNOR_ENV
    from governor_daemon.settings import add_arguments
    from tolaria_trainer import cli as trainer_cli
    from tolaria_trainer.cli import ENV_VARS as TRAINER_ENV
    from tolaria_trainer.cli import build_parser

    problems = []
    for workload, template in pods:
        name = _name(workload)
        if workload["kind"] == "Deployment" and workload["metadata"]["name"] == GOVERNOR:
            if workload["spec"].get("replicas") != 1:
                problems.append(f"{name}: replicas must be 1 (one writer per journal)")
            if (workload["spec"].get("strategy") or {}).get("type") != "Recreate":
                problems.append(f"{name}: strategy must be Recreate (a rolling update runs two governors at once)")
        indexed = workload["kind"] == "Job" and workload["spec"].get("completionMode") == "Indexed"
        for container in template["spec"]["containers"]:
            program, args = _program_args(container)
            env = {e["name"] for e in container.get("env") or []}
            if program == "governor":
                parser = argparse.ArgumentParser(prog="governor serve", exit_on_error=False)
                add_arguments(parser)
                declared = set(GOVERNOR_ENV)
            else:
                if program == "torchrun":
                    if "-m" not in args or args[args.index("-m") + 1] != "tolaria_trainer":
                        problems.append(f"{name}: torchrun must run -m tolaria_trainer")
                        continue
                    launcher, args = args[: args.index("-m")], args[args.index("-m") + 2 :]
                    nnodes = next((a.split("=", 1)[1] for a in launcher if a.startswith("--nnodes=")), "1")
                    if indexed and str(workload["spec"].get("completions")) != nnodes:
                        problems.append(f"{name}: completions must equal torchrun's --nnodes ({nnodes})")
                elif indexed and (world := _env_value(container, "WORLD_SIZE")) not in (
                    None,
                    str(workload["spec"].get("completions")),
                ):
                    problems.append(f"{name}: completions must equal WORLD_SIZE ({world})")
                parser = build_parser()
                parser.exit_on_error = False
                # Earlier spellings still work (with a deprecation warning): accepted here too.
                declared = {*TRAINER_ENV, *getattr(trainer_cli, "DEPRECATED_ENV_VARS", ())}
            try:
                _, unknown = parser.parse_known_args(args)
            except (argparse.ArgumentError, SystemExit) as exc:
                problems.append(f"{name}: {program} does not accept its arguments: {exc}")
                continue
            if unknown:
                problems.append(f"{name}: {program} does not know {' '.join(unknown)}")
            prefixes = ("GOVERNOR_",) if program == "governor" else ("GOVERNOR_", "TOLARIA_")
            for var in sorted(v for v in env if v.startswith(prefixes) and v not in declared):
                problems.append(f"{name}: sets {var}, which {program} does not read")
        if workload["kind"] == "Job" and workload["metadata"]["name"] == TRAINER:
            problems += _check_trainer_job(workload, template)
    problems += _check_network_policies(objects, pods)
    return problems


def terminal_exit_codes() -> list[int]:
    """TERMINAL_EXIT_CODES as numbers, from tolaria.exit_codes."""
    from tolaria.exit_codes import ExitCode

    return sorted(int(ExitCode[name]) for name in TERMINAL_EXIT_CODES)


def pod_failure_action(job: Obj, exit_codes: dict[str, int], conditions: dict[str, str]) -> str:
    """What the Job controller does with a failed pod (batch/v1 podFailurePolicy): the first rule that
    matches decides; no rule matching counts the failure against backoffLimit. ``exit_codes``: each
    container's exit code as the kubelet reports it (128+N for a signal N); ``conditions``: the pod's
    condition types and their status ("True")."""
    for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
        if "onExitCodes" in rule:
            requirement = rule["onExitCodes"]
            wanted = requirement.get("containerName")
            # Containers that succeeded (exit 0) are left out; a named container restricts the check to it.
            codes = [c for name, c in exit_codes.items() if c != 0 and wanted in (None, name)]
            values = set(requirement.get("values") or [])
            if requirement.get("operator") == "In":
                matched = any(c in values for c in codes)
            else:  # NotIn (the schema allows no other)
                matched = any(c not in values for c in codes)
        else:
            matched = any(
                conditions.get(pattern["type"]) == pattern.get("status", "True")
                for pattern in rule.get("onPodConditions") or []
            )
        if matched:
            return str(rule["action"])
    return "Count"


def _check_trainer_job(job: Obj, template: Obj) -> list[str]:
    """Crashed ranks are restarted, the governor's verdicts end the Job, and /dev/shm holds the snapshot."""
    name, spec, pod = _name(job), job["spec"], template["spec"]
    problems = []
    if pod.get("restartPolicy") != "Never":
        problems.append(f"{name}: restartPolicy must be Never (a podFailurePolicy requires it)")
    if not spec.get("backoffLimit", 6) > 0:
        problems.append(f"{name}: backoffLimit must be above 0, or a crashed rank is never restarted")
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    if not rules:
        problems.append(f"{name}: no podFailurePolicy: a HALT would be retried like a crash")
    trainer = next((c for c in pod["containers"] if c["name"] == "trainer"), None)
    if trainer is None:
        return [*problems, f"{name}: no container named trainer"]
    # Every exit code through the rules in their order (an earlier rule shadows a later one).
    actions = {code: pod_failure_action(job, {trainer["name"]: code}, {}) for code in range(1, 256)}
    fail = sorted(code for code, action in actions.items() if action == "FailJob")
    if rules and fail != terminal_exit_codes():
        problems.append(f"{name}: the FailJob exit codes are {fail}, not the terminal ones {terminal_exit_codes()}")
    if ignored := sorted(code for code, action in actions.items() if action == "Ignore"):
        problems.append(f"{name}: exit codes {ignored} are ignored: a rank that keeps failing so is retried forever")
    for rule in rules:
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName") not in (None, trainer["name"]):
            problems.append(f"{name}: a podFailurePolicy rule names container {codes.get('containerName')!r}")
    if rules and (trainer.get("command") or [""])[0] == "torchrun":
        problems.append(
            f"{name}: under torchrun the container exits 1 whatever the trainer's code: the exit-code rules never match"
        )
    if not any(
        rule.get("action") == "Ignore"
        and any(c.get("type") == "DisruptionTarget" for c in rule.get("onPodConditions") or [])
        for rule in rules
    ):
        problems.append(
            f"{name}: a pod evicted or preempted (DisruptionTarget) should be retried without counting (Ignore)"
        )
    shm = next((m for m in trainer.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"), None)
    volume = next((v for v in pod.get("volumes") or [] if shm and v["name"] == shm["name"]), None)
    empty_dir = (volume or {}).get("emptyDir") or {}
    if empty_dir.get("medium") != "Memory" or not empty_dir.get("sizeLimit"):
        problems.append(f"{name}: mount an emptyDir {{medium: Memory, sizeLimit: ...}} at /dev/shm for the snapshot")
    return problems


def _check_network_policies(objects: list[Obj], pods: list[tuple[Obj, Obj]]) -> list[str]:
    problems = []
    governor_pods = [t for w, t in pods if w["metadata"]["name"] == GOVERNOR]
    trainer_pods = [t for w, t in pods if w["metadata"]["name"] == TRAINER]
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels") or {}
        if not any(_selects(selector, t["metadata"]["labels"]) for t in governor_pods):
            problems.append(f"{_name(policy)}: its podSelector does not select the governor")
        peers = [peer for rule in policy["spec"].get("ingress") or [] for peer in rule.get("from") or []]
        allowed = [
            peer["podSelector"].get("matchLabels") or {}
            for peer in peers
            if "podSelector" in peer and "namespaceSelector" not in peer
        ]
        for template in trainer_pods:
            if not any(_selects(sel, template["metadata"]["labels"]) for sel in allowed):
                problems.append(f"{_name(policy)}: the trainer pods are not let in")
        if not any(
            (peer.get("namespaceSelector") or {}).get("matchLabels") == {"tolaria.dev/governor-client": "true"}
            and (peer.get("podSelector") or {}).get("matchLabels") == {"tolaria.dev/governor-client": "true"}
            for peer in peers
        ):
            problems.append(
                f"{_name(policy)}: controllers in other namespaces are not let in (a peer with namespaceSelector "
                'and podSelector tolaria.dev/governor-client: "true")'
            )
    return problems


def check(directory: Path) -> list[str]:
    """Every problem of one kustomization (its own files, those it includes, and the rendered objects)."""
    problems: list[str] = []
    spec = _yaml().load((directory / KUSTOMIZATION).read_text())
    for entry in [".", *(spec.get("resources") or []), *(spec.get("components") or [])]:
        path = (directory / entry).resolve()
        if path.is_dir():
            problems += check_listing(path)
    try:
        objects = render(directory)
    except RenderError as exc:
        return [*problems, f"{directory}: cannot render: {exc}"]
    return problems + check_objects(objects)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--render", action="store_true", help="print kustomize's output for one kustomization")
    args = parser.parse_args(argv[1:])
    try:
        if args.render:
            if len(args.dirs) != 1:
                parser.error("--render takes one kustomization directory")
            print(render_text(args.dirs[0]), end="")
            return 0
        failed = False
        for directory in args.dirs or kustomization_dirs():
            problems = check(directory)
            for problem in problems:
                print(f"{problem}", file=sys.stderr)
            if problems:
                failed = True
            else:
                count = len(render(directory))
                versions = ", ".join(KUBERNETES_VERSIONS)
                print(f"{directory}: {count} objects render with kustomize and validate against Kubernetes {versions}")
    except RenderError as exc:
        print(f"check_manifests: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
