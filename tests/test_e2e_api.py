"""
End to end, the admin API over real HTTP on loopback against ``twistd lightd-sftp``: the bearer
token, every endpoint and refusal, the credentials it hands out working over SFTP (paramiko), and
live sessions ended within seconds by a reset or revoke from the API or from the CLI.
"""

import http.client
import json
import os
import re
import socket
import stat
import time

from twisted.trial import unittest

from tests.harness import (
    HOST,
    default_config,
    make_credentials,
    paramiko_sftp,
    paramiko_transport,
    require_paramiko,
    start_service,
)

API_LISTENING = re.compile(r"API listening on (\S+) port (\d+)")
HTTP_TIMEOUT = 30
# Sessions must end within this after a reset or revoke; the service promises 5 s.
SESSION_END_TIMEOUT = 5


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def api_config(**authorization):
    """
    The harness's config with a fixed free SFTP port (see PortZeroTests for port 0).
    """
    config = default_config()
    config["sftp"]["port"] = free_port()
    config["authorization"].update(authorization)
    return config


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:200]!r}>"


class APITestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self, self.config())
        text = self.service.wait_for_log(lambda text: API_LISTENING.search(text))
        match = API_LISTENING.search(text)
        self.assertIsNotNone(match, f"no 'API listening' line in the log:\n{text}")
        self.api_port = int(match.group(2))
        token_path = self.service.storage / "api_token"
        self.token = token_path.read_text().strip() if token_path.exists() else None

    def config(self):
        return api_config()

    def request(self, method, path, body=None, token=True, headers=None):
        """
        Send one request on a fresh connection; ``path`` goes on the wire as given (no
        normalisation of ``..``); a dict body is sent as JSON.
        """
        headers = dict(headers or {})
        if token is True:
            token = self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        connection = http.client.HTTPConnection(HOST, self.api_port, timeout=HTTP_TIMEOUT)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            connection.close()

    def generate(self, container="demo", body=None, **kwargs):
        return self.request(
            "POST", f"/containers/{container}/sftp/credentials", {} if body is None else body,
            **kwargs,
        )

    def volume(self, container="demo"):
        self.service.volume(container).mkdir(parents=True, exist_ok=True)

    def assertJSON(self, response, status):
        self.assertEqual(response.status, status, response)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        return response.json()

    def assertError(self, response, status, message=None):
        body = self.assertJSON(response, status)
        self.assertEqual(list(body), ["error"], response)
        if message is not None:
            self.assertEqual(body["error"], message)
        return body["error"]

    def sftp(self, creds):
        return paramiko_sftp(self, self.service, creds)

    def assertLoginRefused(self, username, password):
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, username, password)

    def assertSessionEnds(self, sftp, timeout=SESSION_END_TIMEOUT):
        """
        ``sftp`` stops working within ``timeout`` seconds: a request fails and its transport
        is no longer active.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                sftp.listdir("/")
            except (OSError, EOFError, self.paramiko.SSHException):
                break
            time.sleep(0.1)
        else:
            self.fail(f"the session still works {timeout}s after its credentials changed")
        transport = sftp.get_channel().get_transport()
        while transport.is_active() and time.monotonic() < deadline + 1:
            time.sleep(0.05)
        self.assertFalse(transport.is_active())


class AuthorizationTests(APITestCase):
    def test_token_generated_into_storage(self):
        path = self.service.storage / "api_token"
        self.assertRegex(self.token, r"^lightd_[0-9a-f]{32}$")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        log = self.service.log_text() + self.service.output_text()
        self.assertIn(str(path), log)
        self.assertNotIn(self.token, log)

        self.service.restart()
        text = self.service.wait_for_log(lambda text: "read from" in text)
        self.assertIn(f"admin API token read from {path}", text)
        self.assertEqual(path.read_text().strip(), self.token)

    def test_missing_token(self):
        self.volume()
        for headers in ({}, {"Authorization": "Basic " + self.token}, {"Authorization": "Bearer"}):
            response = self.generate(token=None, headers=headers)
            self.assertError(response, 401)
            self.assertIn("Bearer", response.headers["WWW-Authenticate"])
        self.assertError(
            self.request("GET", "/containers/demo/sftp/info", token=None),
            401,
            "missing bearer token",
        )
        self.assertEqual(os.listdir(self.service.volume("demo")), [])

    def test_wrong_token(self):
        self.volume()
        for token in ("wrong", self.token[:-1], self.token + "0"):
            response = self.generate(token=token)
            self.assertError(response, 401, "invalid bearer token")
            self.assertIn("Bearer", response.headers["WWW-Authenticate"])
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)

    def test_unknown_route_needs_the_token_too(self):
        self.assertError(self.request("GET", "/nothing/here", token=None), 401)
        self.assertError(self.request("GET", "/nothing/here"), 404, "no such endpoint")


class DisabledAuthorizationTests(APITestCase):
    def config(self):
        return api_config(enabled=False)

    def test_open_with_a_warning(self):
        self.volume()
        self.assertIsNone(self.token)
        self.assertJSON(self.generate(token=None), 200)
        self.assertJSON(self.request("GET", "/containers/demo/sftp/info", token="anything"), 200)
        self.assertIn("authorization is disabled", self.service.log_text())
        self.assertFalse((self.service.storage / "api_token").exists())

    def test_warning_names_the_bound_port(self):
        # server.port is 0: the warning names the port the API really listens on.
        self.assertEqual(self.service.config["server"]["port"], 0)
        lines = self.service.log_lines("authorization is disabled")
        self.assertEqual(len(lines), 1, self.service.log_text())
        self.assertIn(f"connect to {HOST} port {self.api_port} can manage", lines[0])


class PortZeroTests(APITestCase):
    """
    With ``sftp.port`` 0 the API hands out the port the daemon bound, which clients can dial;
    the CLI, which works without the daemon, prints the 0 it is configured with.
    """

    def config(self):
        return default_config()  # sftp.port 0

    def test_bound_port_handed_out(self):
        self.volume()
        creds = self.assertJSON(self.generate(), 200)
        self.assertEqual(self.service.config["sftp"]["port"], 0)
        self.assertNotEqual(self.service.port, 0)
        self.assertEqual(creds["port"], self.service.port)
        info = self.assertJSON(self.request("GET", "/containers/demo/sftp/info"), 200)
        self.assertEqual(info["port"], self.service.port)
        self.sftp(creds).listdir("/")
        result = self.service.cli("credentials", "info", "demo", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["port"], 0)


class CredentialTests(APITestCase):
    def test_create_with_defaults_and_log_in(self):
        self.volume()
        body = self.assertJSON(self.generate(), 200)
        self.assertEqual(sorted(body), ["host", "password", "port", "username", "volume_path"])
        self.assertEqual(body["username"], "demo")
        self.assertEqual(len(body["password"]), 24)
        self.assertRegex(body["password"], r"^[A-Za-z0-9]{24}$")
        self.assertEqual(body["host"], HOST)
        self.assertEqual(body["port"], self.service.port)
        self.assertEqual(body["volume_path"], "/")

        (self.service.volume() / "hello.txt").write_text("hi")
        sftp = self.sftp(body)
        self.assertEqual(sftp.listdir(body["volume_path"]), ["hello.txt"])
        self.assertEqual(sftp.normalize("."), "/")

    def test_lightd_headers(self):
        self.volume()
        response = self.generate(
            body="{}",
            headers={
                "Accept": "Application/vnd.pkglatest+json",
                "Content-Type": "Application/vnd.pkglatest+json",
            },
        )
        self.assertJSON(response, 200)
        response = self.request(
            "GET", "/containers/demo/sftp/info", headers={"Accept": "Application/vnd.pkglatest+json"}
        )
        self.assertJSON(response, 200)
        # No Content-Type, no body, as `curl -X POST` sends.
        self.assertJSON(self.request("POST", "/containers/demo/sftp/credentials"), 200)

    def test_custom_username_and_password(self):
        self.volume()
        body = self.assertJSON(
            self.generate(body={"username": "alice", "password": "correct horse battery"}), 200
        )
        self.assertEqual(body["username"], "alice")
        self.assertEqual(body["password"], "correct horse battery")
        self.sftp(body).listdir("/")
        # The default username is no longer the container id.
        self.assertLoginRefused("demo", "correct horse battery")

    def test_reset_replaces_the_password(self):
        self.volume()
        old = self.assertJSON(self.generate(), 200)
        self.sftp(old).listdir("/")
        new = self.assertJSON(self.generate(), 200)
        self.assertEqual(new["username"], "demo")
        self.assertNotEqual(new["password"], old["password"])
        self.assertLoginRefused("demo", old["password"])
        self.sftp(new).listdir("/")

    def test_info_has_no_password(self):
        self.volume()
        before = int(time.time())
        self.assertJSON(self.generate(body={"username": "alice"}), 200)
        body = self.assertJSON(self.request("GET", "/containers/demo/sftp/info"), 200)
        self.assertEqual(
            sorted(body),
            ["created_at", "host", "port", "updated_at", "username", "volume_path"],
        )
        self.assertEqual(body["username"], "alice")
        self.assertEqual(body["port"], self.service.port)
        self.assertLessEqual(before, body["created_at"])
        self.assertLessEqual(body["created_at"], body["updated_at"])
        self.assertLessEqual(body["updated_at"], time.time() + 1)

    def test_not_found(self):
        self.assertError(self.generate("ghost"), 404, "container volume does not exist")
        self.assertFalse(self.service.volume("ghost").exists())
        self.volume()
        missing = "SFTP credentials not found for this container"
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404, missing)
        self.assertError(self.request("DELETE", "/containers/demo/sftp/credentials"), 404, missing)

    def test_username_taken(self):
        self.volume("web")
        self.volume("db")
        self.assertJSON(self.generate("web", body={"username": "shared"}), 200)
        message = self.assertError(self.generate("db", body={"username": "shared"}), 409)
        self.assertIn("shared", message)
        self.assertError(self.request("GET", "/containers/db/sftp/info"), 404)

    def test_delete_refuses_login(self):
        self.volume()
        creds = self.assertJSON(self.generate(), 200)
        self.sftp(creds).listdir("/")
        response = self.request("DELETE", "/containers/demo/sftp/credentials")
        self.assertEqual(response.status, 204, response)
        self.assertEqual(response.body, b"")
        self.assertLoginRefused("demo", creds["password"])
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)
        # The username is free again.
        self.volume("other")
        self.assertJSON(self.generate("other", body={"username": "demo"}), 200)


class BadRequestTests(APITestCase):
    def test_bad_container_ids(self):
        for container in ("..", "a/b", "a%2Fb", "a%2fb", "a" * 65, "-demo", ".demo", "a%00b"):
            with self.subTest(container=container):
                for method, suffix in (
                    ("POST", "credentials"),
                    ("GET", "info"),
                    ("DELETE", "credentials"),
                ):
                    response = self.request(
                        method,
                        f"/containers/{container}/sftp/{suffix}",
                        {} if method == "POST" else None,
                    )
                    self.assertIn("invalid container id", self.assertError(response, 400))
        # 64 characters is fine: the volume is what is missing.
        self.assertError(self.generate("a" * 64), 404, "container volume does not exist")

    def test_bad_passwords(self):
        self.volume()
        for password in ("", "1234567", "x" * 73, "é" * 37):
            response = self.generate(body={"password": password})
            message = self.assertError(response, 400)
            self.assertIn("8 to 72 bytes", message)
        self.assertJSON(self.generate(body={"password": "x" * 72}), 200)

    def test_bad_usernames(self):
        self.volume()
        for username in ("..", "a/b", "-x", "a" * 65):
            response = self.generate(body={"username": username})
            self.assertIn("invalid username", self.assertError(response, 400))

    def test_malformed_json(self):
        self.volume()
        for body in ('{"username": ', "not json", "{'a': 1}"):
            response = self.generate(body=body, headers={"Content-Type": "application/json"})
            self.assertIn("not valid JSON", self.assertError(response, 400))
        self.assertError(self.generate(body="[]"), 400, "request body must be a JSON object")
        self.assertError(self.generate(body={"username": 5}), 400, '"username" must be a string')
        self.assertError(self.generate(body={"password": []}), 400, '"password" must be a string')
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)

    def test_body_too_large(self):
        self.volume()
        body = json.dumps({"pad": "x" * (64 * 1024)})
        response = self.generate(body=body, headers={"Content-Type": "application/json"})
        self.assertError(response, 413)
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)

    def test_unsupported_media_type(self):
        self.volume()
        response = self.generate(body="{}", headers={"Content-Type": "text/plain"})
        self.assertError(response, 415)

    def test_malformed_multipart_gets_json(self):
        # twisted.web would parse a multipart body itself and answer a malformed one with a bare
        # 400, before the token check; it is answered like any body that is not JSON.
        self.volume()
        for content_type in ("multipart/form-data", "multipart/form-data; boundary=xyz"):
            headers = {"Content-Type": content_type}
            self.assertError(
                self.generate(body="{}", headers=headers, token=None), 401, "missing bearer token"
            )
            self.assertError(self.generate(body="--xyz\r\nbroken", headers=headers), 415)
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)

    def test_unknown_route_and_wrong_method(self):
        for path in ("/", "/containers/demo", "/containers/demo/sftp/nothing", "/v1/x/y/z"):
            self.assertError(self.request("GET", path), 404, "no such endpoint")
        response = self.request("PUT", "/containers/demo/sftp/credentials", "{}")
        self.assertError(response, 405)
        self.assertEqual(response.headers["Allow"], "POST, DELETE")
        response = self.request("POST", "/containers/demo/sftp/info", "{}")
        self.assertError(response, 405)
        self.assertEqual(response.headers["Allow"], "GET")


class SessionEndTests(APITestCase):
    """
    A reset or revoke ends that container's live sessions within 5 seconds, from the API or
    from the CLI (another process writing the store), and leaves other containers' alone.
    """

    def setUp(self):
        super().setUp()
        self.demo = make_credentials(self.service, "demo")
        self.other = make_credentials(self.service, "other")
        self.demo_sftp = self.sftp(self.demo)
        self.other_sftp = self.sftp(self.other)
        self.demo_sftp.listdir("/")
        self.other_sftp.listdir("/")

    def assertOtherUntouched(self):
        self.other_sftp.open("still-here.txt", "w").close()
        self.assertIn("still-here.txt", self.other_sftp.listdir("/"))
        self.assertTrue(self.other_sftp.get_channel().get_transport().is_active())

    def assertEndLogged(self, why):
        text = self.service.wait_for_log(lambda text: "ending session" in text)
        lines = self.service.log_lines("ending session")
        self.assertEqual(len(lines), 1, text)
        self.assertIn("container demo", lines[0])
        self.assertIn(f"credentials {why}", lines[0])

    def test_cli_reset_ends_the_session(self):
        result = self.service.cli(
            "credentials", "generate", "demo", "--password-stdin",
            stdin="a-brand-new-password\n",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertSessionEnds(self.demo_sftp)
        self.assertOtherUntouched()
        self.assertEndLogged("changed")
        self.sftp({"username": "demo", "password": "a-brand-new-password"}).listdir("/")
        self.assertLoginRefused("demo", self.demo["password"])

    def test_cli_revoke_ends_the_session(self):
        result = self.service.cli("credentials", "revoke", "demo")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertSessionEnds(self.demo_sftp)
        self.assertOtherUntouched()
        self.assertEndLogged("revoked")

    def test_api_reset_ends_the_session(self):
        new = self.assertJSON(self.generate(), 200)
        self.assertSessionEnds(self.demo_sftp)
        self.assertOtherUntouched()
        self.sftp(new).listdir("/")

    def test_api_revoke_ends_the_session(self):
        response = self.request("DELETE", "/containers/demo/sftp/credentials")
        self.assertEqual(response.status, 204)
        self.assertSessionEnds(self.demo_sftp)
        self.assertOtherUntouched()

    def test_info_and_failed_requests_end_nothing(self):
        self.assertJSON(self.request("GET", "/containers/demo/sftp/info"), 200)
        self.assertError(self.generate(body={"password": "short"}), 400)
        self.assertError(self.generate(body={"username": "other"}), 409)
        time.sleep(1.5)
        self.demo_sftp.listdir("/")
        self.assertOtherUntouched()
