"""The configuration: one frozen msgspec tree, and a loader that reports every problem.

msgspec stops at the first decoding error, but ``check`` must list every
problem at once. So the loader first walks the raw TOML against the struct
definitions, field by field, collecting problems with their key paths; only a
clean document is converted into the structs, and then the cross-field rules
run (again collecting everything).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta, Struct, field

from .durations import DURATION_HINT, parse_duration
from .errors import ConfigError
from .filesystems import is_within

NonNegative = Annotated[int, Meta(ge=0)]
Command = str | list[str]

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_STATE_DIR = "/var/lib/pibackup-async"


class _Model(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Host(_Model, frozen=True, kw_only=True):
    address: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    max_sessions: Annotated[int, Meta(ge=1)] = 2
    sudo: bool = False


class Hook(_Model, frozen=True, kw_only=True):
    name: str
    pre: Command | None = None
    post: Command | None = None
    critical: bool = False
    timeout: str = "1h"
    host: str | None = None
    env: dict[str, str] = {}

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)


class _SourceBase(_Model, frozen=True, kw_only=True, tag_field="type"):
    name: str
    path: str
    host: str | None = None
    rsync_args: list[str] = []
    rsync_ok_codes: list[int] = field(default_factory=lambda: [0, 24])
    timeout: str | None = None
    optional: bool = False

    @property
    def timeout_s(self) -> float | None:
        return None if self.timeout is None else parse_duration(self.timeout)


class RsyncSource(_SourceBase, frozen=True, kw_only=True, tag="rsync"):
    exclude: list[str] = []

    @property
    def kind(self) -> str:
        return "rsync"


class BtrfsSource(_SourceBase, frozen=True, kw_only=True, tag="btrfs"):
    snapshot_dir: str | None = None

    @property
    def kind(self) -> str:
        return "btrfs"


Source = RsyncSource | BtrfsSource


class Retention(_Model, frozen=True, kw_only=True):
    keep_last: NonNegative | None = None
    keep_hourly: NonNegative | None = None
    keep_daily: NonNegative | None = None
    keep_weekly: NonNegative | None = None
    keep_monthly: NonNegative | None = None
    keep_yearly: NonNegative | None = None
    keep_within: str | None = None


class Smtp(_Model, frozen=True, kw_only=True):
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    ca_file: str | None = None
    timeout: str = "30s"


class ReportSettings(_Model, frozen=True, kw_only=True):
    sender: str = field(name="from")
    to: list[str]
    smtp: Smtp
    when: Literal["always", "failure", "never"] = "always"


class Config(_Model, frozen=True, kw_only=True):
    destination: str
    require_mountpoint: bool = False
    concurrency: Annotated[int, Meta(ge=1)] = 2
    state_dir: str = DEFAULT_STATE_DIR
    lock_file: str | None = None
    retention: Retention | None = None
    hosts: dict[str, Host] = {}
    backup_hooks: list[Hook] = []
    snapshot_hooks: list[Hook] = []
    sources: list[Source] = []
    report: ReportSettings | None = None

    @property
    def lock_path(self) -> str:
        return self.lock_file or os.path.join(self.state_dir, "lock")

    @property
    def reports_dir(self) -> str:
        return os.path.join(self.state_dir, "reports")


def load_config(path: str) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises ConfigError listing every problem, each as ``key path: what was
    expected``; nothing is created or changed on disk.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    problems = list(_shape_problems(Config, raw, ""))
    if problems:
        raise ConfigError(path, problems)
    config = msgspec.convert(raw, Config)
    problems = list(_rule_problems(config))
    if problems:
        raise ConfigError(path, problems)
    return config


# --- shape: every key against the struct definitions ---------------------------------

_FRIENDLY_UNKNOWN = {
    ("RsyncSource", "snapshot_dir"): "snapshot_dir is only for btrfs sources",
    ("BtrfsSource", "exclude"): "a btrfs snapshot is whole; exclude is only for rsync sources",
    ("Smtp", "password"): "a password is never written in the file; use password_file or "
    "password_env",
}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _struct_of(tp: Any) -> type[Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Struct) else None


def _shape_problems(cls: type[Struct], data: Any, path: str) -> Iterator[str]:
    where = path or "the top level"
    if not isinstance(data, Mapping):
        yield f"{where}: expected a table, got {type(data).__name__}"
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    tag_field = cls.__struct_config__.tag_field
    for key in data:
        if key not in fields and key != tag_field:
            hint = _FRIENDLY_UNKNOWN.get((cls.__name__, key), "unknown key")
            yield f"{_join(path, key)}: {hint}"
    for f in fields.values():
        if f.required and f.encode_name not in data:
            yield f"{_join(path, f.encode_name)}: required key is missing"
    for key, value in data.items():
        if key in fields:
            yield from _value_problems(fields[key].type, value, _join(path, key))


def _value_problems(tp: Any, value: Any, path: str) -> Iterator[str]:
    origin = get_origin(tp)
    args = get_args(tp)
    union = origin in (Union, types.UnionType)
    if union and set(args) == {RsyncSource, BtrfsSource}:
        kind = value.get("type") if isinstance(value, Mapping) else None
        if kind not in ("rsync", "btrfs"):
            yield f'{_join(path, "type")}: expected "rsync" or "btrfs", got {kind!r}'
            return
        yield from _shape_problems(RsyncSource if kind == "rsync" else BtrfsSource, value, path)
        return
    struct = _struct_of(tp)
    if struct is not None:
        yield from _shape_problems(struct, value, path)
        return
    if origin is list and (_struct_of(args[0]) or args[0] is Source):
        if not isinstance(value, list):
            yield f"{path}: expected an array of tables, got {type(value).__name__}"
            return
        for i, item in enumerate(value):
            yield from _value_problems(args[0], item, _join(path, i))
        return
    if origin is dict and _struct_of(args[1]):
        if not isinstance(value, Mapping):
            yield f"{path}: expected a table, got {type(value).__name__}"
            return
        for key, item in value.items():
            yield from _shape_problems(args[1], item, _join(path, key))
        return
    if (
        union
        and type(None) in args
        and any(_struct_of(a) for a in args)
        and value is not None
    ):
        inner = next(a for a in args if _struct_of(a))
        yield from _shape_problems(inner, value, path)
        return
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as e:
        message = str(e)
        inner_path = ""
        if " - at `$" in message:
            message, _, at = message.partition(" - at `$")
            inner_path = at.rstrip("`")
        yield f"{path}{inner_path}: {message[0].lower()}{message[1:]}"


# --- rules across fields ----------------------------------------------------------------


def _rule_problems(config: Config) -> Iterator[str]:
    yield from _path_problems(config)
    yield from _hook_problems(config)
    yield from _source_problems(config)
    yield from _retention_problems(config.retention)
    yield from _report_problems(config.report)


def _absolute(path: str, value: str | None) -> Iterator[str]:
    if value is not None and not os.path.isabs(value):
        yield f"{path}: expected an absolute path, got {value!r}"


def _path_problems(config: Config) -> Iterator[str]:
    yield from _absolute("destination", config.destination)
    yield from _absolute("state_dir", config.state_dir)
    yield from _absolute("lock_file", config.lock_file)
    for name, host in config.hosts.items():
        yield from _absolute(f"hosts.{name}.identity_file", host.identity_file)
        yield from _absolute(f"hosts.{name}.known_hosts", host.known_hosts)


def _hook_problems(config: Config) -> Iterator[str]:
    seen: dict[str, str] = {}
    for table, hooks in (("backup_hooks", config.backup_hooks),
                         ("snapshot_hooks", config.snapshot_hooks)):
        for i, hook in enumerate(hooks):
            where = f"{table}[{i}]"
            if hook.name in seen:
                yield f"{where}.name: {hook.name!r} is already the name of {seen[hook.name]}"
            else:
                seen[hook.name] = where
            if hook.pre is None and hook.post is None:
                yield f"{where}: a hook needs pre, post or both"
            for phase, command in (("pre", hook.pre), ("post", hook.post)):
                if command is not None and (not command or command == [""]):
                    yield f"{where}.{phase}: expected a command, got an empty one"
            yield from _duration(f"{where}.timeout", hook.timeout)
            if hook.host is not None:
                yield from _host_problems(config, f"{where}.host", hook.host)


def _host_problems(config: Config, where: str, host: str) -> Iterator[str]:
    if host not in config.hosts:
        defined = ", ".join(sorted(config.hosts)) or "none"
        yield f"{where}: host {host!r} is not defined in [hosts] (defined: {defined})"


def _source_problems(config: Config) -> Iterator[str]:
    if not config.sources:
        yield "sources: at least one [[sources]] table is required"
    seen: dict[str, int] = {}
    for i, source in enumerate(config.sources):
        where = f"sources[{i}]"
        if not SOURCE_NAME.fullmatch(source.name):
            yield (f"{where}.name: expected a plain folder name "
                   f"([A-Za-z0-9][A-Za-z0-9._-]*), got {source.name!r}")
        if source.name in seen:
            first = seen[source.name]
            yield f"{where}.name: {source.name!r} is already the name of sources[{first}]"
        else:
            seen[source.name] = i
        yield from _absolute(f"{where}.path", source.path)
        if source.timeout is not None:
            yield from _duration(f"{where}.timeout", source.timeout)
        if source.host is not None:
            yield from _host_problems(config, f"{where}.host", source.host)
        elif os.path.isabs(source.path) and os.path.isabs(config.destination):
            if os.path.normpath(source.path) == os.path.normpath(config.destination):
                yield f"{where}.path: the destination cannot also be a source"
            elif is_within(source.path, config.destination):
                yield f"{where}.path: a source cannot lie inside the destination"
            elif isinstance(source, BtrfsSource) and is_within(config.destination, source.path):
                yield f"{where}.path: the destination cannot lie inside a btrfs source"
        if isinstance(source, BtrfsSource):
            yield from _absolute(f"{where}.snapshot_dir", source.snapshot_dir)


def _duration(where: str, text: str) -> Iterator[str]:
    try:
        parse_duration(text)
    except ValueError:
        yield f"{where}: expected {DURATION_HINT}, got {text!r}"


RETENTION_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                    "keep_monthly", "keep_yearly")


def _retention_problems(retention: Retention | None) -> Iterator[str]:
    if retention is None:
        return
    if retention.keep_within is not None:
        yield from _duration("retention.keep_within", retention.keep_within)
    counts = [getattr(retention, key) for key in RETENTION_COUNTS]
    within = retention.keep_within
    if not any(counts) and (within is None or _zero_duration(within)):
        yield ("retention: the table has no rule that keeps anything; leave [retention] out "
               "to keep every backup")


def _zero_duration(text: str) -> bool:
    try:
        return parse_duration(text) == 0
    except ValueError:
        return False


def _report_problems(report: ReportSettings | None) -> Iterator[str]:
    if report is None:
        return
    if not report.to:
        yield "report.to: expected at least one recipient"
    smtp = report.smtp
    if smtp.password_file is not None and smtp.password_env is not None:
        yield "report.smtp: give password_file or password_env, not both"
    if smtp.username is not None and smtp.password_file is None and smtp.password_env is None:
        yield "report.smtp.username: a login needs password_file or password_env"
    yield from _absolute("report.smtp.password_file", smtp.password_file)
    yield from _absolute("report.smtp.ca_file", smtp.ca_file)
    yield from _duration("report.smtp.timeout", smtp.timeout)
