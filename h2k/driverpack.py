"""Open a VirtIO driver pack: a virtio-win directory, a virtio-win ISO, or a manifest.

The real virtio-win layout is ``<driver>/<os>/<arch>/`` (``viostor/2k19/amd64``)
plus ``guest-agent/qemu-ga-x86_64.msi``. An ISO is read with xorriso: its file
listing once, then only the driver folders a plan asks for are extracted (no
mount, no root) into a cache directory keyed by the ISO's path, size and mtime,
so the host paths a plan refers to stay valid until ``fix`` copies them.

A manifest (JSON or YAML) overrides the layout with explicit paths::

    base: ../virtio-win-0.1.266.iso      # optional: layout to fall back to
    label: my-signed-drivers-2025-01     # optional
    drivers:
      viostor:
        2k19:
          amd64: ./viostor-hotfix/       # a folder holding the INF, SYS, CAT
    guest_agent:
      amd64: ./qemu-ga-x86_64.msi

Relative paths are relative to the manifest file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from h2k import inf as infmod
from h2k.errors import InputError

GUEST_AGENT_MSI = {"amd64": "qemu-ga-x86_64.msi", "x86": "qemu-ga-i386.msi"}


@dataclass
class DriverFiles:
    """One driver for one OS folder and arch, on the host."""

    driver: str  # pack folder name as found, e.g. NetKVM
    os_folder: str
    arch: str
    directory: Path
    inf: Path
    sys: Path
    cat: Path | None
    files: list[Path]  # everything in the folder (sorted), INF/SYS/CAT included
    parsed: infmod.InfFile = field(repr=False)

    @property
    def version(self) -> str | None:
        return self.parsed.driver_version

    @property
    def service_name(self) -> str:
        svc = self.parsed.associated_service
        return svc.name if svc else self.sys.stem

    def package_hash(self) -> str:
        """16 hex digits from the INF and CAT contents: stable per driver build, like pnputil's names."""
        h = hashlib.sha256(self.inf.read_bytes())
        if self.cat is not None:
            h.update(self.cat.read_bytes())
        return h.hexdigest()[:16]


class _Layout:
    """Where driver folders come from: a directory tree or an ISO image."""

    description: str

    def triples(self) -> dict[tuple[str, str, str], str]:
        """(driver.lower(), os.lower(), arch.lower()) -> relative folder as spelled in the pack."""
        raise NotImplementedError

    def materialize(self, rel: str) -> Path:
        """A host directory holding the folder ``rel`` (extracting it first if needed)."""
        raise NotImplementedError

    def file(self, rel: str) -> Path | None:
        raise NotImplementedError

    label: str | None = None


class _DirLayout(_Layout):
    def __init__(self, root: Path):
        self.root = root
        self.description = str(root)
        self.label = _label_from_tree(root)
        self._triples: dict[tuple[str, str, str], str] | None = None

    def triples(self) -> dict[tuple[str, str, str], str]:
        if self._triples is None:
            found: dict[tuple[str, str, str], str] = {}
            for drv in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for osd in sorted(p for p in drv.iterdir() if p.is_dir()):
                    for arch in sorted(p for p in osd.iterdir() if p.is_dir()):
                        found[(drv.name.lower(), osd.name.lower(), arch.name.lower())] = \
                            f"{drv.name}/{osd.name}/{arch.name}"
            self._triples = found
        return self._triples

    def materialize(self, rel: str) -> Path:
        return self.root / rel

    def file(self, rel: str) -> Path | None:
        p = self.root / rel
        return p if p.is_file() else None


def _label_from_tree(root: Path) -> str | None:
    info = root / "data" / "info.json"
    if info.is_file():
        try:
            release = json.loads(info.read_text()).get("release")
            return f"virtio-win-{release}" if release else None
        except (ValueError, OSError):
            return None
    return root.name if root.name.startswith("virtio-win") else None


def _xorriso(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("xorriso") is None:
        raise InputError("reading a driver ISO needs xorriso (apt-get install xorriso)")
    return subprocess.run(["xorriso", "-abort_on", "FAILURE", *args], capture_output=True, text=True)


def _extract_root() -> Path:
    env = os.environ.get("H2K_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hyper2kvm"
    return base / "driverpacks"


class _IsoLayout(_Layout):
    def __init__(self, iso: Path):
        self.iso = iso.resolve()
        self.description = str(iso)
        st = self.iso.stat()
        key = hashlib.sha256(f"{self.iso}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
        self.cache = _extract_root() / f"{self.iso.stem}-{key}"
        listing = _xorriso("-joliet", "on", "-indev", str(self.iso), "-pvd_info", "-find", "/", "-type", "f")
        if listing.returncode != 0:
            last = (listing.stderr.strip().splitlines() or ["unreadable"])[-1]
            raise InputError(f"cannot read ISO {iso}: {last}")
        self.files: set[str] = set()
        for line in listing.stdout.splitlines():
            line = line.strip()
            if line.startswith("'/") and line.endswith("'"):
                self.files.add(line[2:-1].replace("'\"'\"'", "'"))
            elif line.startswith("Volume Id") and ":" in line:
                self.label = line.split(":", 1)[1].strip() or None
        if not self.files:
            raise InputError(f"ISO {iso} contains no files")

    def triples(self) -> dict[tuple[str, str, str], str]:
        found: dict[tuple[str, str, str], str] = {}
        for f in sorted(self.files):
            parts = PurePosixPath(f).parts
            if len(parts) >= 4:
                found.setdefault((parts[0].lower(), parts[1].lower(), parts[2].lower()), "/".join(parts[:3]))
        return found

    def materialize(self, rel: str) -> Path:
        dest = self.cache / rel
        if dest.is_dir():
            return dest
        tmp = self.cache / ".tmp" / f"{os.getpid()}-{rel.replace('/', '_')}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        res = _xorriso("-joliet", "on", "-osirrox", "on", "-indev", str(self.iso), "-extract", f"/{rel}", str(tmp))
        if res.returncode != 0 or not tmp.is_dir():
            last = (res.stderr.strip().splitlines() or ["extraction failed"])[-1]
            raise InputError(f"cannot extract /{rel} from {self.iso}: {last}")
        for p in tmp.rglob("*"):  # ISO files may come out read-only; keep the cache removable
            p.chmod(p.stat().st_mode | 0o200)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process extracted the same folder first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def file(self, rel: str) -> Path | None:
        if rel not in self.files:
            return None
        parent = str(PurePosixPath(rel).parent)
        folder = self.materialize(parent) if parent != "." else None
        if folder is None:
            raise InputError(f"file /{rel} sits at the ISO root; expected it in a folder")
        return folder / PurePosixPath(rel).name


class DriverPack:
    """A driver pack, whatever its form. Use ``open_pack(path)``."""

    def __init__(self, source: Path, kind: str, layout: _Layout | None,
                 overrides: dict[tuple[str, str, str], Path] | None = None,
                 agent_overrides: dict[str, Path] | None = None, label: str | None = None):
        self.source = source
        self.kind = kind  # directory, iso or manifest
        self._layout = layout
        self._overrides = overrides or {}
        self._agent_overrides = agent_overrides or {}
        self.label = label or (layout.label if layout else None)
        self._cache: dict[tuple[str, str, str], DriverFiles] = {}

    def __repr__(self) -> str:
        return f"DriverPack({self.kind}: {self.source})"

    def _triples(self) -> dict[tuple[str, str, str], str]:
        return self._layout.triples() if self._layout else {}

    def available(self, driver: str | None = None) -> list[tuple[str, str, str]]:
        """(driver, os, arch) triples the pack has, spelled as in the pack."""
        out = {tuple(rel.split("/")) for rel in self._triples().values()}
        for key, path in self._overrides.items():
            out.add(key)
        items = sorted(out)
        if driver is not None:
            items = [t for t in items if t[0].lower() == driver.lower()]
        return items

    def has(self, driver: str, os_folder: str, arch: str) -> bool:
        key = (driver.lower(), os_folder.lower(), arch.lower())
        return key in {tuple(k.lower() for k in t) for t in self._overrides} or key in self._triples()

    def find(self, driver: str, os_folder: str, arch: str) -> DriverFiles:
        """The INF/SYS/CAT of ``driver`` for ``os_folder``/``arch``; InputError if the pack lacks it."""
        key = (driver.lower(), os_folder.lower(), arch.lower())
        if key in self._cache:
            return self._cache[key]
        directory = None
        spelled = (driver, os_folder, arch)
        for okey, path in self._overrides.items():
            if tuple(k.lower() for k in okey) == key:
                directory, spelled = path, okey
        if directory is None:
            rel = self._triples().get(key)
            if rel is None:
                have = [f"{o}/{a}" for d, o, a in self.available(driver)]
                hint = f"; it has {driver} for: {', '.join(have)}" if have else f"; it has no {driver} at all"
                raise InputError(f"driver pack {self.source} has no {driver} for {os_folder}/{arch}{hint}")
            directory = self._layout.materialize(rel)
            spelled = tuple(rel.split("/"))
        files = _driver_files(spelled[0], spelled[1], spelled[2], Path(directory))
        self._cache[key] = files
        return files

    def guest_agent(self, arch: str) -> Path | None:
        """The qemu-ga MSI for an arch folder (amd64/x86), or None if the pack has none."""
        if arch in self._agent_overrides:
            return self._agent_overrides[arch]
        name = GUEST_AGENT_MSI.get(arch)
        if name is None or self._layout is None:
            return None
        return self._layout.file(f"guest-agent/{name}")


def _driver_files(driver: str, os_folder: str, arch: str, directory: Path) -> DriverFiles:
    if not directory.is_dir():
        raise InputError(f"driver folder {directory} for {driver} {os_folder}/{arch} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file())
    infs = [p for p in files if p.suffix.lower() == ".inf"]
    if not infs:
        raise InputError(f"driver folder {directory} has no .inf file")
    # Several INFs: prefer the one named like the driver folder (NetKVM -> netkvm.inf).
    infs.sort(key=lambda p: (p.stem.lower() != driver.lower(), p.name.lower()))
    inf_path = infs[0]
    parsed = infmod.parse_file(inf_path)
    by_lower = {p.name.lower(): p for p in files}
    svc = parsed.associated_service
    sys_name = (svc.binary_name if svc and svc.binary_name else f"{inf_path.stem}.sys").lower()
    sys_path = by_lower.get(sys_name)
    if sys_path is None:
        raise InputError(f"driver folder {directory}: {inf_path.name} installs {sys_name} but the file is missing")
    cat_name = (parsed.catalog or f"{inf_path.stem}.cat").lower()
    cat_path = by_lower.get(cat_name)
    return DriverFiles(driver, os_folder, arch, directory, inf_path, sys_path, cat_path, files, parsed)


def _is_iso(path: Path) -> bool:
    if path.suffix.lower() == ".iso":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(0x8001)
            return f.read(5) == b"CD001"
    except OSError:
        return False


def _load_manifest(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSON/YAML syntax errors: one line for the user
        raise InputError(f"driver-pack manifest {path} is not valid {path.suffix[1:].upper()}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"driver-pack manifest {path}: expected a mapping at the top level")
    unknown = set(data) - {"base", "label", "drivers", "guest_agent"}
    if unknown:
        raise InputError(f"driver-pack manifest {path}: unknown keys {', '.join(sorted(unknown))}")
    return data


def open_pack(path: str | os.PathLike) -> DriverPack:
    """Open a virtio-win directory, ISO, or a JSON/YAML manifest."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"driver pack {p} does not exist")
    if p.is_dir():
        return DriverPack(p, "directory", _DirLayout(p))
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        return _open_manifest(p)
    if _is_iso(p):
        return DriverPack(p, "iso", _IsoLayout(p))
    raise InputError(f"driver pack {p}: not a directory, an ISO image or a .json/.yaml manifest")


def _open_manifest(p: Path) -> DriverPack:
    data = _load_manifest(p)
    here = p.parent
    layout = None
    if data.get("base"):
        base = (here / str(data["base"])).resolve()
        if not base.exists():
            raise InputError(f"driver-pack manifest {p}: base {base} does not exist")
        inner = open_pack(base)
        if inner.kind == "manifest":
            raise InputError(f"driver-pack manifest {p}: base must be a directory or ISO, not another manifest")
        layout = inner._layout
    overrides: dict[tuple[str, str, str], Path] = {}
    drivers = data.get("drivers") or {}
    if not isinstance(drivers, dict):
        raise InputError(f"driver-pack manifest {p}: 'drivers' must map driver -> os -> arch -> folder")
    for drv, per_os in drivers.items():
        if not isinstance(per_os, dict):
            raise InputError(f"driver-pack manifest {p}: drivers.{drv} must map os -> arch -> folder")
        for osf, per_arch in per_os.items():
            if not isinstance(per_arch, dict):
                raise InputError(f"driver-pack manifest {p}: drivers.{drv}.{osf} must map arch -> folder")
            for arch, folder in per_arch.items():
                target = (here / str(folder)).resolve()
                if not target.is_dir():
                    raise InputError(f"driver-pack manifest {p}: drivers.{drv}.{osf}.{arch}: "
                                     f"{target} is not a directory")
                overrides[(str(drv), str(osf), str(arch))] = target
    agents: dict[str, Path] = {}
    for arch, msi in (data.get("guest_agent") or {}).items():
        target = (here / str(msi)).resolve()
        if not target.is_file():
            raise InputError(f"driver-pack manifest {p}: guest_agent.{arch}: {target} is not a file")
        agents[str(arch)] = target
    if layout is None and not overrides:
        raise InputError(f"driver-pack manifest {p}: names neither a base pack nor any driver")
    return DriverPack(p, "manifest", layout, overrides, agents, label=data.get("label"))
