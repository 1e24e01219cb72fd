"""The package installs and runs without the checkout (issue 9 item 5).

Builds the wheel from a copy of what the build reads, checks what it holds, installs it
into a fresh virtual environment outside the checkout and runs ``rescoin demo``,
``rescoin simulate`` on the trace inside the installed package and
``rescoin agent deploy --help`` from a directory outside the checkout.

The wheel is installed without its dependencies; the fresh environment finds them
through a ``.pth`` line naming this environment's site-packages (a path line, so the
``.pth`` files there, among them the editable install's finder, are not run and the
checkout stays invisible). That keeps the test offline and under a minute;
``pip check`` in the fresh environment then confirms that the wheel's declared
dependencies are satisfied.
"""
from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: what the build backend reads (pyproject: readme, license-files, packages.find)
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "rescoin")
TIMEOUT = 300


def _run(cmd: list[str | Path], **kw) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def _source_files() -> set[str]:
    """Every file under rescoin/ the wheel must hold, as wheel names (``rescoin/...``)."""
    root = REPO / "rescoin"
    return {p.relative_to(REPO).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this environment's setuptools (no build isolation: offline)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--quiet", "--wheel-dir", out, src])
    (whl,) = out.glob("rescoin-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv outside the checkout with the wheel installed; its bin/ and the environment to run it."""
    venv = tmp_path_factory.mktemp("venv")
    assert not venv.is_relative_to(REPO)
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "zz_rescoin_test_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", env


def test_wheel_holds_every_module_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _source_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    for required in ("rescoin/models/default.toml", "rescoin/models/hand-tuned.toml",
                     "rescoin/guest_agent/rescoin_agent.py", "rescoin/guest_agent/rescoin-agent.service",
                     "rescoin/guest_agent/rescoin-agent.init", "rescoin/data/bitbrains_sample/README.md"):
        assert required in names
    assert any(n.startswith("rescoin/data/bitbrains_sample/2013-8/") for n in names)
    dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert len(dist_info) == 1
    assert f"{dist_info.pop()}/licenses/LICENSE" in names
    # nothing from outside the package (tests, bench, the top-level links models/ and guest_agent/)
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"rescoin"}


def test_wheel_metadata_matches_pyproject(wheel):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    zf = zipfile.ZipFile(wheel)
    (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(zf.read(meta_name))
    assert meta["Name"] == project["name"] and meta["Version"] == project["version"]
    assert meta["License-Expression"] == project["license"]
    required = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert sorted(r.replace(" ", "") for r in required) == sorted(d.replace(" ", "") for d in project["dependencies"])
    (ep_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "rescoin = rescoin.cli:main" in zf.read(ep_name).decode()


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    bindir, env = installed
    venv = bindir.parent

    def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
        return _run([*cmd], cwd=tmp_path, env=env)

    assert not tmp_path.is_relative_to(REPO)

    where = json.loads(run(bindir / "python", "-c", "import json, rescoin, rescoin.shipped as s; print(json.dumps("
                           "[rescoin.__file__, str(s.MODELS_DIR), str(s.GUEST_AGENT_DIR), str(s.SAMPLE_TRACE_DIR)]))"
                           ).stdout)
    for path in where:
        assert Path(path).is_relative_to(venv), f"{path} is not inside the fresh environment"
    models, agent, sample = (Path(p) for p in where[1:])
    assert (models / "default.toml").is_file() and (agent / "rescoin_agent.py").is_file()
    run(bindir / "python", "-m", "pip", "check")

    demo = run(bindir / "rescoin", "demo", "--vms", "4", "--days", "1", "--seconds", "1", "--history", tmp_path / "h")
    assert "oracle" in demo.stdout
    assert list((tmp_path / "h").glob("history-*.csv"))

    sim = run(bindir / "rescoin", "simulate", "--trace", sample, "--vms", "4", "--days", "1", "--format", "json")
    assert set(json.loads(sim.stdout)["policies"]) >= {"rescoin", "static"}

    deploy = run(bindir / "rescoin", "agent", "deploy", "--help")
    assert "--inventory" in deploy.stdout
