"""
The service as an operator runs it: a host key that survives restarts, passwords that never
reach the disk or the log, one log line per login / failed login / logout, and a bad config that
stops the start before anything is bound or written.
"""

import json
import os
import re
import socket
import stat
import subprocess
import time
import uuid

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.trial import unittest

from tests.harness import (
    REPO_ROOT,
    START_TIMEOUT,
    Service,
    default_config,
    make_credentials,
    make_temp_root,
    paramiko_sftp,
    paramiko_transport,
    require_binary,
    require_paramiko,
    run_sftp,
    service_env,
    start_service,
    twistd_command,
    write_config,
)


class HostKeyTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")

    def server_key(self):
        transport = paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )
        key = transport.get_remote_server_key()
        transport.close()
        return key

    def test_host_key_is_ed25519_and_private(self):
        self.assertEqual(self.server_key().get_name(), "ssh-ed25519")
        self.assertTrue(self.service.host_key_path.is_file())
        self.assertEqual(stat.S_IMODE(os.stat(self.service.host_key_path).st_mode), 0o600)

    def test_fingerprint_unchanged_after_restart(self):
        first = self.server_key()
        key_file = self.service.host_key_path.read_bytes()
        self.service.restart()
        second = self.server_key()
        self.assertEqual(second.get_fingerprint(), first.get_fingerprint())
        self.assertEqual(second.asbytes(), first.asbytes())
        self.assertEqual(self.service.host_key_path.read_bytes(), key_file)
        self.assertEqual(stat.S_IMODE(os.stat(self.service.host_key_path).st_mode), 0o600)

    def test_openssh_sees_the_same_host_after_restart(self):
        require_binary("sftp")
        rc, out, err = run_sftp(self.service, self.creds, ["pwd"])
        self.assertEqual(rc, 0, err)
        self.service.restart()
        rc, out, err = run_sftp(self.service, self.creds, ["pwd"], strict_host_key=True)
        self.assertEqual(rc, 0, err)
        self.assertNotIn("REMOTE HOST IDENTIFICATION HAS CHANGED", err)
        self.assertIn("Remote working directory: /", out)


def ed25519_pem():
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


class LooseHostKeyTests(unittest.TestCase):
    timeout = 60

    def test_host_key_readable_by_others_is_warned(self):
        # The same warning as for an API token file with group or other access.
        service = Service(self)
        service.storage.mkdir()
        service.host_key_path.write_bytes(ed25519_pem())
        os.chmod(service.host_key_path, 0o644)
        service.start()
        text = service.wait_for_log(lambda text: "readable by others" in text)
        self.assertIn(
            f"the SSH host key file {service.host_key_path} is readable by others (mode 0644);"
            " chmod 600 it",
            text,
        )


class SecretsAndLogTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self)

    def stored_bytes(self):
        """Every byte under storage/sftp_credentials, the LMDB environment."""
        chunks = []
        for folder, _, files in os.walk(self.service.credentials_path):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    chunks.append(f.read())
        self.assertTrue(chunks, "no credential store found at storage/sftp_credentials")
        return b"".join(chunks)

    def test_no_plaintext_password_in_store_or_log(self):
        creds = make_credentials(self.service, "demo")
        custom = make_credentials(self.service, "web", password="Custom-" + uuid.uuid4().hex)
        wrong = "Wrong-" + uuid.uuid4().hex
        ghost = "Ghost-" + uuid.uuid4().hex

        paramiko_sftp(self, self.service, creds).listdir("/")
        paramiko_sftp(self, self.service, custom).listdir("/")
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "demo", wrong)
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "ghost", ghost)
        self.service.wait_for_log(lambda text: "ghost" in text)

        secrets = [creds["password"], custom["password"], wrong, ghost]
        stored = self.stored_bytes()
        log = self.service.log_text() + self.service.output_text()
        for secret in secrets:
            self.assertNotIn(secret.encode(), stored)
            self.assertNotIn(secret, log)
        # The store holds bcrypt hashes instead.
        self.assertRegex(stored, rb"\$2[aby]\$\d\d\$")

        self.service.stop()
        stored = self.stored_bytes()
        log = self.service.log_text()
        for secret in secrets:
            self.assertNotIn(secret.encode(), stored)
            self.assertNotIn(secret, log)

    def test_login_failed_login_and_logout_are_logged_once(self):
        creds = make_credentials(self.service, "demo")
        transport = paramiko_transport(self, self.service, "demo", creds["password"])
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "demo", "not-the-password")
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "ghost", "not-the-password")
        transport.close()

        self.service.wait_for_log(
            lambda text: "logout" in text and "ghost" in text and text.count("failed login") >= 2
        )
        demo_lines = [line for line in self.service.log_lines("demo") if "127.0.0.1" in line]
        logins = [line for line in demo_lines if re.search(r"(?<!failed )\blogin\b", line)]
        failed = [line for line in demo_lines if "failed login" in line]
        logouts = [line for line in demo_lines if "logout" in line]
        self.assertEqual(len(logins), 1, self.service.log_text())
        self.assertEqual(len(failed), 1, self.service.log_text())
        self.assertEqual(len(logouts), 1, self.service.log_text())
        ghost = [l for l in self.service.log_lines("ghost", "failed login") if "127.0.0.1" in l]
        self.assertEqual(len(ghost), 1, self.service.log_text())

    def test_usernames_cannot_forge_log_lines(self):
        # fail2ban-style parsers read one event per line: a username is data, never a new line.
        forged = "x\n2026-01-01T00:00:00+0000 [lightd_conch.ssh#info] login: user demo from 10.6.6.6"
        for username in (forged, "y\r\nlogin: user demo from 10.6.6.6", "z\x1b[2Jcleared"):
            with self.assertRaises(self.paramiko.AuthenticationException):
                paramiko_transport(self, self.service, username, "not-the-password")
        self.service.wait_for_log(lambda text: "cleared" in text)
        lines = self.service.log_text().splitlines()
        bad = [l for l in lines if "10.6.6.6" in l and "failed login" not in l]
        bad += [l for l in lines if "\x1b" in l]
        self.assertEqual(bad, [], "log lines forged or raw control characters from a username")

    def test_no_per_request_log_lines(self):
        creds = make_credentials(self.service, "demo")
        sftp = paramiko_sftp(self, self.service, creds)
        before = len(self.service.log_text().splitlines())
        for i in range(50):
            sftp.listdir("/")
            sftp.normalize(".")
        time.sleep(0.5)
        self.assertLess(len(self.service.log_text().splitlines()) - before, 5)


class BadConfigTests(unittest.TestCase):
    timeout = 60

    def run_twistd(self, config, files=None):
        """
        Run the service on ``config``, with ``files`` ({relative path: bytes}) written beside it
        first; it must exit by itself. Returns (rc, output, root, config_path).
        """
        root = make_temp_root(self)
        config_path = write_config(root, config)
        for name, data in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
            os.chmod(root / name, 0o600)
        log_path = root / "service.log"
        try:
            result = subprocess.run(
                twistd_command(config_path, log_path),
                cwd=root,
                env=service_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as e:
            self.fail(f"the service started on a bad config\n{e.stdout}\n{e.stderr}")
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        return result.returncode, result.stdout + result.stderr + log, root, config_path

    def free_port(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def assertRefusedToStart(self, config, key_pattern, files=None):
        rc, output, root, config_path = self.run_twistd(config, files)
        self.assertNotEqual(rc, 0, output)
        self.assertRegex(output, key_pattern)
        self.assertIn(str(config_path), output)
        self.assertNotRegex(output, r"SFTP listening on")
        self.assertNotIn("Traceback", output)
        self.assertFalse((root / "storage").exists(), "a refused config wrote storage/")
        # The configured port was never bound: it is still free.
        with socket.socket() as s:
            s.bind(("127.0.0.1", config["sftp"]["port"]))
        return output, root, config_path

    def refusal_line(self, output, config_path):
        """The one line naming the config file; there is no other mention of it."""
        lines = [line for line in output.splitlines() if str(config_path) in line]
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def test_non_ed25519_host_keys(self):
        # An RSA key would have the service offer ssh-rsa (SHA-1), an ECDSA key a NIST curve.
        for kind, key in [
            ("an RSA", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            ("an ECDSA", ec.generate_private_key(ec.SECP256R1())),
        ]:
            config = default_config()
            config["sftp"].update(port=self.free_port(), host_key="host_key")
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            output, root, config_path = self.assertRefusedToStart(
                config,
                rf"sftp\.host_key: \S+/host_key is {kind} key; lightd-sftp uses an ED25519 host key",
                files={"host_key": pem},
            )
            self.assertEqual(
                self.refusal_line(output, config_path),
                f"lightd-sftp: {config_path}: sftp.host_key: {root / 'host_key'} is {kind} key;"
                " lightd-sftp uses an ED25519 host key",
            )

    def test_unusable_host_key_shows_no_key_material(self):
        pem = ed25519_pem()
        headerless = b"".join(pem.splitlines(keepends=True)[1:-1])
        for data in (headerless, pem[: len(pem) // 2]):
            config = default_config()
            config["sftp"].update(port=self.free_port(), host_key="host_key")
            output, root, config_path = self.assertRefusedToStart(
                config, r"sftp\.host_key: \S+/host_key is not a private key", files={"host_key": data}
            )
            self.assertRegex(
                self.refusal_line(output, config_path),
                r"^lightd-sftp: \S+: sftp\.host_key: \S+ is not a private key lightd-sftp can read"
                r" \(damaged, truncated, or not in OpenSSH format\)$",
            )
            for line in headerless.splitlines():
                self.assertNotIn(line[:24].decode(), output)

    def test_bind_addresses_must_be_ip_literals(self):
        # "" would bind every interface (the API too); a name or a bad address would fail only
        # when binding, after storage/ had been written.
        for section, host in [("server", ""), ("sftp", ""), ("server", "999.1.1.1"),
                              ("sftp", "localhost")]:
            config = default_config()
            config["sftp"]["port"] = self.free_port()
            config[section]["host"] = host
            output, root, config_path = self.assertRefusedToStart(
                config, rf"{section}\.host: must be an IPv4 or IPv6 address"
            )
            self.refusal_line(output, config_path)

    def test_storage_base_path_is_a_file(self):
        config = default_config()
        config["sftp"]["port"] = self.free_port()
        config["storage"]["base_path"] = "config.json"
        rc, output, root, config_path = self.run_twistd(config)
        self.assertNotEqual(rc, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(
            self.refusal_line(output, config_path),
            f"lightd-sftp: {config_path}: storage.base_path: cannot create the folder"
            f" {config_path}: File exists",
        )

    def test_deeply_nested_config(self):
        root = make_temp_root(self)
        config_path = root / "config.json"
        config_path.write_text("[" * 100000 + "]" * 100000)
        result = subprocess.run(
            twistd_command(config_path, root / "service.log"), cwd=root, env=service_env(),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertIn(f"{config_path}: invalid JSON: nested too deeply", result.stderr)
        self.assertEqual(sorted(os.listdir(root)), ["config.json"])

    def test_unknown_sftp_key(self):
        config = default_config()
        config["sftp"].update(port=self.free_port(), bogus=1)
        self.assertRefusedToStart(config, r"sftp\W{1,4}bogus")

    def test_port_of_the_wrong_type(self):
        config = default_config()
        config["sftp"]["port"] = "abc"
        rc, output, root, config_path = self.run_twistd(config)
        self.assertNotEqual(rc, 0, output)
        self.assertRegex(output, r"sftp\W{1,4}port")
        self.assertIn(str(config_path), output)
        self.assertNotRegex(output, r"SFTP listening on")
        self.assertFalse((root / "storage").exists(), "a refused config wrote storage/")

    def test_port_out_of_range(self):
        config = default_config()
        config["sftp"]["port"] = 70000
        rc, output, root, config_path = self.run_twistd(config)
        self.assertNotEqual(rc, 0, output)
        self.assertRegex(output, r"sftp\W{1,4}port")
        self.assertFalse((root / "storage").exists())

    def test_invalid_json(self):
        root = make_temp_root(self)
        config_path = root / "config.json"
        config_path.write_text('{"sftp": {"port": 2022,}')
        result = subprocess.run(
            twistd_command(config_path, root / "service.log"), cwd=root, env=service_env(),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(str(config_path), result.stdout + result.stderr)
        self.assertFalse((root / "storage").exists())

    def test_lightd_sections_are_accepted(self):
        config = default_config()
        config.update(version="1.0.0", docker={"socket": "/var/run/docker.sock"},
                      monitoring={"enabled": False}, remote={"url": "http://example.invalid"})
        config["storage"]["containers_path"] = "storage/containers"
        service = Service(self, config).start()
        self.assertGreater(service.port, 0)


class PackagingTests(unittest.TestCase):
    timeout = 60

    def test_twistd_help_lists_the_plugin(self):
        result = subprocess.run(
            twistd_command("unused", "-")[:3] + ["--help"], env=service_env(),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("lightd-sftp", result.stdout)

    def test_default_config_is_valid_json_with_the_documented_shape(self):
        config = json.loads((REPO_ROOT / "config.json").read_text())
        self.assertEqual(sorted(config), ["authorization", "server", "sftp", "storage"])
        self.assertEqual(config["sftp"]["port"], 2022)
