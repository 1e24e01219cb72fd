"""The Debian packages of the guest image: which versions (apt-cache) and their .deb files (apt-get download)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from rescoin.lab.base import LabError, Progress

KERNEL_META = "linux-image-cloud-amd64"
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")


def run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run one build tool; a missing tool or a failure becomes a one-line LabError."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]} not found (run scripts/setup-host)") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{what} failed: {detail[-1] if detail else f'exit status {done.returncode}'}")
    return done.stdout


def resolve_packages(say: Progress) -> dict[str, str]:
    """Package name -> version for the kernel (the real package behind the
    ``linux-image-cloud-amd64`` meta package) and the Python packages."""

    def query() -> dict[str, str]:
        deps = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
        m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", deps.stdout)
        if not m:
            return {}
        names = [m.group(1), *PYTHON_PACKAGES]
        show = subprocess.run(["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True)
        found: dict[str, str] = {}
        for block in show.stdout.split("\n\n"):
            pkg = re.search(r"^Package: (\S+)", block, re.M)
            ver = re.search(r"^Version: (\S+)", block, re.M)
            if pkg and ver and pkg.group(1) in names:
                found.setdefault(pkg.group(1), ver.group(1))
        return found if len(found) == len(names) else {}

    try:
        found = query()
        if not found and os.geteuid() == 0:
            say("package lists do not know the guest packages; running apt-get update")
            run(["apt-get", "update", "-q"], "apt-get update")
            found = query()
    except FileNotFoundError:
        raise LabError("apt-cache not found: the guest image is built from Debian packages") from None
    if not found:
        raise LabError(f"apt cannot find {KERNEL_META} and {', '.join(PYTHON_PACKAGES)} "
                       "(run 'apt-get update' as root; the Debian main archive must be reachable)")
    return found


def fetch_debs(packages: dict[str, str], debs: Path, say: Progress) -> list[Path]:
    """The .deb files of these exact versions, downloaded once into ``debs``."""
    debs.mkdir(parents=True, exist_ok=True)
    have = {}
    for f in debs.glob("*.deb"):
        name, _, rest = f.name.partition("_")
        have[(name, rest.rsplit("_", 1)[0].replace("%3a", ":"))] = f
    missing = [p for p, v in packages.items() if (p, v) not in have]
    if missing:
        say(f"downloading {', '.join(missing)}")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            with contextlib.suppress(LookupError, OSError):   # let apt's unprivileged download user write here
                shutil.chown(tmp, user="_apt")
            run(["apt-get", "download", "-q", *(f"{p}={packages[p]}" for p in missing)],
                 "apt-get download", cwd=Path(tmp))
            for f in Path(tmp).glob("*.deb"):
                name, _, rest = f.name.partition("_")
                target = debs / f.name
                os.replace(f, target)
                have[(name, rest.rsplit("_", 1)[0].replace("%3a", ":"))] = target
        for old in debs.glob("*.deb"):   # drop superseded versions of the same packages
            name = old.name.partition("_")[0]
            if name in packages and old not in {have.get((name, packages[name]))}:
                old.unlink(missing_ok=True)
    try:
        return [have[(p, v)] for p, v in packages.items()]
    except KeyError as e:
        raise LabError(f"apt-get download did not produce {e.args[0][0]} {e.args[0][1]}") from None
