"""Packaging: what a built wheel holds, and what the daemon installs without (matplotlib)."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, governor_cli

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from the working tree, as `pip wheel` builds it (no network: the venv's setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_wheel_ships_the_contract_and_type_markers(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    protos = {p.relative_to(REPO / "proto").as_posix() for p in (REPO / "proto").rglob("*.proto")}
    assert "tolaria/governor/v1/trainer_service.proto" in protos
    assert protos <= names, protos - names
    assert {"governor_daemon/py.typed", "tolaria_trainer/py.typed", "tolaria/py.typed"} <= names
    assert "tolaria/governor/v1/control_service_pb2.pyi" in names
    for proto in protos:
        assert wheel.read(proto) == (REPO / "proto" / proto).read_bytes()


def test_wheel_license_matches_the_metadata(wheel: zipfile.ZipFile) -> None:
    meta = _metadata(wheel)
    assert meta["License-Expression"] == PYPROJECT["project"]["license"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    (license_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    text = wheel.read(license_name).decode()
    assert text == (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_daemon_requirements_leave_matplotlib_to_the_plot_extra(wheel: zipfile.ZipFile) -> None:
    requires = _metadata(wheel).get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.lower().startswith("matplotlib")], base
    assert any(r.startswith("matplotlib") and 'extra == "plot"' in r for r in requires), requires
    # The dev install (what `make test` uses) still brings it, through the plot extra.
    name = PYPROJECT["project"]["name"]
    dev_extras = [
        set(r[len(name) + 1 : r.index("]")].split(","))
        for r in requires
        if r.startswith(f"{name}[") and 'extra == "dev"' in r
    ]
    assert any("plot" in extras for extras in dev_extras), requires


def test_audit_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    """With matplotlib unimportable, `audit plot` exits 2 naming the extra; other commands never import it."""
    shadow = tmp_path / "no_matplotlib"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is made unimportable')\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in [str(shadow), os.environ.get("PYTHONPATH", "")] if p)}
    result = governor_cli(
        ["audit", "plot", "run", "--data-dir", str(tmp_path / "d"), "-o", str(tmp_path / "p.png")], env
    )
    assert result.returncode == 2, result.stderr
    assert f"pip install '{PYPROJECT['project']['name']}[plot]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.png").exists()
    probe = (
        "import sys, governor_daemon.cli.main, governor_daemon.server, governor_daemon.offline.replay; "
        "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, env={**os.environ, **env}, timeout=60)
