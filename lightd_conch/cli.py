"""
The C{lightd-sftp} console script: manage containers' SFTP credentials and
policies, and list and end the running daemon's sessions.

The C{credentials} commands open the credential store directly, so they work
whether the daemon runs or not; the daemon sees their changes, and they
write their own events to the audit log.  The C{sessions} commands ask the
running daemon, through its admin API with its token.  Exit status: 0 done,
1 refused (with one line on stderr), 2 usage error.
"""

import argparse
import contextlib
import getpass
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

from lightd_conch.accounts import AccountError, Accounts
from lightd_conch.audit import appendEvent
from lightd_conch.config import ConfigError, load
from lightd_conch.policy import PolicyError, parseSetting
from lightd_conch.store import LMDBCredentialStore, StoreError

_PROG = "lightd-sftp"


class _Refused(Exception):
    """
    A request the CLI cannot carry out; C{str()} is the line it prints.
    """


def _audit(config, stderr, event: str, **fields) -> None:
    # The change is made: a log that cannot be written is said, not fatal.
    try:
        appendEvent(config, event, via="cli", os_user=_osUser(), **fields)
    except OSError as e:
        stderr.write(f"{_PROG}: warning: cannot write the audit log {config.sftp.audit_log}: {e}\n")


def _osUser() -> "str | None":
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _generate(accounts, args, stdin, stdout, stderr) -> None:
    password = _read_password(stdin) if args.password_stdin else None
    result = accounts.generate(
        args.container,
        username=args.username,
        password=password,
        create_volume=args.create_volume,
    )
    _audit(
        args.loadedConfig,
        stderr,
        "credentials_set",
        container=args.container,
        username=result["username"],
        generated=password is None,
    )
    if args.json:
        _print_json(result, stdout)
    else:
        _print_fields(result, stdout)
        stderr.write(f"{_PROG}: the password will not be shown again\n")


def _info(accounts, args, stdin, stdout, stderr) -> None:
    result = accounts.info(args.container)
    if args.json:
        _print_json(result, stdout)
    else:
        _print_fields(
            result
            | {key: _when(result[key]) for key in ("created_at", "updated_at")},
            stdout,
        )


def _revoke(accounts, args, stdin, stdout, stderr) -> None:
    accounts.revoke(args.container)
    _audit(args.loadedConfig, stderr, "credentials_revoked", container=args.container)
    stdout.write(f"revoked {args.container}\n")


def _list(accounts, args, stdin, stdout, stderr) -> None:
    results = accounts.list()
    if args.json:
        _print_json(results, stdout)
        return
    rows = [("CONTAINER", "USERNAME", "CREATED", "UPDATED")] + [
        (
            result["container_id"],
            result["username"],
            _when(result["created_at"]),
            _when(result["updated_at"]),
        )
        for result in results
    ]
    _print_rows(rows, stdout)


def _print_rows(rows, stdout) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
        stdout.write(line.rstrip() + "\n")


def _policyShow(accounts, args, stdin, stdout, stderr) -> None:
    _printPolicy(accounts.policy(args.container), args.json, stdout)


def _policySet(accounts, args, stdin, stdout, stderr) -> None:
    changes = {}
    for setting in args.settings:
        try:
            key, value = parseSetting(setting)
        except PolicyError as e:
            raise AccountError("invalid", str(e)) from None
        changes[key] = value
    policy = accounts.set_policy(args.container, changes)
    _audit(
        args.loadedConfig,
        stderr,
        "policy_changed",
        container=args.container,
        changes={key: policy[key] for key in sorted(changes)},
    )
    _printPolicy(policy, args.json, stdout)


def _printPolicy(policy: dict, asJSON: bool, stdout) -> None:
    if asJSON:
        _print_json(policy, stdout)
        return
    for key, value in policy.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = ",".join(value)
        else:
            text = str(value)
        stdout.write(f"{key}: {text}\n")


# -- sessions: through the running daemon's API --------------------------------

_API_TIMEOUT = 10


def _apiBase(config) -> str:
    host, port = config.server.host, config.server.port
    if port == 0:
        raise _Refused(
            "server.port is 0 (any free port): set a fixed port for the CLI to reach the daemon"
        )
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _apiToken(config) -> "str | None":
    if not config.authorization.enabled:
        return None
    if config.authorization.token:
        return config.authorization.token
    path = config.api_token_path
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise _Refused(
            f"cannot read the API token file {path}: {e.strerror} (has the daemon started?)"
        ) from None
    if not token:
        raise _Refused(f"the API token file {path} is empty")
    return token


def _callAPI(config, method: str, path: str):
    """
    The JSON the daemon answers C{method} C{path} with (None for no body).
    """
    base = _apiBase(config)
    request = urllib.request.Request(base + path, method=method)
    token = _apiToken(config)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    # Straight to the daemon: never through an http_proxy from the
    # environment, which would be handed the token.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=_API_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]
        except (ValueError, KeyError, TypeError, OSError):
            message = f"HTTP {e.code}"
        raise _Refused(message) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or str(reason)
        raise _Refused(
            f"cannot reach the daemon's API at {base}: {reason} (is lightd-sftp running?)"
        ) from None
    return json.loads(body) if body.strip() else None


def _sessionsList(config, args, stdin, stdout, stderr) -> None:
    sessions = _callAPI(config, "GET", "/sftp/sessions")
    if args.json:
        _print_json(sessions, stdout)
        return
    rows = [("ID", "CONTAINER", "USERNAME", "IP", "METHOD", "STARTED", "IN", "OUT")] + [
        (
            session["id"],
            session["container"],
            session["username"] or "",
            session["ip"],
            session["method"] or "",
            "" if session["started_at"] is None else _when(session["started_at"]),
            str(session["bytes_in"]),
            str(session["bytes_out"]),
        )
        for session in sessions
    ]
    _print_rows(rows, stdout)


def _sessionsEnd(config, args, stdin, stdout, stderr) -> None:
    if not args.id or "/" in args.id:
        raise _Refused(f"no such session: {args.id!r}")
    _callAPI(config, "DELETE", "/sftp/sessions/" + urllib.request.quote(args.id, safe=""))
    stdout.write(f"ended {args.id}\n")


# A password is at most 72 bytes: a longer line is not one, and reading stops
# here instead of taking in all of a runaway stdin.
_MAX_PASSWORD_LINE = 4096


def _read_password(stdin) -> str:
    """
    The first line of C{stdin}, less its line end: LF, or CR LF as Windows
    files end lines.  Nothing else is taken off, and the rest of C{stdin} is
    not read; L{Accounts} checks the password.
    """
    # Bytes, split at "\n" only: sys.stdin's universal newlines would also end
    # the line at a lone "\r", and turn "\r\n" into "\n".
    binary = getattr(stdin, "buffer", None)
    raw = (binary or stdin).readline(_MAX_PASSWORD_LINE + 1)
    # What is not UTF-8 stays as surrogates, which Accounts refuses.
    line = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    for ending in ("\r\n", "\n"):
        if line.endswith(ending):
            return line[: -len(ending)]
    if len(raw) > _MAX_PASSWORD_LINE:
        raise AccountError(
            "invalid",
            "password must be 8 to 72 bytes; standard input has no line end"
            f" in its first {_MAX_PASSWORD_LINE} bytes",
        )
    return line


def _print_json(value, stdout) -> None:
    stdout.write(json.dumps(value, indent=2) + "\n")


def _print_fields(result: dict, stdout) -> None:
    for key, value in result.items():
        stdout.write(f"{key}: {value}\n")


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Manage the SFTP credentials of containers."
    )
    parser.add_argument(
        "--config",
        default="config.json",
        metavar="PATH",
        help="the configuration file (default: ./config.json)",
    )
    groups = parser.add_subparsers(required=True, metavar="COMMAND")
    credentials = groups.add_parser(
        "credentials", help="create, show, revoke and list credentials"
    )
    actions = credentials.add_subparsers(required=True, metavar="ACTION")

    generate = actions.add_parser(
        "generate",
        help="create or reset a container's credentials and print the password",
    )
    generate.add_argument("container", metavar="CONTAINER")
    generate.add_argument(
        "--username",
        metavar="U",
        help="the login name (default: the current one, or the container id)",
    )
    generate.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of generating one",
    )
    generate.add_argument(
        "--create-volume",
        action="store_true",
        help="create the container's volume directory if it is missing",
    )
    generate.set_defaults(run=_generate)

    info = actions.add_parser("info", help="show a container's credentials")
    info.add_argument("container", metavar="CONTAINER")
    info.set_defaults(run=_info)

    revoke = actions.add_parser(
        "revoke", help="remove a container's credentials and end its sessions"
    )
    revoke.add_argument("container", metavar="CONTAINER")
    revoke.set_defaults(run=_revoke)

    listing = actions.add_parser("list", help="list the containers with credentials")
    listing.set_defaults(run=_list)

    policy = groups.add_parser("policy", help="show and change a container's policy")
    policyActions = policy.add_subparsers(required=True, metavar="ACTION")
    show = policyActions.add_parser("show", help="show a container's policy")
    show.add_argument("container", metavar="CONTAINER")
    show.set_defaults(run=_policyShow)
    change = policyActions.add_parser(
        "set",
        help="change keys of a container's policy (sizes take K, M, G, T;"
        " lists are comma-separated)",
    )
    change.add_argument("container", metavar="CONTAINER")
    change.add_argument("settings", metavar="KEY=VALUE", nargs="+")
    change.set_defaults(run=_policySet)

    sessions = groups.add_parser(
        "sessions", help="list and end the running daemon's live sessions"
    )
    sessionActions = sessions.add_subparsers(required=True, metavar="ACTION")
    sessionsList = sessionActions.add_parser("list", help="list the live sessions")
    sessionsList.set_defaults(run=_sessionsList, daemon=True)
    sessionsEnd = sessionActions.add_parser("end", help="end a live session now")
    sessionsEnd.add_argument("id", metavar="ID")
    sessionsEnd.set_defaults(run=_sessionsEnd, daemon=True)

    for action in (generate, info, listing, show, change, sessionsList):
        action.add_argument(
            "--json", action="store_true", help="print the API's JSON object"
        )
    return parser


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    """
    Run the console script with C{argv} (default: C{sys.argv[1:]}) and
    return its exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    # argparse prints usage and help to the sys streams and exits.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:
            return e.code
    try:
        config = load(args.config)
        if getattr(args, "daemon", False):
            args.run(config, args, stdin, stdout, stderr)
            return 0
        args.loadedConfig = config
        store = LMDBCredentialStore(config.credentials_path)
        try:
            args.run(Accounts(config, store), args, stdin, stdout, stderr)
        finally:
            store.close()
    except (ConfigError, StoreError, AccountError, OSError, _Refused) as e:
        stderr.write(f"{_PROG}: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
