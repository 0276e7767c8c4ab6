"""Read a matrix file (YAML), check it against ``schema.json``, and build a ``MatrixSpec``.

Every error is one line naming the file and the field, e.g.
``nightly.yaml: images[2].kind: 'win' is not one of ['windows', 'linux']``.

Paths may use ``${VAR}`` or ``${VAR:-default}``; an unset variable expands to
nothing, so a matrix can be listed without its images and only ``run`` asks
for them. ``--image-path NAME=PATH`` / ``--pack-path NAME=PATH`` override.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from h2k.errors import InputError
from matrix.model import (
    BOOT_MODES,
    BUSES,
    FIRMWARES,
    ExpectRule,
    ExpectSpec,
    NICS,
    ImageSpec,
    KnownIssue,
    MatrixSpec,
    PackSpec,
    Rule,
    TimeoutRule,
)

SCHEMA_PATH = Path(__file__).with_name("schema.json")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MatrixError(InputError):
    """A matrix file is unusable; the message names the file and the field."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def expand_vars(text: str, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(data: Any, source: str) -> None:
    """Raise MatrixError with the most relevant schema error, or return."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(data))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    # oneOf failures are unreadable; name the inner cause when there is one.
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    msg = err.message
    if err.validator == "additionalProperties":
        msg = msg.replace("Additional properties are not allowed", "unknown field")
    raise MatrixError(f"{source}: {_where(err.absolute_path)}: {msg}")


def parse_stop_code(value: Any, source: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise MatrixError(f"{source}: {where}: stop code {value!r} is not a number (use 0x7B)") from None


def parse_expect(raw: dict[str, Any] | None, source: str, where: str) -> ExpectSpec | None:
    """An ``expect:`` mapping -> ExpectSpec; an unknown evidence name or a broken regex is one line."""
    from lab.verdict import check_success, parse_success

    if raw is None:
        return None
    success = patterns = None
    try:
        if "success" in raw:
            alts = [parse_success(a)[0] if isinstance(a, str) else check_success([a])[0] for a in raw["success"]]
            success = tuple(tuple(a) for a in alts)
    except InputError as exc:
        raise MatrixError(f"{source}: {where}.{exc}") from None
    for j, regex in enumerate(raw.get("patterns") or []):
        try:
            re.compile(regex, re.M)
        except re.error as exc:
            raise MatrixError(f"{source}: {where}.patterns[{j}]: {regex!r} is not a valid regex: {exc}") from None
    if "patterns" in raw:
        patterns = tuple(raw["patterns"])
    return ExpectSpec(success, patterns)


def load_matrix(
    path: str | Path,
    *,
    image_paths: dict[str, str] | None = None,
    pack_paths: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> MatrixSpec:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MatrixError(f"{source}: cannot read matrix file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MatrixError(f"{source}: {where}: not valid YAML: {problem}") from None
    return build_spec(data, source, image_paths=image_paths, pack_paths=pack_paths, env=env)


def build_spec(
    data: Any,
    source: str,
    *,
    image_paths: dict[str, str] | None = None,
    pack_paths: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> MatrixSpec:
    if not isinstance(data, dict):
        raise MatrixError(f"{source}: (top level): a matrix file must be a mapping, not {type(data).__name__}")
    validate(data, source)
    image_paths = dict(image_paths or {})
    pack_paths = dict(pack_paths or {})

    images: list[ImageSpec] = []
    for i, raw in enumerate(data["images"]):
        name = raw["name"]
        if any(im.name == name for im in images):
            raise MatrixError(f"{source}: images[{i}].name: duplicate image name {name!r}")
        if "path" in raw and "recipe" in raw:
            raise MatrixError(f"{source}: images[{i}]: give either path or recipe, not both")
        if "path" not in raw and "recipe" not in raw:
            raise MatrixError(f"{source}: images[{i}]: needs a path or a test-bed recipe")
        p = image_paths.pop(name, None) or (expand_vars(raw["path"], env) if "path" in raw else None)
        images.append(
            ImageSpec(
                name=name,
                kind=raw["kind"],
                path=p or None,
                recipe=raw.get("recipe"),
                os=raw.get("os"),
                mode=raw.get("mode", "boot"),
                memory_mb=raw.get("memory_mb"),
                firmware=raw.get("firmware"),
                bus=raw.get("bus"),
                nic=raw.get("nic"),
                expect=parse_expect(raw.get("expect"), source, f"images[{i}].expect"),
            )
        )
    packs: list[PackSpec] = []
    for i, raw in enumerate(data.get("packs") or []):
        name = raw["name"]
        if any(pk.name == name for pk in packs):
            raise MatrixError(f"{source}: packs[{i}].name: duplicate pack name {name!r}")
        if "path" in raw and "recipe" in raw:
            raise MatrixError(f"{source}: packs[{i}]: give either path or recipe, not both")
        if "path" not in raw and "recipe" not in raw:
            raise MatrixError(f"{source}: packs[{i}]: needs a path or a test-bed recipe")
        p = pack_paths.pop(name, None) or (expand_vars(raw["path"], env) if "path" in raw else None)
        packs.append(PackSpec(name=name, path=p or None, recipe=raw.get("recipe")))
    if image_paths:
        raise MatrixError(f"{source}: --image-path: no image named {sorted(image_paths)[0]!r} in this matrix")
    if pack_paths:
        raise MatrixError(f"{source}: --pack-path: no pack named {sorted(pack_paths)[0]!r} in this matrix")
    if any(im.kind == "windows" for im in images) and not packs:
        raise MatrixError(f"{source}: packs: Windows images need at least one driver pack")

    timeouts = data.get("timeouts") or {}
    spec = MatrixSpec(
        name=data["name"],
        source=source,
        images=images,
        packs=packs,
        firmware=data.get("firmware", ["bios"]),
        bus=data.get("bus", ["virtio-blk"]),
        nic=data.get("nic", ["virtio-net"]),
        boot_mode=data.get("boot_mode", ["two-phase"]),
        include=[Rule(m) for m in data.get("include") or []],
        exclude=[Rule(m) for m in data.get("exclude") or []],
        default_timeout=timeouts.get("default", 900),
        timeouts=[TimeoutRule(Rule(r["match"]), r["seconds"]) for r in timeouts.get("rules") or []],
        known_issues=[
            KnownIssue(
                Rule(k["match"]),
                k["reason"],
                parse_stop_code(k.get("stop_code"), source, f"known_issues[{i}].stop_code"),
                k.get("reason_contains"),
            )
            for i, k in enumerate(data.get("known_issues") or [])
        ],
        expect=[
            ExpectRule(Rule(e["match"]), parse_expect(e, source, f"expect[{i}]"))
            for i, e in enumerate(data.get("expect") or [])
        ],
    )
    _check_rule_names(spec)
    return spec


def _check_rule_names(spec: MatrixSpec) -> None:
    """A rule naming an image, pack or value that does not exist is a typo, not an empty match."""
    known = {
        "image": {i.name for i in spec.images},
        "pack": {p.name for p in spec.packs},
        "firmware": set(FIRMWARES),
        "bus": set(BUSES),
        "nic": set(NICS),
        "boot_mode": set(BOOT_MODES),
        "kind": {"windows", "linux"},
        "mode": {"boot", "fix+verify"},
    }
    groups = [
        ("include", [r for r in spec.include]),
        ("exclude", [r for r in spec.exclude]),
        ("timeouts.rules", [t.rule for t in spec.timeouts]),
        ("known_issues", [k.rule for k in spec.known_issues]),
        ("expect", [e.rule for e in spec.expect]),
    ]
    for group, rules in groups:
        for i, rule in enumerate(rules):
            for key, want in rule.match.items():
                if key not in known:
                    continue
                for value in want if isinstance(want, list) else [want]:
                    if isinstance(value, str) and any(ch in value for ch in "*?["):
                        continue  # a glob
                    if value not in known[key]:
                        where = f"{group}[{i}]" + (".match" if group in ("timeouts.rules", "known_issues", "expect") else "")
                        raise MatrixError(
                            f"{spec.source}: {where}.{key}: {value!r} is not one of {sorted(known[key])}"
                        )
