"""
TOML documents read into validated values: the one copy of the checks every
policy file shares (types, unknown keys, C{mode}, domain pattern lists), and
the one-line L{ConfigError} naming the file, the dotted key and the bad
value, so a user can fix a file without reading a traceback.

Pure core: bytes in, values out; only L{read_file} touches the disk.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

from codex_proxy import domains
from codex_proxy.errors import ProxyError
from codex_proxy.model import Mode


class ConfigError(ProxyError):
    """
    The configuration is unusable; C{str()} is one line for people.

    @ivar source: the file name (or C{"<defaults>"}, C{"<environment>"}).
    @ivar key: the dotted key at fault, or C{None} for the file as a whole.
    @ivar message: what is wrong with it.
    """

    def __init__(self, source: str, key: Optional[str], message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


def readonly(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """
    A read-only copy of C{mapping}, for the tables of frozen values.
    """
    return MappingProxyType(dict(mapping))


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def is_table(value: Any) -> bool:
    return isinstance(value, dict)


def quote(name: str) -> str:
    """
    A TOML key as the user would write it: bare when possible.
    """
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return json.dumps(name, ensure_ascii=False)


def show(value: Any) -> str:
    """
    A value as TOML would spell it, prefixed by its TOML type.
    """
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    names = {int: "integer", float: "float", str: "string", list: "array"}
    kind = names.get(type(value), "table" if isinstance(value, dict) else "datetime")
    return f"{kind} {value!r}"


#: The shortest client or operations token accepted (SPEC §11, §13).
MIN_TOKEN_LENGTH = 16


@attrs.frozen
class Table:
    """
    A TOML table being validated, with where it sits for messages.
    """

    values: Mapping[str, Any]
    source: str
    path: str

    def key(self, name: str) -> str:
        return f"{self.path}.{quote(name)}" if self.path else quote(name)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def check_keys(self, known: Iterable[str]) -> None:
        """
        Refuse unknown keys, suggesting the closest known one.
        """
        known = tuple(known)
        for name in self.values:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "known keys: " + ", ".join(known)
                )
                raise self.error(self.key(name), f"unknown key ({hint})")

    def get(
        self, name: str, default: Any, accept: Callable[[Any], bool], expected: str
    ) -> Any:
        """
        The value of C{name} if C{accept(value)}, C{default} if absent.
        """
        if name not in self.values:
            return default
        value = self.values[name]
        if not accept(value):
            raise self.error(self.key(name), f"expected {expected}, got {show(value)}")
        return value

    def boolean(self, name: str, default: Any) -> Any:
        return self.get(name, default, is_bool, "a boolean")

    def mode(self, name: str) -> Optional[Mode]:
        """
        The C{"full"}/C{"limited"} value of C{name}, C{None} if absent.
        """
        text = self.get(name, None, is_str, "a string")
        if text is None:
            return None
        if text not in ("full", "limited"):
            raise self.error(
                self.key(name), f"unknown value {text!r} (expected 'full' or 'limited')"
            )
        return Mode(text)

    def strings(self, name: str) -> list[tuple[str, str]]:
        """
        A list of strings, each with its dotted key and index.
        """
        values = self.get(name, [], _is_list, "an array of strings")
        key = self.key(name)
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error(f"{key}[{index}]", f"expected a string, got {show(value)}")
        return [(value, f"{key}[{index}]") for index, value in enumerate(values)]

    def table(self, name: str) -> Table:
        values = self.get(name, {}, is_table, "a table")
        return Table(values, self.source, self.key(name))

    def pattern(self, text: str, key: str, deny: bool = False) -> str:
        """
        The canonical text of the domain pattern C{text} found at C{key}
        (of a denylist when C{deny}, which alone accepts C{*:PORT}).
        """
        try:
            return domains.parse_pattern(text, deny=deny).text
        except domains.PatternError as e:
            reason = str(e)
            if repr(text) not in reason:
                reason = f"invalid pattern {text!r}: {reason}"
            raise self.error(key, reason) from None

    def token(self, name: str, file_name: str) -> Optional[str]:
        """
        A bearer token given inline (C{name}) or in a file (C{file_name}),
        C{None} if neither is set. The value is never part of a message.

        @raise ConfigError: both keys set; the file is a symlink, readable
            by group or others, or unreadable; the token (without a
            trailing newline) is shorter than L{MIN_TOKEN_LENGTH}.
        """
        inline: Optional[str] = self.get(name, None, is_str, "a string")
        path = self.get(file_name, None, is_str, "a string")
        if inline is not None and path is not None:
            raise self.error(self.key(name), f"set either {name} or {file_name}, not both")
        if path is not None:
            key = self.key(file_name)
            try:
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    raise self.error(key, f"{path!r} is a symlink; name the file itself")
                if info.st_mode & 0o077:
                    raise self.error(
                        key,
                        f"{path!r} is readable by group or others"
                        f" (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
                    )
                with open(path, encoding="utf-8") as f:
                    inline = f.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise self.error(key, f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None
        else:
            key = self.key(name)
        if inline is not None and len(inline) < MIN_TOKEN_LENGTH:
            raise self.error(key, f"a token needs at least {MIN_TOKEN_LENGTH} characters")
        return inline

    def patterns(self, name: str, into: dict[str, str], deny: bool = False) -> None:
        """
        Add the canonical patterns of the array C{name} to C{into}, each
        mapped to where it first appeared (C{"file: dotted.key[index]"}).
        """
        for text, key in self.strings(name):
            into.setdefault(self.pattern(text, key, deny), f"{self.source}: {key}")


def pattern_lists(table: Table) -> tuple[dict[str, str], dict[str, str]]:
    """
    The C{allowed_domains} and C{denied_domains} arrays of C{table} as
    canonical pattern -> where it first appeared; a pattern in both lists is
    kept only as denied (fail closed).
    """
    allowed: dict[str, str] = {}
    denied: dict[str, str] = {}
    table.patterns("allowed_domains", allowed)
    table.patterns("denied_domains", denied, deny=True)
    return {text: where for text, where in allowed.items() if text not in denied}, denied


def read_file(path: str, what: str) -> bytes:
    """
    The bytes of the file at C{path}.

    @param what: what the file is, for the message (C{"config file"}).
    @raise ConfigError: the file cannot be read, naming it.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read {what}: {e.strerror}") from None


def load_toml(data: bytes, source: str) -> dict[str, Any]:
    """
    Decode a TOML document.

    @raise ConfigError: it is not UTF-8, not TOML, or nested deeper than
        the parser can follow, naming C{source}.
    """
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"not valid UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(source, None, "invalid TOML: values nested too deeply") from None
