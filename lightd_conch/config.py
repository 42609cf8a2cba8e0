"""
config.json: the one place that knows its keys, their types and defaults.

L{load} turns the file into frozen dataclasses with every default filled in
and every path absolute, or raises L{ConfigError} naming the file and the
key.  It writes nothing: creating folders, keys and tokens is the service's
job, and a refused configuration must leave the host as it found it.

L{warnIfExposed} is the one check of the mode of a secret file the
configuration leads to (the admin API token, the SSH host key).
"""

import difflib
import ipaddress
import json
import math
import os
import stat
from dataclasses import dataclass, field

from twisted.logger import Logger

log = Logger()


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str()} is one line naming the file
    and, where there is one, the dotted key.
    """

    def __init__(self, path: str, key: "str | None", problem: str) -> None:
        super().__init__(path, key, problem)
        self.path = path
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.key is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path}: {self.key}: {self.problem}"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """
    The admin HTTP API's bind address.
    """

    host: str = "127.0.0.1"
    port: int = 8070


@dataclass(frozen=True, kw_only=True)
class AuthorizationConfig:
    """
    The admin API's bearer token; an empty token means "generate one".
    """

    enabled: bool = True
    token: str = ""


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """
    Where state and container volumes live; both paths are absolute.
    """

    base_path: str
    volumes_path: str


# The packet protections the transport implements (lightd_conch.ciphers), and
# the ones offered by default: every one, in OpenSSH's order (AEAD, then the
# -etm MACs, then the plain HMACs).  The plain HMACs come after the -etm forms,
# so a client that has both picks -etm; they are offered because libssh2 up to
# 1.10 (Debian 12's curl, PHP's ssh2 and most tools built on it) has no AEAD
# cipher and no -etm MAC and could not connect at all without them.
SUPPORTED_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
SUPPORTED_MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
DEFAULT_CIPHERS = SUPPORTED_CIPHERS
DEFAULT_MACS = SUPPORTED_MACS


@dataclass(frozen=True, kw_only=True)
class DefenderConfig:
    """
    The brute-force defender: failed logins score per source address (1 for
    a known user, 2 for an unknown one); reaching C{threshold} within
    C{observation_time} seconds bans the address for C{ban_time} seconds,
    each further ban half as long again.  C{safe_list} networks are never
    banned.
    """

    enabled: bool = True
    threshold: int = 15
    observation_time: float = 1800.0
    ban_time: float = 1800.0
    safe_list: tuple = ()


@dataclass(frozen=True, kw_only=True)
class SFTPConfig:
    """
    The SFTP listener and its limits.  Times are seconds; an C{idle_timeout}
    or C{login_grace_time} of 0 disables that timer.  C{host_key} is absolute,
    and so is C{audit_log} unless it is C{""} (no audit log).
    """

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 2022
    public_host: str = ""
    host_key: str
    bcrypt_cost: int = 10
    idle_timeout: float = 300.0
    login_grace_time: float = 120.0
    max_auth_tries: int = 6
    window_size: int = 2 * 1024 * 1024
    max_packet_size: int = 32 * 1024
    max_handles: int = 512
    max_handles_per_container: int = 4096
    max_sessions_per_container: int = 32
    max_sessions_per_ip: int = 64
    max_queued_output_per_container: int = 64 * 1024 * 1024
    ciphers: tuple = DEFAULT_CIPHERS
    macs: tuple = DEFAULT_MACS
    max_channels: int = 10
    max_startups: int = 128
    max_startups_per_ip: int = 16
    defender: DefenderConfig = field(default_factory=DefenderConfig)
    audit_log: str = ""
    audit_log_max_bytes: int = 10 * 1024 * 1024
    audit_log_keep: int = 10
    shutdown_grace: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Config:
    """
    A loaded configuration.  C{path} is the absolute path of its file.
    """

    path: str
    server: ServerConfig
    authorization: AuthorizationConfig
    storage: StorageConfig
    sftp: SFTPConfig

    @property
    def credentials_path(self) -> str:
        """
        The LMDB environment holding the credential records.
        """
        return os.path.join(self.storage.base_path, "sftp_credentials")

    @property
    def api_token_path(self) -> str:
        """
        Where a generated admin API token is kept.
        """
        return os.path.join(self.storage.base_path, "api_token")

    def volume_path(self, container_id: str) -> str:
        """
        The host directory of a container's volume.  C{container_id} must
        already be validated: this only joins.
        """
        return os.path.join(self.storage.volumes_path, container_id)


class _Invalid(ValueError):
    """
    A value does not fit its key; the message says why, without the key.

    @ivar subkey: for a value that is itself an object, the key inside it
        that is wrong.
    """

    def __init__(self, message: str, subkey: "str | None" = None) -> None:
        super().__init__(message)
        self.subkey = subkey


def _show(value: object) -> str:
    """
    Render a rejected value the way it was written, short and on one line.
    """
    try:
        text = json.dumps(value)
    except RecursionError:
        # Nested nearly as deep as the parser allows: json.dumps, called
        # deeper in the stack than json.loads was, can run out of it.
        return "a value nested too deeply"
    return text if len(text) <= 40 else text[:37] + "..."


def _flag(value: object, folder: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _text(value: object, folder: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _path(value: object, folder: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(f"must be a non-empty path, got {_show(value)}")
    return _resolve(folder, value)


def _pathOrOff(value: object, folder: str) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise _Invalid(f'must be a path, or "" for none, got {_show(value)}')
    return _resolve(folder, value)


def _integer(low: int, high: int):
    def check(value: object, folder: str) -> int:
        # bool is a subclass of int, but "port": true is a mistake.
        if type(value) is not int or not low <= value <= high:
            raise _Invalid(f"must be an integer {low}..{high}, got {_show(value)}")
        return value

    return check


def _seconds(value: object, folder: str) -> float:
    # json accepts NaN and Infinity; a timer cannot.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _Invalid(
            f"must be a number of seconds, 0 or more (0 disables), got {_show(value)}"
        )
    return float(value)


def _address(value: object, folder: str) -> str:
    # An address literal only: "" would bind every interface, and a name would
    # be looked up (or fail) only when the service binds, after it wrote files.
    # ipaddress takes integers too (5 is 0.0.0.5): only a string is an address.
    try:
        if isinstance(value, str):
            ipaddress.ip_address(value)
            return value
    except ValueError:
        pass
    raise _Invalid(
        "must be an IPv4 or IPv6 address such as 127.0.0.1, 0.0.0.0 or ::,"
        f" got {_show(value)}"
    )


def _resolve(folder: str, path: str) -> str:
    return os.path.normpath(os.path.join(folder, path))


_port = _integer(0, 65535)


def _names(supported):
    """
    A check for a non-empty list of algorithm names, each one supported.
    """

    def check(value: object, folder: str) -> tuple:
        if not isinstance(value, list) or not value:
            raise _Invalid(f"must be a non-empty list of names, got {_show(value)}")
        for name in value:
            if name not in supported:
                raise _Invalid(
                    f"unsupported algorithm {_show(name)}; supported: {', '.join(supported)}"
                )
        return tuple(value)

    return check


def _networks(value: object, folder: str) -> tuple:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of networks, got {_show(value)}")
    networks = []
    for item in value:
        # ipaddress takes integers too (5 is 0.0.0.5/32, true 0.0.0.1/32):
        # only a string is an address or a network.
        try:
            if isinstance(item, str):
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
        except ValueError:
            pass
        raise _Invalid(
            f"must be a list of addresses or networks like 10.0.0.0/8,"
            f" got {_show(item)}"
        )
    return tuple(networks)


def _object(cls, checks: dict):
    """
    A check for a value that is an object with keys of its own.
    """

    def check(value: object, folder: str):
        if not isinstance(value, dict):
            raise _Invalid(f"must be an object, got {_show(value)}")
        values = {}
        for key, item in value.items():
            if key not in checks:
                close = difflib.get_close_matches(key, checks, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise _Invalid(f"unknown key{hint}", key)
            try:
                values[key] = checks[key](item, folder)
            except _Invalid as e:
                raise _Invalid(str(e), key if e.subkey is None else f"{key}.{e.subkey}")
        return cls(**values)

    return check

# section -> key -> check.  Defaults live on the dataclasses, except the
# storage paths below, which depend on where the file is.
_SCHEMA = {
    "server": {"host": _address, "port": _port},
    "authorization": {"enabled": _flag, "token": _text},
    "storage": {"base_path": _path, "volumes_path": _path},
    "sftp": {
        "enabled": _flag,
        "host": _address,
        "port": _port,
        "public_host": _text,
        "host_key": _path,
        "bcrypt_cost": _integer(4, 31),
        "idle_timeout": _seconds,
        "login_grace_time": _seconds,
        "max_auth_tries": _integer(1, 100),
        # Some clients keep the window in a signed 32-bit integer.
        "window_size": _integer(32 * 1024, 2**31 - 1),
        # RFC 4253 requires 32 KiB.  A channel packet this size plus its
        # headers must fit the transport's 256 KiB packet limit: 128 KiB does.
        "max_packet_size": _integer(4096, 128 * 1024),
        "max_handles": _integer(1, 65536),
        "max_handles_per_container": _integer(1, 1_048_576),
        "max_sessions_per_container": _integer(1, 65536),
        "max_sessions_per_ip": _integer(1, 65536),
        # At least one channel's worth of queued replies (a few MiB).
        "max_queued_output_per_container": _integer(4 * 1024 * 1024, 2**40),
        "max_channels": _integer(1, 1024),
        "ciphers": _names(SUPPORTED_CIPHERS),
        "macs": _names(SUPPORTED_MACS),
        "max_startups": _integer(1, 65536),
        "max_startups_per_ip": _integer(1, 65536),
        "audit_log": _pathOrOff,
        # 0: never rotated by size (logrotate may do it).
        "audit_log_max_bytes": _integer(0, 2**50),
        "audit_log_keep": _integer(1, 1000),
        "shutdown_grace": _seconds,
        "defender": _object(
            DefenderConfig,
            {
                "enabled": _flag,
                "threshold": _integer(1, 1_000_000),
                "observation_time": _seconds,
                "ban_time": _seconds,
                "safe_list": _networks,
            },
        ),
    },
}

_STORAGE_DEFAULTS = {"base_path": "storage", "volumes_path": "storage/volumes"}

# Lightd's own settings, so that one Lightd config.json serves both daemons.
_LIGHTD_SECTIONS = frozenset({"version", "docker", "monitoring", "remote"})
_LIGHTD_KEYS = {"storage": frozenset({"containers_path"})}


def _unknown(path: str, key: str, known) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    if not close:
        return ConfigError(path, key, "unknown key")
    guess = f"{prefix}.{close[0]}" if prefix else close[0]
    return ConfigError(path, key, f'unknown key (did you mean "{guess}"?)')


def _section(path: str, document: dict, name: str, folder: str) -> dict:
    """
    Check one section and return its given keys, converted.
    """
    raw = document.get(name, {})
    if not isinstance(raw, dict):
        raise ConfigError(path, name, f"must be an object, got {_show(raw)}")
    checks = _SCHEMA[name]
    values = {}
    for key, value in raw.items():
        if key in _LIGHTD_KEYS.get(name, ()):
            continue
        if key not in checks:
            raise _unknown(path, f"{name}.{key}", checks)
        try:
            values[key] = checks[key](value, folder)
        except _Invalid as e:
            dotted = f"{name}.{key}" if e.subkey is None else f"{name}.{key}.{e.subkey}"
            raise ConfigError(path, dotted, str(e)) from None
    return values


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    try:
        document = json.loads(data)
    except json.JSONDecodeError as e:
        raise ConfigError(
            path, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "invalid JSON: not UTF-8") from None
    except RecursionError:
        raise ConfigError(path, None, "invalid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise ConfigError(path, None, f"must be a JSON object, got {_show(document)}")
    return document


def load(path: str) -> Config:
    """
    Read and validate the configuration file at C{path}.  Relative paths in
    it resolve against the file's folder.

    @raise ConfigError: naming the file and the key, if it cannot be used.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    document = _read(path)
    for key in document:
        if key not in _SCHEMA and key not in _LIGHTD_SECTIONS:
            raise _unknown(path, key, _SCHEMA)

    given = {name: _section(path, document, name, folder) for name in _SCHEMA}
    storage = StorageConfig(
        **(
            {key: _resolve(folder, value) for key, value in _STORAGE_DEFAULTS.items()}
            | given["storage"]
        )
    )
    sftp = SFTPConfig(
        **(
            {
                "host_key": os.path.join(storage.base_path, "sftp_host_ed25519_key"),
                "audit_log": os.path.join(storage.base_path, "sftp_audit.log"),
            }
            | given["sftp"]
        )
    )
    if sftp.max_packet_size > sftp.window_size:
        raise ConfigError(
            path,
            "sftp.max_packet_size",
            f"must not exceed sftp.window_size ({sftp.window_size}),"
            f" got {sftp.max_packet_size}",
        )
    return Config(
        path=path,
        server=ServerConfig(**given["server"]),
        authorization=AuthorizationConfig(**given["authorization"]),
        storage=storage,
        sftp=sftp,
    )


def warnIfExposed(what: str, path: str, mode: int) -> None:
    """
    Log a warning if the secret file at C{path}, whose C{st_mode} is
    C{mode}, grants its group or others any access.  It is used all the
    same: the operator may have reasons, and the warning says how to fix it.

    @param what: what the file is, for the message ("API token file").
    """
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn(
            "the {what} {path} is readable by others (mode {mode:04o}); chmod 600 it",
            what=what,
            path=path,
            mode=stat.S_IMODE(mode),
        )
