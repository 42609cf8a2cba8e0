"""
The admin HTTP API, Lightd-compatible JSON on twisted.web:

    POST   /containers/{id}/sftp/credentials   create or reset (200, shows the password)
    GET    /containers/{id}/sftp/info          show, without the password (200)
    DELETE /containers/{id}/sftp/credentials   revoke (204)
    GET    /containers/{id}/sftp/policy        the container's policy (200)
    PATCH  /containers/{id}/sftp/policy        change some of its keys (200, the whole policy)
    GET    /sftp/sessions                      the live sessions (200)
    DELETE /sftp/sessions/{id}                 end one (204)
    GET    /metrics                            Prometheus text format (200)

This module translates HTTP to L{lightd_conch.accounts.Accounts}, the same
rules the CLI uses, and owns the bearer token.  Every answer is JSON: a body
that is not a JSON object, or is nested deeper than L{MAX_DEPTH}, is a 400,
and whatever fails unforeseen is a 500 C{{"error": ...}} with one line in the
log, never twisted.web's HTML error page or a traceback.  The blocking work of
L{Accounts} (bcrypt, LMDB writes) runs through an injected C{run} function,
in the daemon a thread pool, so the reactor keeps serving transfers.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import secrets

from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from ._address import formatAddress
from .accounts import AccountError
from .audit import NullAudit
from .config import warnIfExposed
from .metrics import CONTENT_TYPE

log = Logger()

MAX_BODY = 64 * 1024
# Bodies are flat objects; deeper nesting is refused before the parser
# recurses (50,000 "[" are well under MAX_BODY).
MAX_DEPTH = 32

_INTERNAL = "internal error, see the service log"

_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409}

# (segment after the id, last segment) -> {method: handler name}
_ROUTES = {
    (b"sftp", b"credentials"): {b"POST": "_generate", b"DELETE": "_revoke"},
    (b"sftp", b"info"): {b"GET": "_info"},
    (b"sftp", b"policy"): {b"GET": "_policy", b"PATCH": "_setPolicy"},
}
# Paths without a container id: the whole path -> {method: handler name}.
_SERVICE_ROUTES = {
    (b"sftp", b"sessions"): {b"GET": "_getSessions"},
    (b"metrics",): {b"GET": "_getMetrics"},
}
_SESSION_ROUTE = {b"DELETE": "_deleteSession"}


class _Text:
    """
    A response body that is not JSON.
    """

    def __init__(self, data: bytes, contentType: bytes) -> None:
        self.data = data
        self.contentType = contentType


class TokenError(Exception):
    """
    The API token file cannot be used; C{str()} names it and says why.
    """


def loadOrCreateToken(path: str) -> "tuple[str, bool]":
    """
    The token kept in the file at C{path}, surrounding whitespace stripped,
    or a new one (C{lightd_} and 32 hex digits) written there with mode 0600
    if the file does not exist.

    @return: the token, and whether it was created now.
    @raise TokenError: if the file cannot be read or created, or is empty.
    """
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise TokenError(f"cannot create the API token file {path}: {e.strerror}") from None
    else:
        token = "lightd_" + secrets.token_hex(16)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read the API token file {path}: {e}") from None
    if not token:
        raise TokenError(
            f"the API token file {path} is empty: delete it to generate a new token"
        )
    warnIfExposed("API token file", path, mode)
    return token, False


def warnAuthorizationDisabled(host: str, port: int) -> None:
    """
    Log that the API at C{host} (an address literal, as config checks) and
    the C{port} it is bound to answers without a token: a warning on a
    loopback address, a critical message on any other.
    """
    where = f"{host} port {port}"
    if ipaddress.ip_address(host).is_loopback:
        log.warn(
            "admin API authorization is disabled: any local user or process"
            " that can connect to {where} can manage SFTP credentials",
            where=where,
        )
    else:
        log.critical(
            "admin API authorization is disabled and the API is bound to"
            " {where}, reachable from other hosts: anyone who can connect"
            " can manage SFTP credentials",
            where=where,
        )


def configureToken(config) -> "str | None":
    """
    The bearer token the API requires, or None when C{authorization.enabled}
    is false (L{warnAuthorizationDisabled} says so once the API is bound).
    Logs where the token comes from, never the token itself.

    @raise TokenError: if a generated token's file cannot be used.
    """
    if not config.authorization.enabled:
        return None
    if config.authorization.token:
        log.info(
            "admin API token: authorization.token in {path}", path=config.path
        )
        return config.authorization.token
    token, created = loadOrCreateToken(config.api_token_path)
    log.info(
        "admin API token {how} {path}",
        how="generated into" if created else "read from",
        path=config.api_token_path,
    )
    return token


def _isJSON(contentType: bytes) -> bool:
    mediaType = contentType.split(b";", 1)[0].strip().lower()
    return (
        mediaType == b"application/json"
        # Lightd's vendor types, e.g. application/vnd.pkglatest+json.
        or (mediaType.startswith(b"application/") and mediaType.endswith(b"+json"))
        # What `curl -d` and many HTTP tools send unless told otherwise;
        # the body must still be a JSON object.
        or mediaType == b"application/x-www-form-urlencoded"
    )


def _host(request) -> "str | None":
    return getattr(request.getClientAddress(), "host", None)


class _Refused(Exception):
    """
    A request refused before it reached L{Accounts}.
    """

    def __init__(self, code: int, message: str, headers=()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


_FROM_A_PAGE = (
    "authorization is disabled, so requests from web pages (with an Origin header) are refused"
)


class AdminAPI(Resource):
    """
    The whole API as one leaf resource: it authenticates, routes, parses the
    body and maps L{AccountError}s to statuses.

    @param accounts: an L{Accounts}; its methods block.
    @param token: the bearer token as C{str}, or None for no authorization.
    @param run: C{run(f, *args)} calls C{f(*args)} where blocking is
        allowed and returns a Deferred of its result.
    @param changed: called with a container id on the reactor thread after
        its credentials were reset or revoked, to end its sessions now.
    @param sftpPort: returns the C{port} to hand out: the SFTP port the
        daemon is bound to, which with C{sftp.port} 0 only the listener
        knows.  None hands out what L{Accounts} reports, C{sftp.port}.
    @param sessions: the L{lightd_conch.sessions.SessionRegistry} of the
        live sessions, or None if SFTP is off.
    @param endSession: C{endSession(id)} disconnects that live session and
        returns whether there was one.
    @param metrics: the L{lightd_conch.metrics.Metrics} to show.
    @param audit: where changes are recorded, with the API client's address.
    """

    isLeaf = True

    def __init__(
        self,
        accounts,
        token,
        run,
        changed=lambda containerId: None,
        sftpPort=None,
        sessions=None,
        endSession=None,
        metrics=None,
        audit=None,
    ) -> None:
        super().__init__()
        self._sessions = sessions
        self._endSession = endSession
        self._metrics = metrics
        self._audit = NullAudit() if audit is None else audit
        self._accounts = accounts
        self._token = None if token is None else token.encode("utf-8")
        self._run = run
        self._changed = changed
        self._sftpPort = sftpPort

    def render(self, request):
        try:
            self._authorize(request)
            containerId, handler = self._route(request)
            d = getattr(self, handler)(request, containerId)
        except _Refused as e:
            return self._error(request, e.code, e.message, e.headers)
        except Exception as e:
            _logUnexpected("admin API request failed", e)
            return self._error(request, 500, _INTERNAL)

        finished = []
        request.notifyFinish().addBoth(finished.append)

        def respond(result):
            if finished:
                return  # the client went away; the change is made all the same
            code, body = result
            try:
                data = None if body is None or isinstance(body, _Text) else self._json(request, body)
            except Exception as e:
                _logUnexpected("cannot answer an admin API request", e)
                code, data = 500, self._json(request, {"error": _INTERNAL})
            request.setResponseCode(code)
            if isinstance(body, _Text):
                request.setHeader(b"Content-Type", body.contentType)
                request.setHeader(b"Content-Length", b"%d" % len(body.data))
                request.write(body.data)
            elif data is not None:
                request.write(data)
            request.finish()

        def refused(failure):
            failure.trap(AccountError)
            error = failure.value
            return _STATUS[error.kind], {"error": error.message}

        def failed(failure):
            _logUnexpected("admin API request failed", failure.value)
            return 500, {"error": _INTERNAL}

        def unanswered(failure):
            _logUnexpected("cannot answer an admin API request", failure.value)

        d.addErrback(refused).addErrback(failed).addCallback(respond)
        d.addErrback(unanswered)
        return server.NOT_DONE_YET

    # -- steps ----------------------------------------------------------------

    def _authorize(self, request) -> None:
        if self._token is None:
            # With no token to ask for, any web page could make its visitor's
            # browser set a password here: a form POST is sent without a
            # preflight.  Browsers mark such a request with an Origin header,
            # which panels calling the API from their own server do not send.
            origin = request.getHeader(b"origin")
            if origin is not None:
                log.info(
                    "admin API: refused a request from {peer}: sent by a web page ({origin})",
                    peer=formatAddress(request.getClientAddress()),
                    origin=origin[:200].decode("latin-1"),
                )
                raise _Refused(403, _FROM_A_PAGE)
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise _Refused(
                401,
                "missing bearer token",
                [(b"WWW-Authenticate", b'Bearer realm="lightd-sftp"')],
            )
        if not hmac.compare_digest(given.strip(), self._token):
            log.info(
                "admin API: refused a request from {peer}: wrong bearer token",
                peer=formatAddress(request.getClientAddress()),
            )
            raise _Refused(
                401,
                "invalid bearer token",
                [(b"WWW-Authenticate", b'Bearer realm="lightd-sftp", error="invalid_token"')],
            )

    def _route(self, request) -> "tuple[str, str]":
        segments = request.postpath
        methods = _SERVICE_ROUTES.get(tuple(segments))
        if methods is not None:
            pass
        elif len(segments) == 3 and segments[:2] == [b"sftp", b"sessions"]:
            methods = _SESSION_ROUTE
        elif len(segments) >= 4 and segments[0] == b"containers":
            methods = _ROUTES.get((segments[-2], segments[-1]))
        if methods is None:
            raise _Refused(404, "no such endpoint")
        handler = methods.get(request.method)
        if handler is None:
            allowed = b", ".join(methods)
            raise _Refused(
                405,
                f"method {request.method.decode('latin-1')} is not allowed here;"
                f" use {allowed.decode()}",
                [(b"Allow", allowed)],
            )
        if segments[0] != b"containers":
            # The session id, or nothing.
            return b"/".join(segments[2:]).decode("utf-8", "replace"), handler
        # Ids are checked by Accounts, like the CLI's: an id of several
        # segments (/containers/a/b/sftp/info) is the invalid id "a/b", and
        # bytes that are not UTF-8 become U+FFFD, which no valid id contains.
        return b"/".join(segments[1:-2]).decode("utf-8", "replace"), handler

    def _body(self, request) -> dict:
        contentType = request.getHeader(b"content-type")
        if contentType is not None and not _isJSON(contentType):
            raise _Refused(415, "request body must be JSON (Content-Type: application/json)")
        length = (request.getHeader(b"content-length") or b"").strip().lstrip(b"0")
        if length.isdigit() and (len(length) > 20 or int(length) > MAX_BODY):
            raise _Refused(413, f"request body is larger than {MAX_BODY} bytes")
        request.content.seek(0)
        data = request.content.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise _Refused(413, f"request body is larger than {MAX_BODY} bytes")
        if not data.strip():
            return {}
        if _depth(data) > MAX_DEPTH:
            raise _Refused(400, f"request body is nested deeper than {MAX_DEPTH} levels")
        try:
            body = json.loads(data)
        except RecursionError:
            raise _Refused(400, f"request body is nested deeper than {MAX_DEPTH} levels") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise _Refused(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _Refused(400, "request body must be a JSON object")
        return body

    # -- endpoints --------------------------------------------------------------

    def _generate(self, request, containerId: str):
        body = self._body(request)
        fields = {}
        for name in ("username", "password"):
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                raise _Refused(400, f'"{name}" must be a string')
            fields[name] = value

        def done(result):
            log.info(
                "admin API: credentials of container {container} set (user {username})",
                container=containerId,
                username=result["username"],
            )
            self._audit.event(
                "credentials_set",
                container=containerId,
                username=result["username"],
                ip=_host(request),
                via="api",
                generated=fields["password"] is None,
            )
            self._notifyChanged(containerId)
            return 200, self._bound(result)

        d = self._run(self._accounts.generate, containerId, fields["username"], fields["password"])
        return d.addCallback(done)

    def _info(self, request, containerId: str):
        d = self._run(self._accounts.info, containerId)
        return d.addCallback(lambda result: (200, self._bound(result)))

    def _revoke(self, request, containerId: str):
        def done(result):
            log.info("admin API: credentials of container {container} revoked", container=containerId)
            self._audit.event(
                "credentials_revoked",
                container=containerId,
                ip=_host(request),
                via="api",
            )
            self._notifyChanged(containerId)
            return 204, None

        return self._run(self._accounts.revoke, containerId).addCallback(done)

    def _policy(self, request, containerId: str):
        d = self._run(self._accounts.policy, containerId)
        return d.addCallback(lambda result: (200, result))

    def _setPolicy(self, request, containerId: str):
        changes = self._body(request)

        def done(result):
            log.info(
                "admin API: policy of container {container} changed ({keys})",
                container=containerId,
                keys=", ".join(sorted(changes)) or "nothing",
            )
            self._audit.event(
                "policy_changed",
                container=containerId,
                ip=_host(request),
                via="api",
                changes={key: result[key] for key in sorted(changes)},
            )
            self._notifyChanged(containerId)
            return 200, result

        return self._run(self._accounts.set_policy, containerId, changes).addCallback(done)

    def _getSessions(self, request, ignored: str):
        sessions = [] if self._sessions is None else self._sessions.describe()
        return succeed((200, sessions))

    def _deleteSession(self, request, sessionId: str):
        live = [] if self._sessions is None else self._sessions.describe()
        session = next((s for s in live if s["id"] == sessionId), None)
        if session is None or self._endSession is None or not self._endSession(sessionId):
            raise _Refused(404, "no such session")
        self._audit.event(
            "session_ended",
            sessionId,
            container=session["container"],
            username=session["username"],
            ip=_host(request),
            via="api",
        )
        log.info(
            "admin API: session {session} ended by {peer}",
            session=sessionId,
            peer=formatAddress(request.getClientAddress()),
        )
        return succeed((204, None))

    def _getMetrics(self, request, ignored: str):
        if self._metrics is None:
            raise _Refused(404, "no metrics: SFTP is not enabled")
        return succeed((200, _Text(self._metrics.exposition(), CONTENT_TYPE)))

    def _bound(self, result: dict) -> dict:
        if self._sftpPort is not None:
            result["port"] = self._sftpPort()
        return result

    def _notifyChanged(self, containerId: str) -> None:
        # The change is made: a failure to end sessions now must not turn
        # the answer into an error (the watcher's next tick tries again).
        try:
            self._changed(containerId)
        except Exception as e:
            _logUnexpected(f"cannot end the sessions of container {containerId}", e)

    # -- responses --------------------------------------------------------------

    def _json(self, request, body) -> bytes:
        data = json.dumps(body).encode("utf-8") + b"\n"
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(data))
        # The POST response holds a password.
        request.setHeader(b"Cache-Control", b"no-store")
        return data

    def _error(self, request, code: int, message: str, headers=()) -> bytes:
        request.setResponseCode(code)
        for name, value in headers:
            request.setHeader(name, value)
        return self._json(request, {"error": message})


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.S)
_OPENS = frozenset(b"[{")
_CLOSES = frozenset(b"]}")


def _depth(data: bytes) -> int:
    """
    How deep the arrays and objects of the JSON text C{data} nest (brackets
    inside strings do not count), without parsing it.
    """
    depth = deepest = 0
    for byte in _STRING.sub(b"", data):
        if byte in _OPENS:
            depth += 1
            if depth > deepest:
                deepest = depth
        elif byte in _CLOSES:
            depth -= 1
    return deepest


def _logUnexpected(what: str, error: BaseException) -> None:
    """One log line for a failure nothing foresaw: what, which error, where."""
    trace = error.__traceback__
    where = "?"
    if trace is not None:
        while trace.tb_next is not None:
            trace = trace.tb_next
        where = "%s:%d" % (os.path.basename(trace.tb_frame.f_code.co_filename), trace.tb_lineno)
    log.error(
        "{what}: unexpected {kind} at {where}: {error}",
        what=what,
        kind=type(error).__name__,
        where=where,
        error=str(error)[:200],
    )


class _BoundedRequest(server.Request):
    """
    A request that keeps at most C{MAX_BODY + 1} bytes of its body, so an
    oversized upload fills neither memory nor disk; the resource sees that
    it is too long and answers 413.
    """

    def gotLength(self, length) -> None:
        # twisted.web spools long bodies to a temporary file; never needed here.
        super().gotLength(0)
        self._kept = 0

    def handleContentChunk(self, data: bytes) -> None:
        room = MAX_BODY + 1 - self._kept
        if room > 0:
            data = data[:room]
            self._kept += len(data)
            self.content.write(data)


def makeSite(resource) -> server.Site:
    """
    The site serving C{resource}, with bounded request bodies, a one-minute
    idle timeout and no start/stop noise in the log.

    Bodies are never parsed as HTML forms: they are JSON whatever their
    Content-Type says, and twisted.web would answer a malformed
    multipart/form-data body itself, with a bare 400 and before the token
    is checked.  The resource answers 415 instead.
    """
    site = server.Site(resource, timeout=60, parsePOSTFormSubmission=False)
    site.requestFactory = _BoundedRequest
    site.noisy = False
    site.displayTracebacks = False
    return site
