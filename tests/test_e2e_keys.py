"""
End-to-end tests of public-key logins: keys added with the CLI and the API, OpenSSH ``sftp -i``
with each key type ssh-keygen makes, paramiko and asyncssh by key with no password, a removed
key's session ending, key-only containers, per-container allow-lists with keys, and OpenSSH
offering keys that are not the container's without being counted as failed logins.
"""

import asyncio
import json
import os
import shutil
import subprocess
import time
import unittest

from tests.harness import (
    HOST,
    REPO_ROOT,
    _askpass_env,
    _close_quietly,
    _run_client,
    _ssh_options,
    default_config,
    make_credentials,
    require_binary,
    require_paramiko,
    start_service,
    within,
)
from tests.test_e2e_api import APITestCase
from tests.test_e2e_operations import audit_entries, wait_for

SESSION_END_TIMEOUT = 8


def keygen(service, name, keyType, bits=None):
    """A new key pair made by ssh-keygen in the test's client folder; returns the private key's path."""
    ssh_keygen = require_binary("ssh-keygen")
    path = service.client_dir / name
    argv = [ssh_keygen, "-q", "-t", keyType, "-N", "", "-C", f"{name}@test", "-f", str(path)]
    if bits is not None:
        argv[4:4] = ["-b", str(bits)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return path


def ssh_fingerprint(path):
    """The fingerprint ``ssh-keygen -lf`` prints for the public key beside ``path``."""
    result = subprocess.run(
        [require_binary("ssh-keygen"), "-lf", f"{path}.pub"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return result.stdout.split()[1]


def add_key(testcase, service, container, path):
    result = service.cli("keys", "add", container, f"{path}.pub", "--json")
    testcase.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout)


def options(service, **overrides):
    """
    The harness's OpenSSH options with some ``-o NAME=VALUE`` replaced (OpenSSH keeps the first
    value it is given, so they are replaced rather than appended).
    """
    argv = _ssh_options(service, False)
    out = []
    for i, word in enumerate(argv):
        if i and argv[i - 1] == "-o":
            name = word.split("=", 1)[0]
            if name in overrides:
                word = f"{name}={overrides.pop(name)}"
        out.append(word)
    for name, value in overrides.items():
        out += ["-o", f"{name}={value}"]
    return out


def run_sftp_key(service, username, keys, batch_lines, password=None, **overrides):
    """
    OpenSSH ``sftp -b`` logging in with ``keys`` (``-i`` each, IdentitiesOnly), and ``password``
    through SSH_ASKPASS if given.  Returns (exit code, stdout, stderr).
    """
    sftp = require_binary("sftp")
    batch = service.client_dir / f"batch-{time.monotonic_ns()}"
    batch.write_text("".join(line + "\n" for line in batch_lines))
    settings = {
        "PubkeyAuthentication": "yes",
        "PreferredAuthentications": "publickey,password" if password else "publickey",
        "IdentitiesOnly": "yes",
        **overrides,
    }
    argv = [sftp, *options(service, **settings)]
    for key in keys:
        argv += ["-i", str(key)]
    argv += ["-b", str(batch), f"{username}@{HOST}"]
    return _run_client(argv, _askpass_env(service, password or "unused"), 120, service.client_dir)


def paramiko_key_transport(testcase, service, username, path, keyClass):
    paramiko = require_paramiko()
    transport = paramiko.Transport((HOST, service.port))
    testcase.addCleanup(transport.close)
    transport.banner_timeout = transport.auth_timeout = 30
    transport.start_client(timeout=30)
    transport.auth_publickey(username, keyClass.from_private_key_file(str(path)))
    return transport


class KeyLoginTests(unittest.TestCase):
    """
    Logins by key with real clients, keys added with the CLI.
    """

    timeout = 300

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service)

    def test_openssh_each_key_type(self):
        """
        OpenSSH ``sftp -i`` logs in with no password with each key type ssh-keygen makes:
        ed25519, ECDSA on each NIST curve and RSA 3072 (signing with SHA-2); the key's
        fingerprint is the one ``ssh-keygen -lf`` prints.
        """
        for name, keyType, bits in [
            ("ed25519", "ed25519", None),
            ("ecdsa256", "ecdsa", 256),
            ("ecdsa384", "ecdsa", 384),
            ("ecdsa521", "ecdsa", 521),
            ("rsa3072", "rsa", 3072),
        ]:
            with self.subTest(key=name):
                path = keygen(self.service, name, keyType, bits)
                added = add_key(self, self.service, "demo", path)
                self.assertEqual(added["fingerprint"], ssh_fingerprint(path))
                self.assertEqual(added["comment"], f"{name}@test")
                (self.service.client_dir / f"{name}.txt").write_text(name)
                code, out, err = run_sftp_key(
                    self.service, self.creds["username"], [path],
                    [f"put {name}.txt", "ls -1"],
                    BatchMode="yes",
                )
                self.assertEqual(code, 0, err)
                self.assertEqual((self.service.volume() / f"{name}.txt").read_text(), name)
                # The log says which key logged in.
                self.assertEqual(
                    len(self.service.log_lines("login: user demo", f"by publickey {added['fingerprint']}")),
                    1,
                )
        self.assertEqual(self.service.log_lines("failed login"), [])
        self.assertEqual(len(self.service.log_lines("login: user demo")), 5)

    def test_rsa_sha1_signature_refused(self):
        """
        An RSA key may sign with SHA-2 only: a client held to ``ssh-rsa`` (SHA-1) signatures is
        refused, with the same key that logs in with rsa-sha2-512.
        """
        path = keygen(self.service, "rsa", "rsa", 2048)
        add_key(self, self.service, "demo", path)
        code, out, err = run_sftp_key(
            self.service, "demo", [path], ["ls"], BatchMode="yes",
            PubkeyAcceptedAlgorithms="ssh-rsa",
        )
        self.assertNotEqual(code, 0)
        code, out, err = run_sftp_key(
            self.service, "demo", [path], ["ls"], BatchMode="yes",
            PubkeyAcceptedAlgorithms="rsa-sha2-512",
        )
        self.assertEqual(code, 0, err)

    def test_paramiko_by_key(self):
        """
        paramiko logs in by key (ed25519 and RSA) with no password and uses SFTP.
        """
        paramiko = require_paramiko()
        for name, keyType, bits, keyClass in [
            ("p-ed25519", "ed25519", None, paramiko.Ed25519Key),
            ("p-rsa", "rsa", 3072, paramiko.RSAKey),
            ("p-ecdsa", "ecdsa", 384, paramiko.ECDSAKey),
        ]:
            with self.subTest(key=name):
                path = keygen(self.service, name, keyType, bits)
                add_key(self, self.service, "demo", path)
                transport = paramiko_key_transport(self, self.service, "demo", path, keyClass)
                self.assertTrue(transport.is_authenticated())
                client = within(transport, 30, "opening sftp",
                                paramiko.SFTPClient.from_transport, transport)
                with client.open(f"{name}.txt", "w") as f:
                    f.write(name)
                client.close()
                transport.close()
                self.assertEqual((self.service.volume() / f"{name}.txt").read_text(), name)

    def test_asyncssh_by_key(self):
        """
        asyncssh logs in by key with no password and uses SFTP.
        """
        try:
            import asyncssh
        except ImportError:
            raise unittest.SkipTest("asyncssh is not installed (pip install '.[test]')")
        path = keygen(self.service, "a-ed25519", "ed25519")
        add_key(self, self.service, "demo", path)

        async def run():
            async with asyncssh.connect(
                HOST, self.service.port, username="demo", client_keys=[str(path)],
                password=None, known_hosts=None, preferred_auth="publickey",
            ) as conn:
                async with conn.start_sftp_client() as client:
                    async with client.open("async.txt", "w") as f:
                        await f.write("by key")
                    return await client.listdir(".")

        names = asyncio.run(asyncio.wait_for(run(), 60))
        self.assertIn("async.txt", names)
        self.assertEqual((self.service.volume() / "async.txt").read_text(), "by key")

    def test_foreign_key_refused(self):
        """
        A key that is not the container's does not log in, and is not a failed login.
        """
        mine = keygen(self.service, "mine", "ed25519")
        other = keygen(self.service, "other", "ed25519")
        add_key(self, self.service, "demo", mine)
        code, out, err = run_sftp_key(self.service, "demo", [other], ["ls"], BatchMode="yes")
        self.assertNotEqual(code, 0)
        self.assertIn("Permission denied", err)

    def test_removed_key_session_ends(self):
        """
        Removing a key (CLI) ends, within seconds, the session that logged in with it, and
        only that one: a session of another key of the same container lives on.
        """
        paramiko = require_paramiko()
        gone = keygen(self.service, "gone", "ed25519")
        kept = keygen(self.service, "kept", "ed25519")
        add_key(self, self.service, "demo", gone)
        add_key(self, self.service, "demo", kept)
        doomed = paramiko_key_transport(self, self.service, "demo", gone, paramiko.Ed25519Key)
        living = paramiko_key_transport(self, self.service, "demo", kept, paramiko.Ed25519Key)
        result = self.service.cli("keys", "remove", "demo", ssh_fingerprint(gone))
        self.assertEqual(result.returncode, 0, result.stderr)
        deadline = time.monotonic() + SESSION_END_TIMEOUT
        while doomed.is_active() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(doomed.is_active(), "the removed key's session is still open")
        self.assertTrue(living.is_active())
        client = within(living, 30, "opening sftp", paramiko.SFTPClient.from_transport, living)
        self.assertEqual(client.listdir("."), [])
        _close_quietly(client.close)
        self.assertTrue(self.service.log_lines("key removed"))
        # The removed key no longer logs in.
        code, out, err = run_sftp_key(self.service, "demo", [gone], ["ls"], BatchMode="yes")
        self.assertNotEqual(code, 0)

    def test_key_only_container(self):
        """
        With ``password_login`` false, the key logs in and the right password is refused.
        """
        path = keygen(self.service, "only", "ed25519")
        add_key(self, self.service, "demo", path)
        result = self.service.cli("policy", "set", "demo", "password_login=false")
        self.assertEqual(result.returncode, 0, result.stderr)
        code, out, err = run_sftp_key(self.service, "demo", [path], ["ls"], BatchMode="yes")
        self.assertEqual(code, 0, err)
        paramiko = require_paramiko()
        transport = paramiko.Transport((HOST, self.service.port))
        self.addCleanup(transport.close)
        transport.start_client(timeout=30)
        with self.assertRaises(paramiko.SSHException):
            transport.auth_password("demo", self.creds["password"])
        self.assertFalse(transport.is_authenticated())
        self.assertTrue(self.service.log_lines("password logins are disabled"))

    def test_container_allowed_ips_with_keys(self):
        """
        The policy's ``allowed_ips`` holds for key logins: refused from outside it, admitted
        from inside it.
        """
        path = keygen(self.service, "where", "ed25519")
        add_key(self, self.service, "demo", path)
        self.assertEqual(
            self.service.cli("policy", "set", "demo", "allowed_ips=10.0.0.0/8,::2").returncode, 0
        )
        code, out, err = run_sftp_key(self.service, "demo", [path], ["ls"], BatchMode="yes")
        self.assertNotEqual(code, 0)
        self.assertTrue(self.service.log_lines("logins from this address are not allowed"))
        self.assertEqual(
            self.service.cli("policy", "set", "demo", "allowed_ips=10.0.0.0/8,127.0.0.1").returncode,
            0,
        )
        code, out, err = run_sftp_key(self.service, "demo", [path], ["ls"], BatchMode="yes")
        self.assertEqual(code, 0, err)

    def test_revoke_removes_keys(self):
        """
        A revoke removes the container's keys with its password: credentials generated
        afterwards start with none, and the old key no longer logs in.
        """
        path = keygen(self.service, "old", "ed25519")
        add_key(self, self.service, "demo", path)
        self.assertEqual(self.service.cli("credentials", "revoke", "demo").returncode, 0)
        make_credentials(self.service)
        listed = self.service.cli("keys", "list", "demo", "--json")
        self.assertEqual(json.loads(listed.stdout), [])
        code, out, err = run_sftp_key(self.service, "demo", [path], ["ls"], BatchMode="yes")
        self.assertNotEqual(code, 0)


class ForeignKeysTests(unittest.TestCase):
    """
    OpenSSH offers every key it holds; keys that are not the container's are no failed login.
    """

    timeout = 600

    def test_twelve_logins_with_five_foreign_keys(self):
        """
        Twelve logins in a row, each offering five foreign keys before the right password, leave
        the address unbanned with the default defender settings, and the log shows no failed
        login.  (Had each key scored even the lowest score, 60 points would pass the default
        threshold of 15 four times over.)
        """
        service = start_service(self)
        creds = make_credentials(service)
        foreign = [keygen(service, f"foreign{i}", "ed25519") for i in range(5)]
        for attempt in range(12):
            code, out, err = run_sftp_key(
                service, creds["username"], foreign, ["ls"], password=creds["password"]
            )
            self.assertEqual(code, 0, f"login {attempt + 1}: {err}")
        self.assertEqual(service.log_lines("failed login"), [])
        self.assertEqual(service.log_lines("banned"), [])
        self.assertEqual(len(service.log_lines("login: user demo")), 12)
        # Still admitted: a thirteenth login works.
        code, out, err = run_sftp_key(
            service, creds["username"], foreign, ["ls"], password=creds["password"]
        )
        self.assertEqual(code, 0, err)

    def test_only_foreign_keys_counts_once(self):
        """
        A connection that offers only foreign keys and gives up is one failed login, scored
        once: with a threshold of 2, two such connections ban the address.
        """
        config = default_config()
        config["sftp"]["defender"] = {"threshold": 2}
        service = start_service(self, config)
        make_credentials(service)
        foreign = [keygen(service, f"f{i}", "ed25519") for i in range(3)]
        code, out, err = run_sftp_key(service, "demo", foreign, ["ls"], BatchMode="yes")
        self.assertNotEqual(code, 0)
        service.wait_for_log(lambda text: "disconnected before logging in" in text)
        self.assertEqual(len(service.log_lines("failed login")), 1)
        self.assertEqual(service.log_lines("banned"), [])
        run_sftp_key(service, "demo", foreign, ["ls"], BatchMode="yes")
        service.wait_for_log(lambda text: "banned" in text)
        self.assertEqual(len(service.log_lines("banned 127.0.0.1")), 1)


class KeyAPITests(APITestCase):
    """
    The keys endpoints, and what they change for logins.
    """

    def setUp(self):
        super().setUp()
        self.volume()
        self.assertJSON(self.generate(), 200)

    def keys_path(self, container="demo"):
        return f"/containers/{container}/sftp/keys"

    def test_add_list_remove(self):
        path = keygen(self.service, "api", "ed25519")
        line = (path.parent / "api.pub").read_text()
        added = self.assertJSON(
            self.request("POST", self.keys_path(), {"public_key": line}), 201
        )
        self.assertEqual(added["fingerprint"], ssh_fingerprint(path))
        self.assertEqual(added["type"], "ssh-ed25519")
        self.assertEqual(added["comment"], "api@test")
        self.assertIsInstance(added["added_at"], int)
        self.assertEqual(self.assertJSON(self.request("GET", self.keys_path()), 200), [added])
        # A fingerprint holds "/" and "+": URL-escaped, or in URL-safe base64.
        urlsafe = added["fingerprint"].replace("+", "-").replace("/", "_")
        response = self.request("DELETE", f"{self.keys_path()}/{urlsafe}")
        self.assertEqual(response.status, 204, response.body)
        self.assertEqual(self.assertJSON(self.request("GET", self.keys_path()), 200), [])
        response = self.request("DELETE", f"{self.keys_path()}/{urlsafe}")
        self.assertJSON(response, 404)
        # Both changes are in the audit log, with the key, never its body.
        def keyEvents():
            found = [e for e in audit_entries(self.service)
                     if e["event"] in ("key_added", "key_removed")]
            return found if len(found) == 2 else None

        entries = wait_for(keyEvents, what="both key events in the audit log")
        self.assertEqual([e["event"] for e in entries], ["key_added", "key_removed"])
        self.assertEqual({e["fingerprint"] for e in entries}, {added["fingerprint"]})
        self.assertEqual({e["container"] for e in entries}, {"demo"})
        self.assertNotIn(line.split()[1], (self.service.storage / "sftp_audit.log").read_text())

    def test_refusals_name_why(self):
        weak = keygen(self.service, "weak", "rsa", 1024)
        good = keygen(self.service, "good", "ed25519")
        goodLine = (good.parent / "good.pub").read_text()
        cases = [
            ((weak.parent / "weak.pub").read_text(), "too weak"),
            ("command=\"ls\" " + goodLine, "options"),
            ("from=\"10.0.0.1\" " + goodLine, "options"),
            ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "not accepted"),
            ("ssh-ed25519 not-base64!", "not base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAA", "not a valid key"),
            (goodLine + goodLine, "one authorized_keys line"),
            ("", "empty"),
        ]
        for line, why in cases:
            with self.subTest(why=why):
                body = self.assertJSON(
                    self.request("POST", self.keys_path(), {"public_key": line}), 400
                )
                self.assertIn(why, body["error"])
        self.assertJSON(self.request("POST", self.keys_path(), {"public_key": goodLine}), 201)
        body = self.assertJSON(
            self.request("POST", self.keys_path(), {"public_key": goodLine}), 400
        )
        self.assertIn("already", body["error"])
        self.assertJSON(self.request("POST", self.keys_path(), {"key": goodLine}), 400)
        self.assertJSON(
            self.request("POST", self.keys_path("nobody"), {"public_key": goodLine}), 404
        )

    def test_remove_ends_session(self):
        """
        DELETE of a key ends the session that logged in with it within seconds.
        """
        path = keygen(self.service, "live", "ed25519")
        added = self.assertJSON(
            self.request("POST", self.keys_path(),
                         {"public_key": (path.parent / "live.pub").read_text()}),
            201,
        )
        transport = paramiko_key_transport(
            self, self.service, "demo", path, self.paramiko.Ed25519Key
        )
        quoted = added["fingerprint"].replace("/", "%2F").replace("+", "%2B")
        self.assertEqual(self.request("DELETE", f"{self.keys_path()}/{quoted}").status, 204)
        deadline = time.monotonic() + SESSION_END_TIMEOUT
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(transport.is_active())


class SSHAuditTests(unittest.TestCase):
    """
    ssh-audit finds nothing to fail in what the service offers, keys and all.
    """

    timeout = 180

    def test_no_fail(self):
        ssh_audit = shutil.which("ssh-audit")
        if ssh_audit is None:
            raise unittest.SkipTest("'ssh-audit' is not on PATH (pip install '.[test]')")
        service = start_service(self)
        make_credentials(service)
        result = subprocess.run(
            [ssh_audit, "-n", "-p", str(service.port), HOST],
            capture_output=True, text=True, timeout=150,
        )
        self.assertIn("(key) ssh-ed25519", result.stdout, result.stdout + result.stderr)
        self.assertIn("(kex) mlkem768x25519-sha256", result.stdout)
        self.assertNotIn("[fail]", result.stdout)
        # Scanning is not logging in: no failed login, no ban.
        self.assertEqual(service.log_lines("failed login"), [])


class Ssh2KeyTests(unittest.TestCase):
    """
    ssh2 (npm), the engine of VS Code's SFTP extensions, by key ("privateKeyPath") and with a
    TOTP code ("interactiveAuth"), through tests/ssh2_driver.js.
    """

    timeout = 180

    def setUp(self):
        from tests.test_e2e_engines import NODE_MODULES

        self.node = require_binary("node")
        if not (NODE_MODULES / "ssh2-sftp-client").is_dir():
            raise unittest.SkipTest(f"ssh2-sftp-client is not installed in {NODE_MODULES} "
                                    "(.ci/run installs it with npm)")
        self.modules = NODE_MODULES
        self.service = start_service(self)
        self.creds = make_credentials(self.service)
        self.fingerprint = subprocess.run(
            [require_binary("ssh-keygen"), "-lf", str(self.service.host_key_path)],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()[1]

    def ssh2(self, **request):
        request = {"host": HOST, "port": self.service.port, "username": "demo",
                   "fingerprint": self.fingerprint, "ops": [["list", "/"]], **request}
        result = subprocess.run(
            [self.node, str(REPO_ROOT / "tests" / "ssh2_driver.js")],
            input=json.dumps(request), capture_output=True, text=True, timeout=120,
            env={**os.environ, "NODE_PATH": str(self.modules)}, cwd=self.service.client_dir,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        self.assertTrue(lines, result.stderr)
        return lines

    def test_key(self):
        for name, keyType, bits in [("s-ed25519", "ed25519", None), ("s-rsa", "rsa", 3072)]:
            with self.subTest(key=name):
                path = keygen(self.service, name, keyType, bits)
                add_key(self, self.service, "demo", path)
                lines = self.ssh2(privateKey=str(path))
                self.assertEqual(lines[0], {"login": True}, lines)
                self.assertTrue(lines[1]["ok"], lines)
        self.assertEqual(self.service.log_lines("failed login"), [])

    def test_key_and_code(self):
        import base64 as b64

        from lightd_conch.totp import STEP, code

        path = keygen(self.service, "s-totp", "ed25519")
        add_key(self, self.service, "demo", path)
        result = self.service.cli("totp", "enable", "demo", "--json")
        secret = json.loads(result.stdout)["secret"]
        now = code(b64.b32decode(secret + "=" * (-len(secret) % 8)), int(time.time() // STEP))
        lines = self.ssh2(privateKey=str(path), keyboard=[now])
        self.assertEqual(lines[0], {"prompts": ["Verification code: "]}, lines)
        self.assertEqual(lines[1], {"login": True}, lines)
        self.assertTrue(lines[2]["ok"], lines)
        self.assertEqual(
            len(self.service.log_lines("login: user demo", "by publickey", "and code")), 1
        )
