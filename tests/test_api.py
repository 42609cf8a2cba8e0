"""
Tests for L{lightd_conch.api}: the admin API resource driven with
L{DummyRequest} over a L{MemoryCredentialStore}, the token file, and the
service tree's API listener.
"""

import json
import os
import re
import stat
from io import BytesIO, StringIO
from urllib.parse import unquote_to_bytes

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from lightd_conch import api, config, tap
from lightd_conch.accounts import Accounts
from lightd_conch.testing import MemoryCredentialStore

TOKEN = "lightd_0123456789abcdef0123456789abcdef"


def writeConfig(testcase, **sections):
    """
    A loaded configuration in a new temporary folder, bcrypt at cost 4.
    """
    root = os.path.abspath(testcase.mktemp())
    os.makedirs(root)
    document = {
        "server": {"host": "127.0.0.1", "port": 0},
        "sftp": {"host": "127.0.0.1", "port": 2022, "bcrypt_cost": 4},
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    path = os.path.join(root, "config.json")
    with open(path, "w") as f:
        json.dump(document, f)
    return config.load(path)


class LogCapture:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self):
        return "\n".join(formatEvent(event) for event in self.events)


class APITestCase(TestCase):
    token = TOKEN

    def setUp(self):
        self.config = writeConfig(self, sftp={"public_host": "sftp.example.test"})
        self.store = MemoryCredentialStore()
        self.accounts = Accounts(self.config, self.store, clock=lambda: 1700000000)
        self.changed = []
        self.api = api.AdminAPI(
            self.accounts,
            self.token,
            run=maybeDeferred,
            changed=self.changed.append,
        )
        self.volume("demo")

    def volume(self, containerId):
        os.makedirs(self.config.volume_path(containerId), exist_ok=True)

    def request(self, method, path, body=None, headers=None, token=TOKEN):
        """
        Render a request for C{path} (URL-encoded, as on the wire); return
        the finished request.
        """
        segments = [unquote_to_bytes(s) for s in path.encode().lstrip(b"/").split(b"/")]
        request = DummyRequest(segments)
        request.method = method.encode()
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        request.content = BytesIO(body or b"")
        if token is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
        for name, value in (headers or {}).items():
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        request.render(self.api)
        self.assertEqual(request.finished, 1)
        return request

    def assertResponse(self, request, code, body=None):
        """
        Assert C{request} was answered with C{code} and JSON; return the body.
        """
        self.assertEqual(request.responseCode or 200, code, b"".join(request.written))
        if code == 204:
            self.assertEqual(request.written, [])
            return None
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        data = b"".join(request.written)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-length"), [b"%d" % len(data)]
        )
        parsed = json.loads(data)
        if body is not None:
            self.assertEqual(parsed, body)
        return parsed

    def assertError(self, request, code, message=None):
        body = self.assertResponse(request, code)
        self.assertEqual(list(body), ["error"])
        if message is not None:
            self.assertEqual(body["error"], message)
        return body["error"]

    def generate(self, containerId="demo", body="{}", **kwargs):
        return self.request("POST", f"/containers/{containerId}/sftp/credentials", body, **kwargs)


class AuthorizationTests(APITestCase):
    def test_missingToken(self):
        request = self.generate(token=None)
        self.assertError(request, 401, "missing bearer token")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"www-authenticate"),
            [b'Bearer realm="lightd-sftp"'],
        )
        self.assertEqual(self.store.list(), [])

    def test_wrongToken(self):
        log = LogCapture(self)
        for token in ("wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            request = self.request("GET", "/containers/demo/sftp/info", token=token)
            self.assertError(request, 401, "invalid bearer token")
            header = request.responseHeaders.getRawHeaders(b"www-authenticate")[0]
            self.assertIn(b"Bearer", header)
        self.assertIn("wrong bearer token", log.text())
        self.assertNotIn(TOKEN, log.text())

    def test_otherSchemes(self):
        for header in ("Basic " + TOKEN, TOKEN, "Bearer", "Bearer "):
            request = self.request(
                "GET",
                "/containers/demo/sftp/info",
                token=None,
                headers={"Authorization": header},
            )
            self.assertError(request, 401, "missing bearer token")

    def test_schemeIsCaseInsensitive(self):
        request = self.request(
            "POST",
            "/containers/demo/sftp/credentials",
            token=None,
            headers={"Authorization": "bearer " + TOKEN},
        )
        self.assertResponse(request, 200)

    def test_unknownRouteNeedsToken(self):
        self.assertError(self.request("GET", "/nothing", token=None), 401)

    def test_comparesInConstantTime(self):
        compared = []

        def compare_digest(a, b):
            compared.append((a, b))
            return False

        self.patch(api.hmac, "compare_digest", compare_digest)
        self.assertError(self.request("GET", "/containers/demo/sftp/info", token="guess"), 401)
        self.assertEqual(compared, [(b"guess", TOKEN.encode())])


    def test_originChangesNothing(self):
        """
        With a token, an Origin header changes nothing: a page cannot send
        the token, and the token decides.
        """
        self.assertResponse(self.generate(headers={"Origin": "https://panel.example"}), 200)
        self.assertError(
            self.request("GET", "/containers/demo/sftp/info", headers={"Origin": "x"}, token=None),
            401,
        )


class NoAuthorizationTests(APITestCase):
    token = None

    def test_noTokenNeeded(self):
        self.assertResponse(self.generate(token=None), 200)
        self.assertResponse(self.request("GET", "/containers/demo/sftp/info", token="any"), 200)

    def test_webPageRefused(self):
        """
        Without authorization, a request a browser sends for a web page (it
        carries an Origin header) is refused with 403 and changes nothing:
        otherwise any page could set a container's password through its
        visitor's browser.
        """
        self.assertResponse(self.generate(), 200)
        before = self.store.get("demo")
        log = LogCapture(self)
        request = self.request(
            "POST",
            "/containers/demo/sftp/credentials",
            body='{"password": "chosen by the page"}',
            headers={
                "Origin": "https://example.com",
                "Content-Type": "application/x-www-form-urlencoded",
            },
            token=None,
        )
        message = self.assertError(request, 403)
        self.assertIn("Origin", message)
        self.assertIn("sent by a web page (https://example.com)", log.text())
        self.assertEqual(self.store.get("demo"), before)
        self.assertError(
            self.request("GET", "/containers/demo/sftp/info", headers={"Origin": "null"}, token=None),
            403,
        )


class GenerateTests(APITestCase):
    def test_default(self):
        request = self.generate()
        body = self.assertResponse(request, 200)
        self.assertEqual(
            sorted(body), ["host", "password", "port", "username", "volume_path"]
        )
        self.assertEqual(body["username"], "demo")
        self.assertRegex(body["password"], r"^[A-Za-z0-9]{24}$")
        self.assertEqual(body["host"], "sftp.example.test")
        self.assertEqual(body["port"], 2022)
        self.assertEqual(body["volume_path"], "/")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        record = self.store.get("demo")
        self.assertTrue(bcrypt.checkpw(body["password"].encode(), record.password_hash))
        self.assertEqual(self.changed, ["demo"])

    def test_emptyBody(self):
        self.assertEqual(self.assertResponse(self.generate(body=b""), 200)["username"], "demo")

    def test_custom(self):
        body = self.assertResponse(
            self.generate(body={"username": "alice", "password": "correct horse"}), 200
        )
        self.assertEqual((body["username"], body["password"]), ("alice", "correct horse"))
        self.assertTrue(bcrypt.checkpw(b"correct horse", self.store.get("demo").password_hash))

    def test_nullFieldsMeanDefault(self):
        body = self.assertResponse(
            self.generate(body={"username": None, "password": None}), 200
        )
        self.assertEqual(body["username"], "demo")
        self.assertEqual(len(body["password"]), 24)

    def test_unknownFieldsIgnored(self):
        self.assertResponse(self.generate(body={"comment": 1}), 200)

    def test_resetKeepsUsernameAndChangesPassword(self):
        first = self.assertResponse(self.generate(body={"username": "alice"}), 200)
        second = self.assertResponse(self.generate(), 200)
        self.assertEqual(second["username"], "alice")
        self.assertNotEqual(first["password"], second["password"])
        record = self.store.get("demo")
        self.assertFalse(bcrypt.checkpw(first["password"].encode(), record.password_hash))
        self.assertTrue(bcrypt.checkpw(second["password"].encode(), record.password_hash))
        self.assertEqual(self.changed, ["demo", "demo"])

    def test_vendorTypes(self):
        for contentType in (
            "application/json",
            "application/json; charset=utf-8",
            "Application/vnd.pkglatest+json",
            "application/x-www-form-urlencoded",
        ):
            request = self.generate(
                headers={"Content-Type": contentType, "Accept": "Application/vnd.pkglatest+json"}
            )
            self.assertResponse(request, 200)

    def test_unsupportedMediaType(self):
        for contentType in ("text/plain", "multipart/form-data; boundary=x", "application/xml"):
            request = self.generate(headers={"Content-Type": contentType})
            self.assertError(request, 415)
        self.assertEqual(self.store.list(), [])

    def test_boundSFTPPort(self):
        """
        The C{port} handed out is the one C{sftpPort} reports, the port the
        daemon bound (with C{sftp.port} 0 the configuration says 0), asked
        again for each answer.
        """
        bound = [40022]
        self.api = api.AdminAPI(
            self.accounts, TOKEN, run=maybeDeferred, sftpPort=lambda: bound[0]
        )
        self.assertEqual(self.assertResponse(self.generate(), 200)["port"], 40022)
        bound[0] = 40023
        info = self.assertResponse(self.request("GET", "/containers/demo/sftp/info"), 200)
        self.assertEqual(info["port"], 40023)

    def test_noVolume(self):
        self.assertError(self.generate("ghost"), 404, "container volume does not exist")
        self.assertIsNone(self.store.get("ghost"))
        self.assertEqual(self.changed, [])

    def test_usernameTaken(self):
        self.volume("other")
        self.assertResponse(self.generate("other", body={"username": "alice"}), 200)
        message = self.assertError(self.generate(body={"username": "alice"}), 409)
        self.assertIn("alice", message)
        self.assertIn("another container", message)
        self.assertIsNone(self.store.get("demo"))
        # A container's own id is taken once another container uses it as a name.
        self.assertResponse(self.generate("other", body={"username": "demo"}), 200)
        self.assertError(self.generate(), 409)


class BadRequestTests(APITestCase):
    def test_badIds(self):
        for path in (
            "..",
            "a%2Fb",
            "a/b",
            "../../etc",
            "",
            "a" * 65,
            "-demo",
            ".hidden",
            "a%20b",
            "%C3%A9",
            "%FF",
        ):
            with self.subTest(path=path):
                for request in (
                    self.generate(path),
                    self.request("GET", f"/containers/{path}/sftp/info"),
                    self.request("DELETE", f"/containers/{path}/sftp/credentials"),
                ):
                    message = self.assertError(request, 400)
                    self.assertIn("invalid container id", message)
        self.assertResponse(self.generate("a" * 64, body={"username": "x"}), 404)
        self.assertEqual(self.store.list(), [])

    def test_badUsernames(self):
        for username in ("", "-x", ".x", "a/b", "a" * 65, "é"):
            message = self.assertError(self.generate(body={"username": username}), 400)
            self.assertIn("invalid username", message)

    def test_passwordLength(self):
        for password in ("", "short", "1234567", "x" * 73, "é" * 37):
            message = self.assertError(self.generate(body={"password": password}), 400)
            self.assertIn("password must be 8 to 72 bytes", message)
            self.assertNotIn(password or "\0", message)
        for password in ("12345678", "x" * 72, "é" * 36):
            self.assertResponse(self.generate(body={"password": password}), 200)

    def test_malformedJSON(self):
        for body in ("{", "{'a': 1}", "nope", b"\xff\xfe{}", '{"username": "x",}'):
            message = self.assertError(self.generate(body=body), 400)
            self.assertIn("not valid JSON", message)

    def test_notAnObject(self):
        for body in ("[]", '"x"', "1", "null"):
            self.assertError(self.generate(body=body), 400, "request body must be a JSON object")

    def test_wrongFieldTypes(self):
        for name in ("username", "password"):
            for value in (1, True, [], {}):
                request = self.generate(body={name: value})
                self.assertError(request, 400, f'"{name}" must be a string')
        self.assertEqual(self.store.list(), [])

    def test_tooLargeByContentLength(self):
        request = self.generate(
            body="{}", headers={"Content-Length": str(api.MAX_BODY + 1)}
        )
        self.assertError(request, 413)

    def test_tooLargeByBody(self):
        body = json.dumps({"username": "x", "pad": "x" * api.MAX_BODY})
        self.assertError(self.generate(body=body), 413)
        self.assertEqual(self.store.list(), [])

    def test_largestBody(self):
        body = '{"pad": "' + "x" * (api.MAX_BODY - 11) + '"}'
        self.assertEqual(len(body), api.MAX_BODY)
        self.assertResponse(self.generate(body=body), 200)


class InfoAndRevokeTests(APITestCase):
    def test_info(self):
        self.assertResponse(self.generate(body={"username": "alice"}), 200)
        body = self.assertResponse(self.request("GET", "/containers/demo/sftp/info"), 200)
        self.assertEqual(
            body,
            {
                "username": "alice",
                "host": "sftp.example.test",
                "port": 2022,
                "volume_path": "/",
                "created_at": 1700000000,
                "updated_at": 1700000000,
            },
        )

    def test_infoNotFound(self):
        request = self.request("GET", "/containers/demo/sftp/info")
        self.assertError(request, 404, "SFTP credentials not found for this container")

    def test_revoke(self):
        self.assertResponse(self.generate(), 200)
        self.changed.clear()
        request = self.request("DELETE", "/containers/demo/sftp/credentials")
        self.assertResponse(request, 204)
        self.assertIsNone(self.store.get("demo"))
        self.assertEqual(self.changed, ["demo"])
        request = self.request("DELETE", "/containers/demo/sftp/credentials")
        self.assertError(request, 404, "SFTP credentials not found for this container")
        self.assertEqual(self.changed, ["demo"])

    def test_revokeFreesUsername(self):
        self.volume("other")
        self.assertResponse(self.generate(body={"username": "alice"}), 200)
        self.assertResponse(self.request("DELETE", "/containers/demo/sftp/credentials"), 204)
        self.assertResponse(self.generate("other", body={"username": "alice"}), 200)


class RoutingTests(APITestCase):
    def test_unknownRoutes(self):
        for path in (
            "/",
            "/containers",
            "/containers/demo",
            "/containers/demo/sftp",
            "/containers/demo/sftp/credentials/",
            "/containers/demo/sftp/info/x",
            "/containers/demo/sftp/password",
            "/containers//sftp/info/",
            "/containers/sftp/info",
            "/container/demo/sftp/info",
            "/api/containers/demo/sftp/info",
            "/containers/demo/sftp/credentials/info/x",
        ):
            with self.subTest(path=path):
                self.assertError(self.request("GET", path), 404, "no such endpoint")

    def test_wrongMethod(self):
        for method, path, allow in (
            ("GET", "/containers/demo/sftp/credentials", b"POST, DELETE"),
            ("PUT", "/containers/demo/sftp/credentials", b"POST, DELETE"),
            ("POST", "/containers/demo/sftp/info", b"GET"),
            ("DELETE", "/containers/demo/sftp/info", b"GET"),
        ):
            request = self.request(method, path)
            self.assertError(request, 405)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [allow])
        self.assertEqual(self.store.list(), [])


class AsyncTests(APITestCase):
    """
    The blocking work runs through C{run}, and the answer comes when it ends.
    """

    def setUp(self):
        super().setUp()
        self.calls = []

        def run(f, *args):
            d = Deferred()
            self.calls.append((f, args, d))
            return d

        self.api = api.AdminAPI(self.accounts, TOKEN, run=run, changed=self.changed.append)

    def finish(self, index=0):
        f, args, d = self.calls[index]
        try:
            d.callback(f(*args))
        except Exception:
            d.errback()

    def test_generateRunsAccountsInRun(self):
        request = DummyRequest([b"containers", b"demo", b"sftp", b"credentials"])
        request.method = b"POST"
        request.content = BytesIO(b"{}")
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + TOKEN.encode()])
        request.render(self.api)
        self.assertEqual(request.finished, 0)
        self.assertEqual(self.calls[0][0], self.accounts.generate)
        self.assertEqual(self.store.list(), [])
        self.finish()
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(self.changed, ["demo"])

    def test_clientGoneBeforeTheAnswer(self):
        request = DummyRequest([b"containers", b"demo", b"sftp", b"credentials"])
        request.method = b"POST"
        request.content = BytesIO(b"{}")
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + TOKEN.encode()])
        request.render(self.api)
        request.processingFailed(Failure(ConnectionDone()))
        self.finish()
        self.assertEqual(request.written, [])
        self.assertIsNotNone(self.store.get("demo"))
        self.assertEqual(self.changed, ["demo"])

    def test_internalError(self):
        log = LogCapture(self)
        api_ = api.AdminAPI(
            self.accounts, TOKEN, run=lambda f, *args: fail(OSError("disk on fire"))
        )
        request = DummyRequest([b"containers", b"demo", b"sftp", b"info"])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + TOKEN.encode()])
        request.render(api_)
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(
            json.loads(b"".join(request.written)), {"error": "internal error, see the service log"}
        )
        # One line in the log, which says what failed; no traceback.
        self.assertEqual([e for e in log.events if "log_failure" in e], [])
        lines = [formatEvent(e) for e in log.events if e.get("log_namespace") == "lightd_conch.api"]
        self.assertEqual(len(lines), 1)
        self.assertIn("OSError", lines[0])
        self.assertIn("disk on fire", lines[0])


class ChangedFailureTests(APITestCase):
    def test_answerStandsWhenEndingSessionsFails(self):
        log = LogCapture(self)

        def changed(containerId):
            raise RuntimeError("registry broken")

        self.api = api.AdminAPI(self.accounts, TOKEN, run=maybeDeferred, changed=changed)
        self.assertResponse(self.generate(), 200)
        self.assertResponse(self.request("DELETE", "/containers/demo/sftp/credentials"), 204)
        lines = [formatEvent(e) for e in log.events if "registry broken" in formatEvent(e)]
        self.assertEqual(len(lines), 2)
        self.assertEqual([e for e in log.events if "log_failure" in e], [])


class BoundedRequestTests(TestCase):
    def test_keepsAtMostOneByteOverTheLimit(self):
        request = api._BoundedRequest(DummyChannel())
        request.gotLength(10**9)
        for _ in range(100):
            request.handleContentChunk(b"x" * 4096)
        request.content.seek(0)
        self.assertEqual(len(request.content.read()), api.MAX_BODY + 1)

    def test_keepsASmallBody(self):
        request = api._BoundedRequest(DummyChannel())
        request.gotLength(None)
        request.handleContentChunk(b'{"a":')
        request.handleContentChunk(b" 1}")
        request.content.seek(0)
        self.assertEqual(request.content.read(), b'{"a": 1}')


class SiteTests(APITestCase):
    """
    Requests over HTTP through L{api.makeSite}: what twisted.web does before
    the resource sees the request.
    """

    def exchange(self, headers, body=b"{}", path=b"/containers/demo/sftp/credentials"):
        """
        Send one POST with C{headers} and C{body}; return the status and
        the JSON answer.
        """
        site = api.makeSite(self.api)
        site.reactor = Clock()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers.items())
        channel.dataReceived(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, head, len(body), body)
        )
        response = transport.value()
        status = int(response.split(b" ", 2)[1])
        headerBlock, _, answer = response.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Type: application/json\r\n", headerBlock)
        return status, json.loads(answer)

    def test_multipartIsNotParsed(self):
        """
        A multipart/form-data body, well-formed or not, is not parsed by
        twisted.web (which would answer a malformed one with a bare 400
        before the token is checked): the token is checked, then it is
        refused as not JSON.
        """
        refused = {"error": "request body must be JSON (Content-Type: application/json)"}
        for contentType, body in [
            (b"multipart/form-data", b"{}"),
            (b"multipart/form-data; boundary=xyz", b"--xyz\r\nbroken"),
            (
                b"multipart/form-data; boundary=xyz",
                b'--xyz\r\nContent-Disposition: form-data; name="password"\r\n\r\n'
                b"correct horse\r\n--xyz--\r\n",
            ),
        ]:
            self.assertEqual(
                self.exchange({b"Content-Type": contentType}, body),
                (401, {"error": "missing bearer token"}),
            )
            self.assertEqual(
                self.exchange(
                    {b"Content-Type": contentType, b"Authorization": b"Bearer " + TOKEN.encode()},
                    body,
                ),
                (415, refused),
            )
        self.assertEqual(self.store.list(), [])

    def test_formTypeBodyIsJSON(self):
        """
        curl's default Content-Type carries a JSON body as before.
        """
        status, answer = self.exchange(
            {
                b"Content-Type": b"application/x-www-form-urlencoded",
                b"Authorization": b"Bearer " + TOKEN.encode(),
            },
            b'{"username": "alice"}',
        )
        self.assertEqual((status, answer["username"]), (200, "alice"))


class TokenTests(TestCase):
    def test_generatedOnceAndReused(self):
        log = LogCapture(self)
        cfg = writeConfig(self)
        token = api.configureToken(cfg)
        self.assertRegex(token, r"^lightd_[0-9a-f]{32}$")
        self.assertEqual(stat.S_IMODE(os.stat(cfg.api_token_path).st_mode), 0o600)
        with open(cfg.api_token_path) as f:
            self.assertEqual(f.read().strip(), token)
        self.assertEqual(api.configureToken(cfg), token)
        text = log.text()
        self.assertIn(f"generated into {cfg.api_token_path}", text)
        self.assertIn(f"read from {cfg.api_token_path}", text)
        self.assertNotIn(token, text)

    def test_whitespaceStripped(self):
        cfg = writeConfig(self)
        os.makedirs(os.path.dirname(cfg.api_token_path), exist_ok=True)
        fd = os.open(cfg.api_token_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"  my-token \r\n\n")
        os.close(fd)
        self.assertEqual(api.configureToken(cfg), "my-token")

    def test_emptyFileRefused(self):
        cfg = writeConfig(self)
        os.makedirs(os.path.dirname(cfg.api_token_path), exist_ok=True)
        fd = os.open(cfg.api_token_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        error = self.assertRaises(api.TokenError, api.configureToken, cfg)
        self.assertIn(cfg.api_token_path, str(error))

    def test_looseModeWarned(self):
        log = LogCapture(self)
        cfg = writeConfig(self)
        os.makedirs(os.path.dirname(cfg.api_token_path), exist_ok=True)
        with open(cfg.api_token_path, "w") as f:
            f.write("tok\n")
        os.chmod(cfg.api_token_path, 0o644)
        api.configureToken(cfg)
        self.assertIn("readable by others (mode 0644)", log.text())

    def test_fromConfig(self):
        log = LogCapture(self)
        cfg = writeConfig(self, authorization={"token": "configured-token"})
        self.assertEqual(api.configureToken(cfg), "configured-token")
        self.assertFalse(os.path.exists(cfg.api_token_path))
        self.assertNotIn("configured-token", log.text())
        self.assertIn(cfg.path, log.text())

    def test_disabled(self):
        """
        Without authorization there is no token and no file; the warning
        comes from L{api.warnAuthorizationDisabled} once the port is bound.
        """
        log = LogCapture(self)
        cfg = writeConfig(self, authorization={"enabled": False})
        self.assertIsNone(api.configureToken(cfg))
        self.assertFalse(os.path.exists(cfg.api_token_path))
        self.assertEqual(log.events, [])

    def test_disabledOnLoopback(self):
        for host in ("127.0.0.1", "127.0.0.2", "::1"):
            log = LogCapture(self)
            api.warnAuthorizationDisabled(host, 40080)
            self.assertIn(
                f"authorization is disabled: any local user or process that can"
                f" connect to {host} port 40080",
                log.text(),
            )
            self.assertNotIn("reachable from other hosts", log.text())
            self.assertEqual([e["log_level"].name for e in log.events], ["warn"])

    def test_disabledBeyondLoopback(self):
        for host in ("0.0.0.0", "::", "192.0.2.1"):
            log = LogCapture(self)
            api.warnAuthorizationDisabled(host, 40080)
            self.assertIn(f"bound to {host} port 40080, reachable from other hosts", log.text())
            self.assertEqual([e["log_level"].name for e in log.events], ["critical"])


class ServiceTreeTests(TestCase):
    def test_apiListener(self):
        log = LogCapture(self)
        cfg = writeConfig(self, server={"port": 8070})
        reactor = MemoryReactorClock()
        service = tap.makeService({"config": cfg.path}, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        ports = {(port, interface) for port, factory, backlog, interface in reactor.tcpServers}
        self.assertEqual(ports, {(8070, "127.0.0.1"), (2022, "127.0.0.1")})
        self.assertRegex(log.text(), r"API listening on \S+ port 8070")
        self.assertTrue(os.path.exists(cfg.api_token_path))
        self.assertTrue(re.search(r"generated into .*api_token", log.text()))

    def test_badTokenFileStopsStart(self):
        cfg = writeConfig(self)
        os.makedirs(os.path.dirname(cfg.api_token_path), exist_ok=True)
        open(cfg.api_token_path, "w").close()
        self.patch(tap.sys, "stderr", StringIO())
        error = self.assertRaises(SystemExit, tap.makeService, {"config": cfg.path}, MemoryReactorClock())
        self.assertEqual(error.code, 1)
        self.assertIn("api_token is empty", tap.sys.stderr.getvalue())

    def refusedStart(self, cfg):
        """
        makeService on C{cfg} exits 1; return what it wrote to stderr.
        """
        stderr = StringIO()
        self.patch(tap.sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit, tap.makeService, {"config": cfg.path}, MemoryReactorClock()
        )
        self.assertEqual(error.code, 1)
        return stderr.getvalue()

    def test_authorizationDisabledWarningNamesBoundPort(self):
        """
        With C{server.port} 0, the warning that the API answers without a
        token names the port it was bound to, not 0.
        """
        log = LogCapture(self)
        cfg = writeConfig(self, authorization={"enabled": False})
        service = tap.makeService({"config": cfg.path}, BindingReactor())
        service.startService()
        self.addCleanup(service.stopService)
        port = re.search(r"API listening on \S+ port (\d+)", log.text()).group(1)
        self.assertNotEqual(port, "0")
        self.assertIn(f"that can connect to 127.0.0.1 port {port} can manage", log.text())

    def test_storageBaseIsAFile(self):
        """
        A C{storage.base_path} that is a file stops the start with one line
        naming the key.
        """
        cfg = writeConfig(self, storage={"base_path": "config.json"})
        self.assertEqual(
            self.refusedStart(cfg),
            f"lightd-sftp: {cfg.path}: storage.base_path: cannot create the folder"
            f" {cfg.path}: File exists\n",
        )


def _ed25519():
    return ed25519.Ed25519PrivateKey.generate()


def _openssh(key, encryption=None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        encryption or serialization.NoEncryption(),
    )


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


class BindingReactor(MemoryReactorClock):
    """
    A memory reactor that, like a real one, binds port 0 to a free port
    (here 40001 and up).
    """

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = super().listenTCP(port, factory, backlog, interface)
        if port == 0:
            listening = _BoundPort(
                IPv4Address("TCP", interface, 40000 + len(self.tcpServers))
            )
        return listening


class _BoundPort:
    def __init__(self, address):
        self._address = address

    def getHost(self):
        return self._address

    def stopListening(self):
        return None


class HostKeyTests(TestCase):
    """
    C{sftp.host_key}: the key file the service starts with, through
    L{tap.makeService}.
    """

    unreadable = (
        "is not a private key lightd-sftp can read"
        " (damaged, truncated, or not in OpenSSH format)"
    )

    def configWithKey(self, data=None, mode=0o600):
        """
        A configuration whose host key is the file C{key} beside it,
        holding C{data} (if not None) with C{mode}.
        """
        cfg = writeConfig(self, sftp={"host_key": "key"})
        if data is not None:
            fd = os.open(cfg.sftp.host_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(cfg.sftp.host_key, mode)
        return cfg

    def start(self, cfg):
        service = tap.makeService({"config": cfg.path}, MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def assertRefused(self, cfg, reason, data=b""):
        """
        The start stops with one line naming the config file, the key, the
        key file and C{reason}, shows nothing of the key file, and writes
        nothing.
        """
        folder = os.path.dirname(cfg.path)
        before = sorted(os.listdir(folder))
        stderr = StringIO()
        self.patch(tap.sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit, tap.makeService, {"config": cfg.path}, MemoryReactorClock()
        )
        self.assertEqual(error.code, 1)
        self.assertEqual(
            stderr.getvalue(),
            f"lightd-sftp: {cfg.path}: sftp.host_key: {cfg.sftp.host_key} {reason}\n",
        )
        for line in data.splitlines():
            for start in range(0, max(len(line) - 12, 0), 12):
                self.assertNotIn(line[start : start + 12].decode("latin-1"), stderr.getvalue())
        self.assertEqual(sorted(os.listdir(folder)), before)

    def test_otherKeyTypesRefused(self):
        """
        Only an ED25519 key is used: an RSA key would have Conch offer
        ssh-rsa (SHA-1), an ECDSA key a NIST curve.
        """
        ed25519Only = "lightd-sftp uses an ED25519 host key"
        rsaKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ecKey = ec.generate_private_key(ec.SECP256R1())
        for data, kind in [
            (_openssh(rsaKey), "an RSA"),
            (_pem(rsaKey), "an RSA"),
            (_openssh(ecKey), "an ECDSA"),
            (_pem(ecKey), "an ECDSA"),
        ]:
            cfg = self.configWithKey(data)
            self.assertRefused(cfg, f"is {kind} key; {ed25519Only}", data)

    def test_unusableFilesRefused(self):
        """
        A key file that cannot be used stops the start with a short reason,
        never with Conch's messages, which quote the file.
        """
        key = _openssh(_ed25519())
        lines = key.splitlines(keepends=True)
        public = _ed25519().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        for data, reason in [
            (b"".join(lines[1:-1]), self.unreadable),
            (key[: len(key) // 2], self.unreadable),
            (b"".join(lines[:3]), self.unreadable),
            (b"not a key\n", self.unreadable),
            (b"\xff\xfe\x00\x01", self.unreadable),
            (b"", "is empty"),
            (b"\n\n", "is empty"),
            (
                _openssh(_ed25519(), serialization.BestAvailableEncryption(b"passphrase")),
                "is protected by a passphrase; lightd-sftp needs a host key without one",
            ),
            (public, "is a public key; sftp.host_key must name the private key"),
        ]:
            cfg = self.configWithKey(data)
            self.assertRefused(cfg, reason, data)

    def test_unreadableRefused(self):
        cfg = self.configWithKey()
        os.mkdir(cfg.sftp.host_key)
        self.assertRefused(cfg, "cannot be read: Is a directory")

    def test_badDefaultKeyWritesNothing(self):
        """
        A bad key at the default place, in the storage folder, is refused
        before the folder gets the volumes, the token or anything else.
        """
        cfg = writeConfig(self)
        os.makedirs(cfg.storage.base_path)
        data = b"".join(_openssh(_ed25519()).splitlines(keepends=True)[1:-1])
        with open(cfg.sftp.host_key, "wb") as f:
            f.write(data)
        self.assertRefused(cfg, self.unreadable, data)
        self.assertEqual(os.listdir(cfg.storage.base_path), ["sftp_host_ed25519_key"])

    def test_createdWhenMissing(self):
        log = LogCapture(self)
        cfg = self.configWithKey()
        self.start(cfg)
        self.assertEqual(stat.S_IMODE(os.stat(cfg.sftp.host_key).st_mode), 0o600)
        self.assertNotIn("readable by others", log.text())

    def test_looseModeWarned(self):
        """
        A key file that group or others can read is used, with the API
        token's warning.
        """
        for mode in (0o644, 0o640, 0o604):
            log = LogCapture(self)
            cfg = self.configWithKey(_openssh(_ed25519()), mode)
            self.start(cfg)
            self.assertIn(
                f"the SSH host key file {cfg.sftp.host_key} is readable by others"
                f" (mode {mode:04o}); chmod 600 it",
                log.text(),
            )
        log = LogCapture(self)
        self.start(self.configWithKey(_openssh(_ed25519()), 0o600))
        self.assertNotIn("readable by others", log.text())


class _FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        assert which == self.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


class OpenFileLimitTests(TestCase):
    """
    The service takes its soft limit on open files up to the hard one, so
    one container's many handles do not run the whole daemon out of them.
    """

    def test_raisedToTheHardLimit(self):
        fake = _FakeResource(1024, 524288)
        tap.raiseOpenFileLimit(fake)
        self.assertEqual(fake.limits, (524288, 524288))

    def test_unlimitedHardLimit(self):
        fake = _FakeResource(1024, _FakeResource.RLIM_INFINITY)
        tap.raiseOpenFileLimit(fake)
        self.assertEqual(fake.limits, (tap._NR_OPEN, _FakeResource.RLIM_INFINITY))

    def test_alreadyHighEnough(self):
        for limits in ((20000, 20000), (2_000_000, _FakeResource.RLIM_INFINITY)):
            fake = _FakeResource(*limits, refuse=True)
            tap.raiseOpenFileLimit(fake)
            self.assertEqual(fake.limits, limits)

    def test_refusalIsLogged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fake = _FakeResource(1024, 4096, refuse=True)
        tap.raiseOpenFileLimit(fake)
        self.assertEqual(fake.limits, (1024, 4096))
        self.assertIn("cannot raise the open files limit from 1024",
                      " ".join(formatEvent(e) for e in events))

    def test_fewOpenFilesWarned(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tap.warnIfFewOpenFiles(4096, _FakeResource(16383, 16383))
        tap.warnIfFewOpenFiles(4096, _FakeResource(16384, 16384))
        tap.warnIfFewOpenFiles(4096, _FakeResource(_FakeResource.RLIM_INFINITY, -1))
        said = [formatEvent(e) for e in events if "open files limit" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        self.assertIn("(16383) is below 4 x sftp.max_handles_per_container (4096)", said[0])
