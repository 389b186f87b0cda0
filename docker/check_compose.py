"""Checks of docker/compose.yaml that the compose-spec schema cannot make. Exit 1 listing problems.

- every depends_on target is a service, and a service_healthy dependency has a healthcheck;
- every environment variable a service sets is one its program declares it reads, and every declared
  variable without a default is set (the config modules declare ENV_VARS);
- ${VAR} interpolations carry a default (${VAR:-default}) so `docker compose up` works as is;
- no two services publish the same host port, and every published port names its host address (the
  default is loopback: publishing on every interface must be asked for).
- a trainer service restarts on failure a bounded number of times (`restart: on-failure:N`, N from 1 to
  10): `always`, `unless-stopped` or an unbounded `on-failure` would restart a HALTed trainer forever.
Run: python docker/check_compose.py [docker/compose.yaml]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

# What each image's program reads, and which of those have no default (must be set).
PROGRAM_ENV = {
    "governor": (("governor_daemon.settings", "governor_daemon.cli.tokens_cmd"), "ENV_VARS", frozenset()),
    "tolaria-train": (("tolaria_trainer.cli",), "ENV_VARS", frozenset({"GOVERNOR_ADDRESS"})),
}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-[^}]*)?\}")


def load(path: Path) -> dict[str, Any]:
    """The compose file as plain data."""
    data = YAML(typ="safe").load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping")
    return data


def entrypoint_program(compose_dir: Path, service: dict[str, Any]) -> str | None:
    """The first word of the ENTRYPOINT of the service's Dockerfile (exec form)."""
    build = service.get("build") or {}
    dockerfile = build.get("dockerfile") if isinstance(build, dict) else None
    if not dockerfile:
        return None
    context = compose_dir / (build.get("context") or ".")
    text = (context / dockerfile).read_text()
    match = re.search(r'^ENTRYPOINT\s+\["([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else None


def declared_env(program: str) -> tuple[frozenset[str], frozenset[str]]:
    """(variables the program reads, those among them without a default)."""
    import importlib

    module_names, attribute, required = PROGRAM_ENV[program]
    declared = {var for name in module_names for var in getattr(importlib.import_module(name), attribute)}
    return frozenset(declared), required


def with_defaults(text: str) -> str:
    """``text`` with every ${VAR:-default} replaced by its default (what `docker compose up` uses as is)."""
    return INTERPOLATION.sub(lambda m: (m.group(2) or "").removeprefix(":").removeprefix("-"), text)


MAX_TRAINER_RESTARTS = 10


def check_trainer_restart(name: str, service: dict[str, Any]) -> list[str]:
    """Compose restarts by exit status, not by code: a bounded ``on-failure:N`` restarts a crashed trainer
    and gives up on a HALT (exit 3, again at every retry) after N tries."""
    restart = str(service.get("restart", "no"))
    policy, _, count = restart.partition(":")
    if policy == "on-failure" and count.isdigit() and 1 <= int(count) <= MAX_TRAINER_RESTARTS:
        return []
    return [
        f"{name}: restart: {restart} - use on-failure:N (N from 1 to {MAX_TRAINER_RESTARTS}): crashes are retried, "
        "and a HALTed trainer (exit 3 at every retry) is not restarted forever"
    ]


def check(path: Path) -> list[str]:
    """Every problem found, as messages naming the service and the fix."""
    data = load(path)
    services: dict[str, Any] = data.get("services") or {}
    problems: list[str] = []
    host_ports: dict[str, str] = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        items = depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)
        for target, condition in items:
            if target not in services:
                problems.append(f"{name}: depends_on {target!r}, which is not a service")
            elif (condition or {}).get("condition") == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")
        program = entrypoint_program(path.parent, service)
        env = service.get("environment") or {}
        env_names = set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
        if program in PROGRAM_ENV:
            declared, required = declared_env(program)
            for var in sorted(env_names - declared):
                problems.append(
                    f"{name}: sets {var}, which {program} does not read (declared: {', '.join(sorted(declared))})"
                )
            for var in sorted(required - env_names):
                problems.append(f"{name}: {program} needs {var} (it has no default); set it in environment")
        if program == "tolaria-train":
            problems += check_trainer_restart(name, service)
        for port in service.get("ports") or []:
            parts = with_defaults(str(port)).split(":")
            if len(parts) != 3:
                problems.append(f"{name}: port {port!r} names no host address; write 127.0.0.1:HOST:CONTAINER")
                continue
            host = f"{parts[0]}:{parts[1]}"
            if host in host_ports:
                problems.append(f"{name}: host port {host} is also published by {host_ports[host]}")
            host_ports[host] = name
    for match in INTERPOLATION.finditer(path.read_text()):
        if not match.group(2):
            problems.append(f"${{{match.group(1)}}} has no default: write ${{{match.group(1)}:-value}}")
    return problems


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("compose.yaml")
    problems = check(path)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: depends_on, healthchecks, environment and ports check out")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
