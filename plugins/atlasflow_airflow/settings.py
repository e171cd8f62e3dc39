"""Apply ``airflow_settings.yaml`` (Astro CLI format) to a plain Airflow installation.

The Astro CLI reads this file itself; plain Airflow does not, so ``make airflow-settings`` runs
``python -m atlasflow_airflow.settings apply airflow_settings.yaml``. Applying is idempotent:
pools, connections and variables are created or updated to match the file, nothing else is
touched. Parsing is pure (no Airflow import) so a malformed file is reported before the
metadata DB is opened.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AirflowSettings", "SettingsError", "apply_settings", "parse_settings"]

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")


class SettingsError(ValueError):
    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class PoolSpec:
    name: str
    slots: int
    description: str = ""
    include_deferred: bool = False


@dataclass(frozen=True)
class ConnectionSpec:
    conn_id: str
    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VariableSpec:
    key: str
    value: str


@dataclass(frozen=True)
class AirflowSettings:
    pools: tuple[PoolSpec, ...] = ()
    connections: tuple[ConnectionSpec, ...] = ()
    variables: tuple[VariableSpec, ...] = ()


_POOL_KEYS = {"pool_name", "pool_slot", "pool_description", "include_deferred"}
_CONN_KEYS = {
    "conn_id", "conn_type", "conn_host", "conn_port", "conn_login", "conn_password", "conn_schema", "conn_extra",
}  # fmt: skip
_VAR_KEYS = {"variable_name", "variable_value"}


def _entries(section: Any, name: str, problems: list[str]) -> list[tuple[str, Mapping[str, Any]]]:
    if section is None:
        return []
    if not isinstance(section, list):
        problems.append(f"airflow.{name}: expected a list, got {type(section).__name__}")
        return []
    out = []
    for i, item in enumerate(section):
        where = f"airflow.{name}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: expected a mapping, got {item!r}")
            continue
        out.append((where, item))
    return out


def _unknown(where: str, item: Mapping[str, Any], known: set[str], problems: list[str]) -> None:
    for key in item:
        if key not in known:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_settings(path: str | Path) -> AirflowSettings:
    """Read and validate an Astro-format settings file; raise :class:`SettingsError` listing every problem."""
    import yaml

    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(source, [f"cannot read: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise SettingsError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("airflow"), Mapping):
        raise SettingsError(source, ["expected a top-level 'airflow:' mapping with pools/connections/variables"])
    root = data["airflow"]
    problems: list[str] = []
    _unknown("airflow", root, {"pools", "connections", "variables"}, problems)

    pools = []
    for where, item in _entries(root.get("pools"), "pools", problems):
        _unknown(where, item, _POOL_KEYS, problems)
        name, slots = _text(item.get("pool_name")), item.get("pool_slot")
        if not name or not _ID_RE.match(name):
            problems.append(f"{where}: pool_name {name!r} is missing or not a valid name")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < -1:
            problems.append(f"{where}: pool_slot must be an integer >= 0 (or -1 for unlimited), got {slots!r}")
        deferred = item.get("include_deferred", False)
        if not isinstance(deferred, bool):
            problems.append(f"{where}: include_deferred must be true or false, got {deferred!r}")
        if name and isinstance(slots, int):
            pools.append(PoolSpec(name, slots, _text(item.get("pool_description")) or "", bool(deferred)))

    connections = []
    for where, item in _entries(root.get("connections"), "connections", problems):
        _unknown(where, item, _CONN_KEYS, problems)
        conn_id, conn_type = _text(item.get("conn_id")), _text(item.get("conn_type"))
        if not conn_id or not _ID_RE.match(conn_id):
            problems.append(f"{where}: conn_id {conn_id!r} is missing or not a valid id")
        if not conn_type:
            problems.append(f"{where}: conn_type is required")
        port = item.get("conn_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            problems.append(f"{where}: conn_port must be an integer 1-65535, got {port!r}")
            port = None
        extra = item.get("conn_extra") or {}
        if isinstance(extra, str):
            try:
                extra = json.loads(extra)
            except ValueError:
                problems.append(f"{where}: conn_extra is a string but not JSON")
                extra = {}
        if not isinstance(extra, Mapping):
            problems.append(f"{where}: conn_extra must be a mapping")
            extra = {}
        if conn_id and conn_type:
            connections.append(
                ConnectionSpec(
                    conn_id, conn_type, _text(item.get("conn_host")), port, _text(item.get("conn_login")),
                    _text(item.get("conn_password")), _text(item.get("conn_schema")), dict(extra),
                )
            )  # fmt: skip

    variables = []
    for where, item in _entries(root.get("variables"), "variables", problems):
        _unknown(where, item, _VAR_KEYS, problems)
        key = _text(item.get("variable_name"))
        if not key or not _ID_RE.match(key):
            problems.append(f"{where}: variable_name {key!r} is missing or not a valid key")
            continue
        value = item.get("variable_value")
        variables.append(VariableSpec(key, "" if value is None else str(value)))

    for kind, names in (
        ("pool", [p.name for p in pools]),
        ("connection", [c.conn_id for c in connections]),
        ("variable", [v.key for v in variables]),
    ):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"duplicate {kind} name(s): {', '.join(dupes)}")
    if problems:
        raise SettingsError(source, problems)
    return AirflowSettings(tuple(pools), tuple(connections), tuple(variables))


def apply_settings(settings: AirflowSettings) -> list[str]:
    """Create or update every pool, connection and variable; return one line per action."""
    # The ORM models, not airflow.sdk: this is an admin tool writing the metadata DB directly,
    # outside any task (the SDK classes go through a running task's API client).
    from airflow.models.connection import Connection
    from airflow.models.pool import Pool
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    actions: list[str] = []
    with create_session() as session:
        for p in settings.pools:
            Pool.create_or_update_pool(p.name, p.slots, p.description, p.include_deferred, session=session)
            actions.append(f"pool {p.name}: {p.slots} slots, include_deferred={p.include_deferred}")
        for c in settings.connections:
            conn = session.query(Connection).filter(Connection.conn_id == c.conn_id).one_or_none()
            verb = "updated" if conn is not None else "created"
            if conn is None:
                conn = Connection(conn_id=c.conn_id)
                session.add(conn)
            conn.conn_type = c.conn_type
            conn.host, conn.port, conn.login, conn.schema = c.host, c.port, c.login, c.schema
            conn.set_password(c.password)
            conn.set_extra(json.dumps(dict(c.extra)) if c.extra else None)
            actions.append(f"connection {c.conn_id} ({c.conn_type}) {verb}")  # never log secrets
        for v in settings.variables:
            Variable.set(v.key, v.value, session=session)
            actions.append(f"variable {v.key} set")
    return actions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atlasflow_airflow.settings", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("check", "validate the file only"), ("apply", "validate, then apply to $AIRFLOW_HOME")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", nargs="?", default="airflow_settings.yaml")
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.file)
    except SettingsError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{exc.source}: {problem}\n")
        return 2
    if args.command == "check":
        sys.stdout.write(
            f"{args.file}: valid ({len(settings.pools)} pools, {len(settings.connections)} connections, "
            f"{len(settings.variables)} variables)\n"
        )
        return 0
    for line in apply_settings(settings):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
