"""Build artefacts once per recipe: a content-addressed cache with a build lock.

The key hashes the recipe (plain JSON data) and the source of the modules that
build it, so changing a builder rebuilds its images. Parallel test workers
(pytest-xdist) that ask for the same artefact wait on one lock; one builds,
the others reuse. Builds happen in a temporary name and are renamed into place,
so an interrupted build never leaves a half-made artefact under the final name.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Callable


def cache_root() -> Path:
    env = os.environ.get("H2K_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "hyper2kvm"
    path = root / "testbed"
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_hash(recipe: object, modules: list[ModuleType] = ()) -> str:
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for mod in modules:
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def cached_build(
    name: str,
    recipe: object,
    build: Callable[[Path], None],
    *,
    suffix: str = "",
    modules: list[ModuleType] = (),
) -> Path:
    """Return the path of the artefact for ``recipe``, building it with ``build(tmp_path)`` if needed.

    ``build`` must create ``tmp_path`` (a file or a directory).
    """
    key = recipe_hash(recipe, modules)
    root = cache_root()
    final = root / f"{name}-{key}{suffix}"
    if final.exists():
        return final
    lock_path = root / f".{name}-{key}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():  # another worker built it while we waited
            return final
        tmp = root / f".{name}-{key}.{os.getpid()}.tmp{suffix}"
        _remove(tmp)
        try:
            build(tmp)
            if not tmp.exists():
                raise RuntimeError(f"builder for {name} did not create {tmp}")
            os.replace(tmp, final)
        finally:
            _remove(tmp)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
