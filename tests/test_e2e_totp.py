"""
End-to-end tests of TOTP, the second factor: turned on with the CLI and the API, then logins
with a password or a key and the code asked by keyboard-interactive (``Verification code: ``),
by OpenSSH (answering through SSH_ASKPASS), paramiko, asyncssh and PuTTY's psftp; a code used
once refused the second time; a wrong code a failed login the defender counts.
"""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import unittest

from lightd_conch.totp import STEP, code
from tests.harness import (
    HOST,
    REPO_ROOT,
    _run_client,
    default_config,
    make_credentials,
    require_binary,
    require_paramiko,
    start_service,
    within,
)
from tests.test_e2e_api import APITestCase
from tests.test_e2e_keys import add_key, keygen, options

PROMPT = "Verification code: "


def require_tool(name, source):
    """The path of a client that is not part of openssh-client, or skip saying where it comes from."""
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest(f"{name!r} is not on PATH ({source})")
    return path


def secret_bytes(secret):
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


def current_code(secret, offset=0):
    return code(secret_bytes(secret), int(time.time() // STEP) + offset)


def enable_totp(testcase, service, container="demo"):
    result = service.cli("totp", "enable", container, "--json")
    testcase.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout)["secret"]


def askpass_env(service, password, secret, offset=0):
    """
    An SSH_ASKPASS program that answers the code prompt with the code of now (plus ``offset``
    steps) and any other prompt with ``password``; each prompt is written to a file beside it.
    """
    script = service.client_dir / f"askpass-{time.monotonic_ns()}.py"
    prompts = script.with_suffix(".prompts")
    script.write_text(
        f"#!{sys.executable}\n"
        "import base64, sys, time\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from lightd_conch.totp import STEP, code\n"
        f"open({str(prompts)!r}, 'a').write(sys.argv[1] + '\\n')\n"
        f"if {PROMPT.strip()!r} in sys.argv[1]:\n"
        f"    secret = base64.b32decode({secret!r} + '=' * (-len({secret!r}) % 8))\n"
        f"    print(code(secret, int(time.time() // STEP) + {offset}))\n"
        "else:\n"
        f"    print({password!r})\n"
    )
    script.chmod(0o700)
    env = dict(os.environ)
    env.update(SSH_ASKPASS=str(script), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    return env, prompts


def run_openssh(service, username, env, keys=(), methods="password,keyboard-interactive"):
    sftp = require_binary("sftp")
    batch = service.client_dir / f"batch-{time.monotonic_ns()}"
    batch.write_text("ls\n")
    argv = [sftp, *options(
        service,
        PreferredAuthentications=methods,
        PubkeyAuthentication="yes" if keys else "no",
        IdentitiesOnly="yes",
        KbdInteractiveAuthentication="yes",
    )]
    for key in keys:
        argv += ["-i", str(key)]
    argv += ["-b", str(batch), f"{username}@{HOST}"]
    return _run_client(argv, env, 120, service.client_dir)


def paramiko_totp(testcase, service, username, password, answer):
    """
    A paramiko login by password then the code ``answer``; returns (transport, prompts seen).
    """
    paramiko = require_paramiko()
    transport = paramiko.Transport((HOST, service.port))
    testcase.addCleanup(transport.close)
    transport.banner_timeout = transport.auth_timeout = 30
    transport.start_client(timeout=30)
    remaining = transport.auth_password(username, password)
    testcase.assertEqual(remaining, ["keyboard-interactive"])
    seen = []

    def handler(title, instructions, prompts):
        seen.extend(prompts)
        return [answer] * len(prompts)

    transport.auth_interactive(username, handler)
    return transport, seen


class TOTPLoginTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service)
        self.secret = enable_totp(self, self.service)

    def test_openssh_password_and_code(self):
        """
        OpenSSH logs in with the password, then answers ``Verification code: `` through
        SSH_ASKPASS; the password alone is not enough.
        """
        env, prompts = askpass_env(self.service, self.creds["password"], self.secret)
        code_, out, err = run_openssh(self.service, "demo", env)
        self.assertEqual(code_, 0, err)
        asked = prompts.read_text().splitlines()
        self.assertEqual(len(asked), 2, asked)
        self.assertIn("password", asked[0].lower())
        self.assertTrue(asked[1].endswith(PROMPT), asked)
        self.assertEqual(len(self.service.log_lines("login: user demo", "by password and code")), 1)

        # Without keyboard-interactive, the password alone does not log in.
        env, _ = askpass_env(self.service, self.creds["password"], self.secret, offset=1)
        code_, out, err = run_openssh(self.service, "demo", env, methods="password")
        self.assertNotEqual(code_, 0)

    def test_openssh_key_and_code(self):
        """
        A key is a first factor too: OpenSSH logs in by key, then the code.
        """
        path = keygen(self.service, "k", "ed25519")
        add_key(self, self.service, "demo", path)
        env, prompts = askpass_env(self.service, "no password", self.secret)
        code_, out, err = run_openssh(
            self.service, "demo", env, keys=[path], methods="publickey,keyboard-interactive"
        )
        self.assertEqual(code_, 0, err)
        asked = prompts.read_text().splitlines()
        self.assertEqual(len(asked), 1, asked)
        self.assertTrue(asked[0].endswith(PROMPT), asked)

    def test_paramiko_and_reused_code(self):
        """
        paramiko logs in with the password and the code; the same code is refused the second
        time (a failed login), and the next step's code is still accepted.
        """
        paramiko = require_paramiko()
        first = current_code(self.secret)
        transport, seen = paramiko_totp(self, self.service, "demo", self.creds["password"], first)
        self.assertTrue(transport.is_authenticated())
        self.assertEqual(seen, [(PROMPT, False)])
        client = within(transport, 30, "opening sftp", paramiko.SFTPClient.from_transport, transport)
        self.assertEqual(client.listdir("."), [])
        client.close()
        with self.assertRaises(paramiko.AuthenticationException):
            paramiko_totp(self, self.service, "demo", self.creds["password"], first)
        self.assertTrue(self.service.log_lines("failed login", "wrong verification code"))
        # The step after is within the drift allowed and newer than the one used.
        transport, _ = paramiko_totp(
            self, self.service, "demo", self.creds["password"], current_code(self.secret, 1)
        )
        self.assertTrue(transport.is_authenticated())

    def test_asyncssh(self):
        """
        asyncssh logs in with the password, then the code from its keyboard-interactive hook.
        """
        try:
            import asyncssh
        except ImportError:
            raise unittest.SkipTest("asyncssh is not installed (pip install '.[test]')")
        secret = self.secret
        seen = []

        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self):
                return ""

            def kbdint_challenge_received(self, name, instructions, lang, prompts):
                seen.extend(prompts)
                return [current_code(secret) for _ in prompts]

        async def run():
            async with asyncssh.connect(
                HOST, self.service.port, username="demo", password=self.creds["password"],
                client_keys=None, known_hosts=None, client_factory=Client,
                preferred_auth="password,keyboard-interactive",
            ) as conn:
                async with conn.start_sftp_client() as client:
                    return await client.listdir(".")

        self.assertEqual(sorted(asyncio.run(asyncio.wait_for(run(), 60))), ['.', '..'])
        self.assertEqual(seen, [(PROMPT, False)])

    def test_putty_psftp(self):
        """
        PuTTY's psftp logs in by key (a .ppk made by puttygen) and, with no terminal, reads the
        code from its input.
        """
        psftp = require_tool("psftp", "Debian package putty-tools")
        puttygen = require_tool("puttygen", "Debian package putty-tools")
        path = keygen(self.service, "putty", "ed25519")
        add_key(self, self.service, "demo", path)
        ppk = self.service.client_dir / "putty.ppk"
        subprocess.run([puttygen, str(path), "-O", "private", "-o", str(ppk)],
                       check=True, capture_output=True, timeout=60)
        fingerprint = subprocess.run(
            [require_binary("ssh-keygen"), "-lf", str(self.service.host_key_path)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()[1]
        batch = self.service.client_dir / "psftp-batch"
        batch.write_text("ls\n")
        argv = [psftp, "-P", str(self.service.port), "-i", str(ppk), "-hostkey", fingerprint,
                "-b", str(batch), "-bc", f"demo@{HOST}"]
        result = subprocess.run(
            argv, input=current_code(self.secret) + "\n", capture_output=True, text=True,
            timeout=120, start_new_session=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(PROMPT.strip(), result.stdout + result.stderr)
        self.assertTrue(self.service.log_lines("login: user demo"))


class TOTPDefenderTests(unittest.TestCase):
    timeout = 120

    def test_wrong_code_counts(self):
        """
        A wrong code is a failed login the defender scores: with a threshold of 1 it bans.
        """
        paramiko = require_paramiko()
        config = default_config()
        config["sftp"]["defender"] = {"threshold": 1}
        service = start_service(self, config)
        creds = make_credentials(service)
        secret = enable_totp(self, service)
        wrong = str((int(current_code(secret)) + 500000) % 1000000).zfill(6)
        with self.assertRaises(paramiko.SSHException):
            paramiko_totp(self, service, "demo", creds["password"], wrong)
        service.wait_for_log(lambda text: "banned" in text)
        self.assertTrue(service.log_lines("failed login", "wrong verification code"))
        self.assertTrue(service.log_lines("banned 127.0.0.1"))


class TOTPAPITests(APITestCase):
    def setUp(self):
        super().setUp()
        self.volume()
        self.password = self.assertJSON(self.generate(), 200)["password"]

    def test_enable_disable(self):
        """
        POST shows the secret and an otpauth URI once; with TOTP on the password alone is a
        partial success; DELETE turns it off and the password alone logs in again.
        """
        path = "/containers/demo/sftp/totp"
        body = self.assertJSON(self.request("POST", path, {}), 200)
        self.assertEqual(sorted(body), ["otpauth_uri", "secret"])
        self.assertRegex(body["secret"], r"^[A-Z2-7]{32}$")
        self.assertTrue(body["otpauth_uri"].startswith("otpauth://totp/lightd-sftp:demo?"))
        self.assertIn(f"secret={body['secret']}", body["otpauth_uri"])
        # The store holds it sealed: its bytes are nowhere in the LMDB file.
        data = (self.service.credentials_path / "data.mdb").read_bytes()
        self.assertNotIn(secret_bytes(body["secret"]), data)
        self.assertNotIn(body["secret"].encode(), data)
        key = self.service.storage / "sftp_totp_key"
        self.assertEqual(key.stat().st_mode & 0o777, 0o600)

        transport = self.paramiko.Transport((HOST, self.service.port))
        self.addCleanup(transport.close)
        transport.start_client(timeout=30)
        self.assertEqual(transport.auth_password("demo", self.password), ["keyboard-interactive"])
        self.assertFalse(transport.is_authenticated())
        transport.close()

        self.assertEqual(self.request("DELETE", path).status, 204)
        self.assertJSON(self.request("DELETE", path), 404)
        transport = self.paramiko.Transport((HOST, self.service.port))
        self.addCleanup(transport.close)
        transport.start_client(timeout=30)
        self.assertEqual(transport.auth_password("demo", self.password), [])
        self.assertTrue(transport.is_authenticated())
        self.assertJSON(self.request("POST", "/containers/nobody/sftp/totp", {}), 404)
