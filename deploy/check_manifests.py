"""Render and check the kustomizations under deploy/ without kubectl or kustomize. Exit 1 listing problems.

Rendering covers what these kustomizations use, and refuses anything else (so a new feature cannot be
silently ignored): ``resources`` (files and directories), ``components``, ``secretGenerator`` (files and
literals, with ``disableNameSuffixHash``; ``behavior: create`` or ``replace``) and ``patches`` written as
JSON 6902 operations (add, replace, remove).

Checks:
- every YAML file beside a kustomization is listed in it, and every listed file exists;
- every rendered object validates against the Kubernetes 1.37 schemas, strictly (no unknown fields), with
  the ``kubernetes-validate`` package; cert-manager Certificates, a CRD it has no schema for, get the
  fields the governor's TLS needs checked instead;
- the governor Deployment has one replica and strategy Recreate, its arguments parse with `governor
  serve`'s own parser and its environment is one `governor serve` reads; the trainer's arguments parse with
  `tolaria-train`'s parser and its environment is one `tolaria-train` reads; an Indexed Job's completions
  match torchrun's --nnodes;
- every container runs as non-root with a read-only root filesystem, no privilege escalation, and resource
  requests and limits; every Service selects a pod template and names ports those pods have; every Secret,
  key and claim a pod mounts is rendered; the NetworkPolicy selects the governor and lets the trainers in;
  TOLARIA_GOVERNOR names a Service and its gRPC port.

Run: python deploy/check_manifests.py [KUSTOMIZATION_DIR ...]   (default: every one under deploy/)
     python deploy/check_manifests.py --render DIR             (the rendered YAML stream on stdout)
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

DEPLOY = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATION = "kustomization.yaml"
KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
GOVERNOR = "tolaria-governor"
TRAINER = "tolaria-trainer"

Obj = dict[str, Any]


class RenderError(Exception):
    """A kustomization uses something this renderer does not implement, or is malformed."""


def _yaml() -> YAML:
    return YAML(typ="safe", pure=True)


def load_all(path: Path) -> list[Obj]:
    """The documents of a YAML file (empty ones dropped)."""
    return [doc for doc in _yaml().load_all(path.read_text()) if doc]


def kustomization_dirs(root: Path = DEPLOY) -> list[Path]:
    """Every directory under ``root`` with a kustomization.yaml whose kind is Kustomization (not Component)."""
    found = []
    for path in sorted(root.rglob(KUSTOMIZATION)):
        if _yaml().load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build DIRECTORY` would print, for the features these files use."""
    spec = _yaml().load((directory / KUSTOMIZATION).read_text())
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{directory / KUSTOMIZATION}: not implemented here: {', '.join(sorted(unknown))}")
    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_all(path)
    options = spec.get("generatorOptions") or {}
    for generator in spec.get("secretGenerator") or []:
        secret = _secret(directory, generator, options)
        behavior = generator.get("behavior", "create")
        same = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == secret["metadata"]["name"]]
        if behavior == "create" and not same:
            objects.append(secret)
        elif behavior == "replace" and same:
            objects[objects.index(same[0])] = secret
        else:
            name = secret["metadata"]["name"]
            raise RenderError(f"{directory}: secretGenerator {name}: behavior {behavior!r}, {len(same)} such Secret(s)")
    for entry in spec.get("components") or []:
        component = (directory / entry).resolve()
        comp_spec = _yaml().load((component / KUSTOMIZATION).read_text())
        if comp_spec.get("kind") != "Component":
            raise RenderError(f"{component}: listed under components but its kind is {comp_spec.get('kind')!r}")
        for resource in comp_spec.get("resources") or []:
            objects += load_all(component / resource)
        _patch_all(component, objects, comp_spec.get("patches") or [])
    _patch_all(directory, objects, spec.get("patches") or [])
    return objects


def _secret(directory: Path, generator: Obj, options: Obj) -> Obj:
    if not (options.get("disableNameSuffixHash") or (generator.get("options") or {}).get("disableNameSuffixHash")):
        raise RenderError(f"{directory}: secretGenerator {generator['name']}: name suffix hashes are not implemented")
    data: dict[str, str] = {}
    for item in generator.get("files") or []:
        key, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = base64.b64encode((directory / file).read_bytes()).decode()
    for literal in generator.get("literals") or []:
        key, _, value = literal.partition("=")
        data[key] = base64.b64encode(value.encode()).decode()
    labels = {**(options.get("labels") or {}), **((generator.get("options") or {}).get("labels") or {})}
    metadata: Obj = {"name": generator["name"]}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data}


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
    return all(wanted.get(key) == value for key, value in target.items())


def _patch_all(directory: Path, objects: list[Obj], patches: list[Obj]) -> None:
    for patch in patches:
        ops = _yaml().load(patch["patch"]) if "patch" in patch else load_all(directory / patch["path"])
        if not isinstance(ops, list):
            raise RenderError(f"{directory}: only JSON 6902 patches (a list of operations) are implemented")
        targets = [o for o in objects if _matches(o, patch.get("target") or {})]
        if not targets:
            raise RenderError(f"{directory}: a patch matches no object: {patch.get('target')}")
        for obj in targets:
            for op in ops:
                _apply(obj, op)


def _apply(obj: Obj, op: Obj) -> None:
    """One JSON 6902 operation (add, replace, remove) on ``obj``, in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if kind not in ("add", "replace", "remove"):
        raise RenderError(f"JSON 6902 op {kind!r} is not implemented")
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            del parent[int(last)]
    else:
        if kind != "add" and last not in parent:
            raise RenderError(f"{op['path']}: nothing to {kind}")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])


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
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            problems.append(f"{_name(obj)} is defined twice")
        seen.add(key)
        if obj["apiVersion"] == "cert-manager.io/v1" and obj["kind"] == "Certificate":
            spec = obj.get("spec") or {}
            for field in ("secretName", "issuerRef"):
                if field not in spec:
                    problems.append(f"{_name(obj)}: spec.{field} is required")
            if not (spec.get("issuerRef") or {}).get("name"):
                problems.append(f"{_name(obj)}: spec.issuerRef.name is required")
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{_name(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{_name(obj)}: {exc.message}")
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
            if env["name"] == "TOLARIA_GOVERNOR":
                host, _, port = env.get("value", "").rpartition(":")
                service = services.get(host.split(".")[0])
                if service is None or int(port or 0) not in {p["port"] for p in service["spec"]["ports"]}:
                    problems.append(f"{where}: TOLARIA_GOVERNOR={env.get('value')} is not a Service and port here")
    return problems


def _program_args(container: Obj) -> tuple[str, list[str]]:
    """(program, its arguments): `governor serve` from the image's entrypoint, or tolaria_trainer under
    torchrun."""
    command, args = container.get("command") or [], [str(a) for a in container.get("args") or []]
    if command == ["torchrun"]:
        return "torchrun", args
    return "governor" if "governor" in container["image"] else "tolaria-train", args


def _check_governor(objects: list[Obj], pods: list[tuple[Obj, Obj]]) -> list[str]:
    from governor_daemon.settings import ENV_VARS as GOVERNOR_ENV
    from governor_daemon.settings import add_arguments
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
                    indexed = workload["kind"] == "Job" and workload["spec"].get("completionMode") == "Indexed"
                    if indexed and str(workload["spec"].get("completions")) != nnodes:
                        problems.append(f"{name}: completions must equal torchrun's --nnodes ({nnodes})")
                parser = build_parser()
                parser.exit_on_error = False
                declared = set(TRAINER_ENV)
            try:
                _, unknown = parser.parse_known_args(args)
            except (argparse.ArgumentError, SystemExit) as exc:
                problems.append(f"{name}: {program} does not accept its arguments: {exc}")
                continue
            if unknown:
                problems.append(f"{name}: {program} does not know {' '.join(unknown)}")
            prefix = "GOVERNOR_" if program == "governor" else "TOLARIA_"
            for var in sorted(v for v in env if v.startswith(prefix) and v not in declared):
                problems.append(f"{name}: sets {var}, which {program} does not read")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    governor_pods = [t for w, t in pods if w["metadata"]["name"] == GOVERNOR]
    trainer_pods = [t for w, t in pods if w["metadata"]["name"] == TRAINER]
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels") or {}
        if not any(_selects(selector, t["metadata"]["labels"]) for t in governor_pods):
            problems.append(f"{_name(policy)}: its podSelector does not select the governor")
        allowed = [
            peer["podSelector"].get("matchLabels") or {}
            for rule in policy["spec"].get("ingress") or []
            for peer in rule.get("from") or []
            if "podSelector" in peer and "namespaceSelector" not in peer
        ]
        for template in trainer_pods:
            if not any(_selects(sel, template["metadata"]["labels"]) for sel in allowed):
                problems.append(f"{_name(policy)}: the trainer pods are not let in")
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
    except (RenderError, OSError, KeyError, IndexError, ValueError) as exc:
        return [*problems, f"{directory}: cannot render: {exc}"]
    return problems + check_objects(objects)


def dump(objects: list[Obj]) -> str:
    """A YAML stream, as `kustomize build` prints."""
    out = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump_all(objects, out)
    return out.getvalue()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--render", action="store_true", help="print the rendered objects of one kustomization")
    args = parser.parse_args(argv[1:])
    if args.render:
        if len(args.dirs) != 1:
            parser.error("--render takes one kustomization directory")
        print(dump(render(args.dirs[0])), end="")
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
            print(f"{directory}: {count} objects render and validate against Kubernetes {KUBERNETES_VERSION}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
