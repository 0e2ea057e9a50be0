"""The configuration: one frozen msgspec tree, and a loader that reports every problem.

msgspec stops at the first decoding error, but ``check`` must list every
problem at once. So the loader walks the raw TOML twice: against the struct
definitions, field by field, and through the cross-field rules (undefined
hosts, duplicate names, nesting paths, ...), collecting problems with their
key paths from both into one listing. Only a clean document is converted
into the structs.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tomllib
import types
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct, field

from .durations import DURATION_HINT, parse_duration
from .errors import ConfigError
from .filesystems import is_within
from .sources.kind import SourceConfig, kinds

NonNegative = Annotated[int, Meta(ge=0)]
Command = str | list[str]

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A host's name is part of its ssh control socket's path, which OpenSSH splits
# at spaces, expands at `%` and which must stay in its folder and under the
# 108 bytes of a socket's address.
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HOST_NAME_MAX = 32
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


class Monitor(_Model, frozen=True, kw_only=True):
    ping_url: str | None = None
    metrics_file: str | None = None


# ``[origin] bwlimit``: bytes per second, ``"500KiB"``, ``"2MiB"``, ``"1GiB"`` (SPEC §10); K, M
# and G (with or without ``iB``/``B``) are the same powers of 1024.
_RATE = re.compile(r"(\d+)\s*([KMG]?)(?:iB|B)?(?:/s)?", re.IGNORECASE)
RATE_HINT = 'bytes per second such as "500KiB", "2MiB" or "1GiB"'


def parse_rate(text: str) -> int:
    """``[origin] bwlimit`` in bytes per second; raise ValueError naming what was expected."""
    match = _RATE.fullmatch(text.strip())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"expected {RATE_HINT}, got {text!r}")
    unit: str = match.group(2).upper() or " "
    count = int(match.group(1))
    return count << (10 * " KMG".index(unit))


class OriginSettings(_Model, frozen=True, kw_only=True):
    """``[origin]``: the destination that ``mirror`` copies (SPEC §10)."""

    host: str | None = None
    path: str
    bwlimit: str | None = None
    timeout: str | None = None

    @property
    def bwlimit_bytes(self) -> int | None:
        return None if self.bwlimit is None else parse_rate(self.bwlimit)

    @property
    def timeout_s(self) -> float:
        return float("inf") if self.timeout is None else parse_duration(self.timeout)


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
    # Each a kind's own struct (engine/sources), chosen by its ``type`` at load.
    sources: list[SourceConfig] = []
    report: ReportSettings | None = None
    monitor: Monitor | None = None
    # Only for ``mirror`` (SPEC §10): the destination this one copies.
    origin: OriginSettings | None = None

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
    except UnicodeDecodeError as e:
        # tomllib decodes the whole file at once: the offset is the file's own.
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(path, [f"not UTF-8 text (TOML files are UTF-8): byte "
                                 f"0x{e.object[e.start]:02x} on line {line}"]) from None
    # The rules read the raw document too, so a wrong type in one table does
    # not hide a duplicate name in another: one listing, every problem.
    problems = list(dict.fromkeys([*_shape_problems(Config, raw, ""), *_rule_problems(raw)]))
    if problems:
        raise ConfigError(path, problems)
    try:
        # One struct per kind, not a union fixed here: the kinds are found at run time.
        sources = [msgspec.convert(item, kinds()[item["type"]].config)
                   for item in raw.get("sources", [])]
        return msgspec.structs.replace(msgspec.convert({**raw, "sources": []}, Config),
                                       sources=sources)
    except msgspec.ValidationError as e:  # the shape pass should have said it; never a traceback
        raise ConfigError(path, [str(e)]) from None


# --- shape: every key against the struct definitions ---------------------------------

_FRIENDLY_UNKNOWN = {
    ("Smtp", "password"): "a password is never written in the file; use password_file or "
    "password_env",
}


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key, ensure_ascii=False)  # as TOML quotes it
    return f"{path}.{key}" if path else key


def _struct_of(tp: Any) -> type[Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Struct) else None


@functools.cache
def _fields_of(cls: type[Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    # Resolving a struct's annotations costs 0.5 ms; a hundred sources asked 800 times.
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


def _shape_problems(cls: type[Struct], data: Any, path: str) -> Iterator[str]:
    where = path or "the top level"
    if not isinstance(data, Mapping):
        yield f"{where}: expected a table, got {type(data).__name__}"
        return
    fields = _fields_of(cls)
    tag_field = cls.__struct_config__.tag_field
    for key in data:
        if key not in fields and key != tag_field:
            hint = _FRIENDLY_UNKNOWN.get((cls.__name__, key)) or _source_key_hint(cls, key)
            yield f"{_join(path, key)}: {hint}"
    for f in fields.values():
        if f.required and f.encode_name not in data:
            yield f"{_join(path, f.encode_name)}: required key is missing"
    for key, value in data.items():
        if key in fields:
            yield from _value_problems(fields[key].type, value, _join(path, key))


def _source_key_hint(cls: type[Struct], key: str) -> str:
    """Why a source's key is unknown: the kind's own hint, or the kinds that have it."""
    if not issubclass(cls, SourceConfig):
        return "unknown key"
    known = kinds()
    kind = known.get(str(cls.__struct_config__.tag))
    if kind is not None and key in kind.key_hints:
        return kind.key_hints[key]
    owners = []
    for tag, other in known.items():
        struct: type[Struct] = other.config
        if key in _fields_of(struct):
            owners.append(tag)
    return f"{key} is only for {' and '.join(owners)} sources" if owners else "unknown key"


def _value_problems(tp: Any, value: Any, path: str) -> Iterator[str]:
    origin = get_origin(tp)
    args = get_args(tp)
    union = origin in (Union, types.UnionType)
    if tp is SourceConfig:
        # A source table's struct is the one its ``type`` names.
        tag = value.get("type") if isinstance(value, Mapping) else None
        kind = kinds().get(tag) if isinstance(tag, str) else None
        if kind is None:
            tags = [f'"{t}"' for t in kinds()]
            expected = " or ".join([", ".join(tags[:-1]), tags[-1]] if len(tags) > 1 else tags)
            yield f'{_join(path, "type")}: expected {expected}, got {tag!r}'
            return
        yield from _shape_problems(kind.config, value, path)
        return
    struct = _struct_of(tp)
    if struct is not None:
        yield from _shape_problems(struct, value, path)
        return
    if origin is list and _struct_of(args[0]):
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
    if origin is dict and isinstance(value, Mapping):
        # Checked one by one, so the message names the key (msgspec says `[...]`).
        for key, item in value.items():
            yield from _value_problems(args[1], item, _join(path, key))
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


# --- rules across fields, on the raw document ------------------------------------------
#
# They run whether or not the shape pass found problems, so every accessor
# below reads defensively: a value of the wrong type counts as absent (the
# shape pass has already named it), and a rule that cannot be judged without
# it stays silent rather than report a consequence of the same mistake.

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOOK_TABLES = ("backup_hooks", "snapshot_hooks")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _items(data: Mapping[str, Any], key: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """The tables of an array of tables, with their index in the file."""
    value = data.get(key)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                yield i, item


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _rule_problems(raw: Mapping[str, Any]) -> Iterator[str]:
    hosts = raw.get("hosts", {})
    # With [hosts] itself malformed, no host reference can be judged.
    defined = set(hosts) if isinstance(hosts, Mapping) else None
    yield from _path_problems(raw)
    yield from _host_table_problems(_table(raw, "hosts"))
    yield from _hook_problems(raw, defined)
    yield from _source_problems(raw, defined)
    yield from _retention_problems(raw.get("retention"))
    yield from _report_problems(raw.get("report"))
    yield from _monitor_problems(raw.get("monitor"))
    yield from _origin_problems(raw, defined)


def _absolute(path: str, value: str | None) -> Iterator[str]:
    if value is None:
        return
    if "\0" in value:
        yield f"{path}: expected a path, got one with a NUL byte"
    elif not os.path.isabs(value):
        yield f"{path}: expected an absolute path, got {value!r}"


def _path_problems(raw: Mapping[str, Any]) -> Iterator[str]:
    for key in ("destination", "state_dir", "lock_file"):
        yield from _absolute(key, _text(raw, key))


def _host_table_problems(hosts: Mapping[str, Any]) -> Iterator[str]:
    for name, host in hosts.items():
        where = _join("hosts", name)
        if not HOST_NAME.fullmatch(name) or len(name) > HOST_NAME_MAX:
            yield (f"{where}: expected a host name of at most {HOST_NAME_MAX} characters "
                   f"([A-Za-z0-9][A-Za-z0-9._-]*), got {name!r}")
        if not isinstance(host, Mapping):
            continue
        yield from _absolute(f"{where}.identity_file", _text(host, "identity_file"))
        yield from _absolute(f"{where}.known_hosts", _text(host, "known_hosts"))
        for key in ("address", "user"):
            value = _text(host, key)
            # ssh would read it as an option (-oProxyCommand=...), not a name.
            if value is not None and value.startswith("-"):
                yield f"{where}.{key}: expected a name that does not start with '-', got {value!r}"
            yield from _nul_problems(f"{where}.{key}", value)


def _hook_problems(raw: Mapping[str, Any], hosts: set[str] | None) -> Iterator[str]:
    seen: dict[str, str] = {}
    for table in HOOK_TABLES:
        for i, hook in _items(raw, table):
            where = f"{table}[{i}]"
            name = _text(hook, "name")
            if name is not None and name in seen:
                yield f"{where}.name: {name!r} is already the name of {seen[name]}"
            elif name is not None:
                seen[name] = where
            if "pre" not in hook and "post" not in hook:
                yield f"{where}: a hook needs pre, post or both"
            for phase in ("pre", "post"):
                command = hook.get(phase)
                if command in ("", [], [""]):
                    yield f"{where}.{phase}: expected a command, got an empty one"
                yield from _nul_problems(f"{where}.{phase}", command)
            yield from _timeout(f"{where}.timeout", _text(hook, "timeout"))
            yield from _env_problems(f"{where}.env", _table(hook, "env"))
            yield from _host_problems(hosts, f"{where}.host", _text(hook, "host"))


def _env_problems(where: str, env: Mapping[str, Any]) -> Iterator[str]:
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            yield (f"{_join(where, name)}: expected a shell variable name "
                   f"([A-Za-z_][A-Za-z0-9_]*), got {name!r}")
        elif isinstance(value, str) and "\0" in value:
            yield f"{_join(where, name)}: expected a value without a NUL byte"


def _nul_problems(where: str, value: Any) -> Iterator[str]:
    """No program can be given a NUL byte: it ends a C string."""
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and "\0" in text for text in texts):
        yield f"{where}: expected text without a NUL byte"


# rsync writes into the existing file with them: a file that earlier backups
# share through --link-dest would change in every one of them.
_REWRITING_ARGS = ("--inplace", "--append", "--append-verify")


def _rewriting_args(where: str, value: Any) -> Iterator[str]:
    for arg in value if isinstance(value, list) else []:
        if isinstance(arg, str) and arg.partition("=")[0] in _REWRITING_ARGS:
            yield (f"{where}: {arg} is refused: rsync would rewrite files that earlier "
                   "backups share (hard links)")


def _host_problems(hosts: set[str] | None, where: str, host: str | None) -> Iterator[str]:
    if hosts is not None and host is not None and host not in hosts:
        listed = ", ".join(sorted(hosts)) or "none"
        yield f"{where}: host {host!r} is not defined in [hosts] (defined: {listed})"


def _source_problems(raw: Mapping[str, Any], hosts: set[str] | None) -> Iterator[str]:
    # A mirror copies and backs up nothing (SPEC §10): _origin_problems refuses sources.
    if raw.get("sources", []) == [] and "origin" not in raw:
        yield "sources: at least one [[sources]] table is required"
    destination = _text(raw, "destination")
    seen: dict[str, int] = {}
    for i, source in _items(raw, "sources"):
        where = f"sources[{i}]"
        name = _text(source, "name")
        if name is not None and not SOURCE_NAME.fullmatch(name):
            yield (f"{where}.name: expected a plain folder name "
                   f"([A-Za-z0-9][A-Za-z0-9._-]*), got {name!r}")
        if name is not None and name in seen:
            yield f"{where}.name: {name!r} is already the name of sources[{seen[name]}]"
        elif name is not None:
            seen[name] = i
        path = _text(source, "path")
        yield from _absolute(f"{where}.path", path)
        for key in ("rsync_args", "exclude"):
            yield from _nul_problems(f"{where}.{key}", source.get(key))
        yield from _rewriting_args(f"{where}.rsync_args", source.get("rsync_args"))
        yield from _timeout(f"{where}.timeout", _text(source, "timeout"))
        tag = source.get("type")
        kind = kinds().get(tag) if isinstance(tag, str) else None
        # A copy that cannot leave the destination out must not hold it.
        whole = kind.tag if kind is not None and not kind.leaves_out_own_folders else None
        if "host" in source:
            yield from _host_problems(hosts, f"{where}.host", _text(source, "host"))
        elif path is not None and destination is not None:
            yield from _nesting_problems(f"{where}.path", path, destination, whole=whole)
        for key in kind.path_keys if kind is not None else ():
            yield from _absolute(f"{where}.{key}", _text(source, key))
        for line in kind.key_problems(source) if kind is not None else ():
            yield f"{where}.{line}"


def _nesting_problems(where: str, source: str, destination: str, *,
                      whole: str | None) -> Iterator[str]:
    """Backups must never nest: compare where the paths lead, not how they are written."""
    if not all(os.path.isabs(p) and "\0" not in p for p in (source, destination)):
        return  # _absolute has said so
    real_source, real_dest = os.path.realpath(source), os.path.realpath(destination)
    resolved = ""
    if (real_source, real_dest) != (os.path.normpath(source), os.path.normpath(destination)):
        resolved = (f" (after resolving symbolic links: source {real_source}, "
                    f"destination {real_dest})")
    if real_source == real_dest:
        yield f"{where}: the destination cannot also be a source{resolved}"
    elif is_within(real_source, real_dest):
        yield f"{where}: a source cannot lie inside the destination{resolved}"
    elif whole is not None and is_within(real_dest, real_source):
        yield f"{where}: the destination cannot lie inside a {whole} source{resolved}"


def _duration(where: str, text: str | None) -> Iterator[str]:
    if text is None:
        return
    try:
        parse_duration(text)
    except ValueError:
        yield f"{where}: expected {DURATION_HINT}, got {text!r}"


def _timeout(where: str, text: str | None) -> Iterator[str]:
    """A timeout of zero would fail every run at its first step."""
    problems = list(_duration(where, text))
    yield from problems
    if not problems and text is not None and parse_duration(text) <= 0:
        yield f"{where}: expected a duration longer than zero, got {text!r}"


RETENTION_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                    "keep_monthly", "keep_yearly")


def _retention_problems(retention: Any) -> Iterator[str]:
    if not isinstance(retention, Mapping):
        return
    within = _text(retention, "keep_within")
    yield from _duration("retention.keep_within", within)
    # "Keeps nothing" is judged only on a table whose every key is valid: a
    # misspelt key or a negative count is its own problem, already named.
    valid = all(
        (key in RETENTION_COUNTS and _count(value))
        or (key == "keep_within" and isinstance(value, str))
        for key, value in retention.items()
    )
    counts = [retention.get(key) for key in RETENTION_COUNTS]
    if valid and not any(counts) and (within is None or _zero_duration(within)):
        yield ("retention: the table has no rule that keeps anything; leave [retention] out "
               "to keep every backup")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _zero_duration(text: str) -> bool:
    try:
        return parse_duration(text) == 0
    except ValueError:
        return False


def _report_problems(report: Any) -> Iterator[str]:
    if not isinstance(report, Mapping):
        return
    if report.get("to") == []:
        yield "report.to: expected at least one recipient"
    smtp = _table(report, "smtp")
    if "password_file" in smtp and "password_env" in smtp:
        yield "report.smtp: give password_file or password_env, not both"
    if "username" in smtp and "password_file" not in smtp and "password_env" not in smtp:
        yield "report.smtp.username: a login needs password_file or password_env"
    yield from _absolute("report.smtp.password_file", _text(smtp, "password_file"))
    yield from _absolute("report.smtp.ca_file", _text(smtp, "ca_file"))
    yield from _timeout("report.smtp.timeout", _text(smtp, "timeout"))


def _monitor_problems(monitor: Any) -> Iterator[str]:
    if not isinstance(monitor, Mapping):
        return
    url = _text(monitor, "ping_url")
    if url is not None:
        expected = f"monitor.ping_url: expected an http:// or https:// URL, got {url!r}"
        try:
            parts = urlsplit(url)
            _ = parts.port  # parsed when read: out of range, it would fail the ping instead
        except ValueError as e:  # an unclosed or misused [...] host, a port out of range
            yield f"{expected} ({e})"
        else:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                yield expected
    yield from _absolute("monitor.metrics_file", _text(monitor, "metrics_file"))


def _origin_problems(raw: Mapping[str, Any], hosts: set[str] | None) -> Iterator[str]:
    """``[origin]`` (SPEC §4, §10): a mirror copies, it does not back up."""
    if "origin" not in raw:
        return
    for key in ("sources", "snapshot_hooks"):
        if raw.get(key):
            yield (f"{key}: a configuration with [origin] mirrors another destination; it "
                   f"has no [[{key}]] (a mirror copies, it does not back up)")
    origin = _table(raw, "origin")
    path = _text(origin, "path")
    yield from _absolute("origin.path", path)
    host = _text(origin, "host")
    yield from _host_problems(hosts, "origin.host", host)
    host_table = _table(_table(raw, "hosts"), host) if host is not None else {}
    if host_table.get("sudo") is True:
        yield (f"origin.host: host {host!r} has sudo = true; the origin is read by the key's "
               "own user (`serve` refuses sudo): give the mirror a [hosts] entry without sudo")
    destination = _text(raw, "destination")
    if (host is None and path is not None and destination is not None
            and all(os.path.isabs(p) and "\0" not in p for p in (path, destination))
            and os.path.realpath(path) == os.path.realpath(destination)):
        yield "origin.path: the origin cannot be this configuration's own destination"
    bwlimit = _text(origin, "bwlimit")
    if bwlimit is not None:
        try:
            parse_rate(bwlimit)
        except ValueError as e:
            yield f"origin.bwlimit: {e}"
    yield from _timeout("origin.timeout", _text(origin, "timeout"))


def command_problem(config: Config, command: str) -> str | None:
    """Why ``command`` cannot run with this configuration (exit 2), or None (SPEC §4)."""
    if command == "run" and config.origin is not None:
        return ("run: this configuration has [origin]: it is a mirror, made by "
                "`pibackup-async mirror`, not `run`")
    if command == "mirror" and config.origin is None:
        return "mirror: the configuration has no [origin] table (the destination to copy)"
    return None
