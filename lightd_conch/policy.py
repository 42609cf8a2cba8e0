"""
A container's policy: what its logins may do to its volume, and who may log in.

L{Policy} is the value (its defaults are the service without a policy); it is
kept in the store beside the credential record, changed with L{Policy.patched},
which refuses a bad key or value with a L{PolicyError} naming the key, and read
by the per-login volume (L{lightd_conch.volume}), the login gate and rsync's
builder.  L{parseSetting} reads the CLI's C{KEY=VALUE} form.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from typing import Optional, Tuple

import pathspec

from ._address import addressIn

MAX_LIST = 100
"""Entries of C{allowed_ips} or C{denylist} a policy may hold."""
MAX_PATTERN = 1024
MAX_BYTES = 2**62
"""The largest quota or bandwidth (bytes, bytes per second): no sum of them overflows."""
MAX_SESSIONS = 1_000_000

_SIZE_SUFFIXES = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class PolicyError(ValueError):
    """
    A refused policy change.  C{str()} names the key and says why.

    @ivar key: the key at fault.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Policy:
    """
    One container's policy.  See README.rst, "Policy", for what each key does
    in each protocol.
    """

    read_only: bool = False
    suspended: bool = False
    quota_bytes: int = 0
    max_sessions: int = 0
    allowed_ips: Tuple[str, ...] = ()
    bandwidth_up: int = 0
    bandwidth_down: int = 0
    denylist: Tuple[str, ...] = ()
    password_login: bool = True

    # -- reading and writing ------------------------------------------------

    def toJSON(self) -> dict:
        record = asdict(self)
        record["allowed_ips"] = list(self.allowed_ips)
        record["denylist"] = list(self.denylist)
        return record

    @classmethod
    def fromJSON(cls, record: Optional[dict]) -> "Policy":
        """
        The policy stored as C{record} (None: the defaults).  Keys this
        version does not know are ignored, so an older daemon reads what a
        newer CLI wrote.
        """
        if not record:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls().patched({k: v for k, v in record.items() if k in known})

    def encode(self) -> bytes:
        return json.dumps(self.toJSON(), sort_keys=True).encode("utf-8")

    @classmethod
    def decode(cls, data: Optional[bytes]) -> "Policy":
        return cls.fromJSON(None if data is None else json.loads(data))

    def patched(self, changes: dict) -> "Policy":
        """
        This policy with C{changes} (key -> JSON value) made.

        @raise PolicyError: an unknown key, or a value of the wrong type or
            out of range; nothing is changed.
        """
        if not isinstance(changes, dict):
            raise PolicyError("policy", "must be a JSON object")
        known = {f.name: f for f in fields(self)}
        values = {}
        for key, value in changes.items():
            if key not in known:
                raise PolicyError(str(key)[:64], "unknown policy key")
            values[key] = _CHECKS[key](key, value)
        return replace(self, **values)

    # -- derived, computed once per value --------------------------------------

    @cached_property
    def networks(self) -> tuple:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_ips)

    def admits(self, host: str) -> bool:
        """
        Whether a login from address C{host} is allowed; an IPv4-mapped
        IPv6 address is compared as the IPv4 address it maps.
        """
        if not self.allowed_ips:
            return True
        return addressIn(host, self.networks)

    def refusal(self, host: str, method: str) -> Optional[str]:
        """
        Why a login from C{host} by C{method} (C{"password"},
        C{"publickey"}) is refused, or None if it is allowed.
        """
        if self.suspended:
            return "the container is suspended"
        if not self.admits(host):
            return "logins from this address are not allowed for this container"
        if method == "password" and not self.password_login:
            return "password logins are disabled for this container"
        return None

    @cached_property
    def _denied(self) -> Optional[pathspec.GitIgnoreSpec]:
        if not self.denylist:
            return None
        return pathspec.GitIgnoreSpec.from_lines(self.denylist)

    @cached_property
    def denylistNested(self) -> bool:
        """
        Whether a pattern names entries by a path of several components
        (C{"config/secrets/"}): those a rename of a folder above them takes
        from under their pattern.  A pattern of one name (C{"*.jar"},
        C{"secrets/"}) matches wherever the entry goes.
        """
        return any("/" in p.lstrip("!").strip("/") for p in self.denylist)

    def denies(self, parts: Tuple[bytes, ...], isFolder: bool = False) -> bool:
        """
        Whether the denylist hides the entry at C{parts} (a normalised
        virtual path, as components beneath the root), or any folder it is
        in.  The root itself is never hidden.
        """
        spec = self._denied
        if spec is None or not parts:
            return False
        path = b"/".join(parts).decode("utf-8", "surrogateescape")
        if isFolder:
            path += "/"
        return spec.match_file(path)


# -- checks of each key's value ----------------------------------------------------


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(key, f"must be true or false, got {_show(value)}")
    return value


def _count(limit: int):
    def check(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise PolicyError(key, f"must be an integer 0..{limit}, got {_show(value)}")
        return value

    return check


def _list(key: str, value: object) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(key, f"must be a list of strings, got {_show(value)}")
    if len(value) > MAX_LIST:
        raise PolicyError(key, f"holds at most {MAX_LIST} entries, got {len(value)}")
    return value


def _networks(key: str, value: object) -> Tuple[str, ...]:
    result = []
    for entry in _list(key, value):
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise PolicyError(key, f"not an address or network: {_show(entry)}") from None
        if network.version == 6 and network.network_address.ipv4_mapped is not None and (
            network.prefixlen >= 96
        ):
            # ::ffff:192.0.2.0/120 is 192.0.2.0/24: compared as IPv4.
            network = ipaddress.ip_network(
                f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}"
            )
        result.append(str(network))
    return tuple(result)


def _patterns(key: str, value: object) -> Tuple[str, ...]:
    entries = _list(key, value)
    for entry in entries:
        if not entry.strip() or len(entry) > MAX_PATTERN or any(
            c in entry for c in "\0\n\r"
        ):
            raise PolicyError(
                key,
                f"each pattern must be 1 to {MAX_PATTERN} characters on one line, got {_show(entry)}",
            )
    try:
        pathspec.GitIgnoreSpec.from_lines(entries)
    except Exception as e:
        raise PolicyError(key, f"not a gitignore pattern: {e}") from None
    return tuple(entries)


_CHECKS = {
    "read_only": _bool,
    "suspended": _bool,
    "quota_bytes": _count(MAX_BYTES),
    "max_sessions": _count(MAX_SESSIONS),
    "allowed_ips": _networks,
    "bandwidth_up": _count(MAX_BYTES),
    "bandwidth_down": _count(MAX_BYTES),
    "denylist": _patterns,
    "password_login": _bool,
}


def _show(value: object) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 72 else text[:69] + "..."


# -- the CLI's KEY=VALUE ---------------------------------------------------------


def parseSetting(setting: str) -> Tuple[str, object]:
    """
    C{KEY=VALUE} as the key and its JSON value: booleans as true/false
    (yes/no, on/off, 1/0), sizes as integers with an optional K, M, G or T
    suffix (powers of 1024), lists as comma-separated entries (empty: none).

    @raise PolicyError: not C{KEY=VALUE}, an unknown key, or a value that
        does not read as the key's type.
    """
    key, sep, text = setting.partition("=")
    key = key.strip()
    if not sep:
        raise PolicyError(key or setting, "expected KEY=VALUE")
    check = _CHECKS.get(key)
    if check is None:
        raise PolicyError(key, "unknown policy key")
    text = text.strip()
    if check is _bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return key, True
        if lowered in _FALSE:
            return key, False
        raise PolicyError(key, f"must be true or false, got {_show(text)}")
    if check in (_networks, _patterns):
        return key, [entry.strip() for entry in text.split(",") if entry.strip()]
    number, multiplier = text, 1
    if number[-1:].upper() in _SIZE_SUFFIXES:
        number, multiplier = number[:-1], _SIZE_SUFFIXES[number[-1:].upper()]
    if not number.isdigit():
        raise PolicyError(key, f"must be a whole number (K, M, G, T suffixes), got {_show(text)}")
    return key, int(number) * multiplier
