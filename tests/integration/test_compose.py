"""docker/compose.yaml without a Docker engine: the compose-spec schema, the checks the schema cannot
make, and an emulation that runs each service's command as a local process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from tests.conftest import REPO, governor_cli

COMPOSE = REPO / "docker" / "compose.yaml"
LOCAL_PROGRAMS = {
    "governor": [sys.executable, "-m", "governor_daemon"],
    "tolaria-train": [sys.executable, "-m", "tolaria_trainer"],
}


def checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_compose", REPO / "docker" / "check_compose.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_matches_the_compose_spec_schema() -> None:
    """check-jsonschema's bundled compose-spec schema accepts docker/compose.yaml."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("check-jsonschema")),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_structural_checks_pass() -> None:
    """depends_on targets, healthchecks, environment and ports of the shipped file are consistent."""
    assert checks().check(COMPOSE) == []


def test_structural_checks_catch_mistakes(tmp_path: Path) -> None:
    """A missing healthcheck, an unknown dependency, a misspelt variable, a missing required variable,
    a port clash and an interpolation without default are each reported."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(f"""
services:
  governor:
    build: {{context: {REPO}, dockerfile: docker/governor.Dockerfile}}
    environment: {{GOVERNOR_LISTN: "0.0.0.0:1"}}
    ports: ["127.0.0.1:50051:50051"]
  trainer:
    build: {{context: {REPO}, dockerfile: docker/trainer.Dockerfile}}
    depends_on:
      governor: {{condition: service_healthy}}
      database: {{condition: service_started}}
    environment: {{GOVERNOR_TOKEN: "${{TOKEN}}"}}
    ports: ["127.0.0.1:50051:80", "9464:9464"]
""")
    problems = "\n".join(checks().check(bad))
    assert "waits for governor to be healthy, but governor has no healthcheck" in problems
    assert "depends_on 'database', which is not a service" in problems
    assert "sets GOVERNOR_LISTN, which governor does not read" in problems
    assert "tolaria-train needs GOVERNOR_ADDRESS" in problems
    assert "host port 127.0.0.1:50051 is also published by governor" in problems
    assert "port '9464:9464' names no host address" in problems
    assert "${TOKEN} has no default" in problems


@pytest.mark.parametrize(
    ("restart", "accepted"),
    [
        ("on-failure:3", True),
        ("on-failure:10", True),
        (None, False),
        ("always", False),
        ("unless-stopped", False),
        ("on-failure", False),
        ("on-failure:0", False),
        ("on-failure:50", False),
    ],
)
def test_trainer_restarts_are_bounded(tmp_path: Path, restart: str | None, accepted: bool) -> None:
    """Compose restarts by exit status only: a trainer is restarted after a crash, a bounded number of times,
    so a HALT (exit 3 again at every retry) stops after N tries instead of looping forever. The shipped
    trainers restart on-failure:3."""
    shipped = checks().load(COMPOSE)["services"]
    assert {name: shipped[name].get("restart") for name in ("trainer", "trainer-gpu")} == {
        "trainer": "on-failure:3",
        "trainer-gpu": "on-failure:3",
    }
    line = f"    restart: {restart}\n" if restart is not None else ""
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        f"services:\n  trainer:\n    build: {{context: {REPO}, dockerfile: docker/trainer.Dockerfile}}\n"
        f"    environment: {{GOVERNOR_ADDRESS: governor:50051}}\n{line}"
    )
    problems = [p for p in checks().check(compose) if "restart" in p]
    assert (problems == []) is accepted, problems
    if not accepted:
        assert "a HALTed trainer (exit 3 at every retry) is not restarted forever" in problems[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def interpolate(value: str) -> str:
    """${VAR:-default} as docker compose would resolve it with an empty environment."""
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), value
    )


def test_emulation_runs_the_stack(tmp_path: Path) -> None:
    """Each service's command runs as a local process (addresses on loopback, the volume and secret in a
    temp dir); the healthcheck gates the trainer; the run ends with the expected journal."""
    module = checks()
    data = module.load(COMPOSE)
    services: dict[str, Any] = data["services"]
    volume_dir = tmp_path / "governor-journal"
    secrets_dir = tmp_path / "governor-secrets"
    grpc_port, metrics_port = free_port(), free_port()
    mapping = {
        "0.0.0.0:50051": f"127.0.0.1:{grpc_port}",
        "0.0.0.0:9464": f"127.0.0.1:{metrics_port}",
        "governor:50051": f"127.0.0.1:{grpc_port}",
        "127.0.0.1:50051": f"127.0.0.1:{grpc_port}",
        "/data": str(volume_dir),
        "/secrets": str(secrets_dir),
        "/secrets/tokens": str(secrets_dir / "tokens"),
        "/secrets/trainer.token": str(secrets_dir / "trainer.token"),
    }

    def local(value: str) -> str:
        value = interpolate(str(value))
        return mapping.get(value, value)

    def command_of(name: str) -> tuple[list[str], dict[str, str]]:
        service = services[name]
        program = module.entrypoint_program(COMPOSE.parent, service)
        dockerfile = (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).read_text()
        entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.MULTILINE).group(1))  # type: ignore[union-attr]
        env = {k: local(v) for k, v in (service.get("environment") or {}).items()}
        entry = service.get("entrypoint") or entry  # a service may override the image's entrypoint
        return [*LOCAL_PROGRAMS[program], *(local(a) for a in [*entry[1:], *service["command"]])], env

    for attempt in range(2):  # the one-shot tokens service: makes the tokens once, keeps them after
        tokens_cmd, tokens_env = command_of("tokens")
        made = subprocess.run(tokens_cmd, env={**os.environ, **tokens_env}, capture_output=True, text=True, check=False)
        assert made.returncode == 0, made.stderr
        assert ("kept as it is" in made.stdout) == (attempt == 1)
    assert oct((secrets_dir / "tokens").stat().st_mode & 0o777) == "0o600"
    assert "change-me" not in (secrets_dir / "tokens").read_text()

    governor_cmd, governor_env = command_of("governor")
    log = (tmp_path / "governor.log").open("w")
    governor = subprocess.Popen(governor_cmd, env={**os.environ, **governor_env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        check = services["governor"]["healthcheck"]
        assert check["test"][:2] == ["CMD", "governor"]
        probe = [*LOCAL_PROGRAMS["governor"], *(local(a) for a in check["test"][2:])]
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            assert governor.poll() is None, (tmp_path / "governor.log").read_text()
            assert time.monotonic() < deadline, "the governor never became healthy"
            time.sleep(0.2)
        trainer_cmd, trainer_env = command_of("trainer")
        assert trainer_env["GOVERNOR_ADDRESS"] == f"127.0.0.1:{grpc_port}"
        result = subprocess.run(
            [*trainer_cmd, "--run-id", "compose-run"],
            env={**os.environ, **trainer_env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, shlex.join(trainer_cmd) + "\n" + result.stderr[-3000:]
    finally:
        governor.terminate()
        governor.wait(15)
        log.close()
    kinds = {}
    for path in list_segments(volume_dir):
        for item in read_segment(path):
            if isinstance(item, LocatedEntry) and item.entry.run == "compose-run":
                kinds.setdefault(item.entry.kind, []).append(item.entry.payload)
    assert kinds["attach"][0]["caller"] == "trainer-1", "the trainer authenticated with the compose token"
    assert [r["succeeded"] for r in kinds["command_result"]] == [True]
    assert kinds["finish"][0]["status"] == "FINISH_STATUS_COMPLETED"
    assert governor_cli(["audit", "verify", "--data-dir", str(volume_dir)]).returncode == 0
    assert governor.returncode == 0, "SIGTERM stopped the governor cleanly"


@pytest.mark.parametrize("dockerfile", ["governor.Dockerfile", "trainer.Dockerfile"])
def test_dockerfiles_run_as_non_root_with_exec_entrypoints(dockerfile: str) -> None:
    """Both images switch to a non-root user and use exec-form entrypoints (signals reach the program)."""
    text = (REPO / "docker" / dockerfile).read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["', text, re.MULTILINE)
    if dockerfile == "governor.Dockerfile":
        assert "pip install . " in text, "the governor image installs no extras (no torch)"
