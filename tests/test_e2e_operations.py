"""
End-to-end tests of running the service: live sessions listed and ended
through the API and the CLI, /metrics after real transfers, the audit log's
events and SIGHUP, and the shutdown grace after SIGTERM.  A real twistd on
loopback, real clients (paramiko, OpenSSH sftp).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path

from twisted.trial.unittest import TestCase

from . import harness
from .test_metrics import samples


def free_port():
    with socket.socket() as s:
        s.bind((harness.HOST, 0))
        return s.getsockname()[1]


def operations_config(**sftp):
    config = harness.default_config()
    config["server"]["port"] = free_port()
    config["sftp"].update(sftp)
    return config


def api(service, method, path, token=None):
    """
    (status, body bytes) of an admin API request to the running service.
    """
    if token is None:
        token = (service.storage / "api_token").read_text().strip()
    port = service.config["server"]["port"]
    request = urllib.request.Request(f"http://{harness.HOST}:{port}{path}", method=method)
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def audit_entries(service):
    path = service.storage / "sftp_audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(predicate, timeout=10, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class LiveSessionTests(TestCase):
    def setUp(self):
        harness.require_paramiko()
        self.service = harness.start_service(self, operations_config())
        self.creds = harness.make_credentials(self.service, "web")

    def login(self):
        transport = harness.paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )
        port = transport.sock.getsockname()[1]
        return transport, port

    def listed(self):
        status, body = api(self.service, "GET", "/sftp/sessions")
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def test_listed_and_ended_by_the_api(self):
        transport, _ = self.login()
        sftp = transport.open_sftp_client()
        with sftp.open("hello.txt", "wb") as f:
            f.write(b"x" * 50000)
        sessions = wait_for(self.listed, what="the session to be listed")
        self.assertEqual(len(sessions), 1)
        session = sessions[0]
        self.assertRegex(session["id"], r"^[0-9a-f]{16}$")
        self.assertEqual(
            {k: session[k] for k in ("container", "username", "ip", "method")},
            {"container": "web", "username": "web", "ip": "127.0.0.1", "method": "password"},
        )
        self.assertLessEqual(abs(session["started_at"] - time.time()), 60)
        self.assertGreater(session["bytes_in"], 50000)
        self.assertGreater(session["bytes_out"], 0)

        status, body = api(self.service, "DELETE", f"/sftp/sessions/{session['id']}")
        self.assertEqual((status, body), (204, b""))
        wait_for(lambda: not transport.is_active(), what="the session to end")
        self.assertEqual(self.listed(), [])
        status, body = api(self.service, "DELETE", f"/sftp/sessions/{session['id']}")
        self.assertEqual((status, json.loads(body)), (404, {"error": "no such session"}))
        status, _ = api(self.service, "GET", "/sftp/sessions", token="lightd_wrong")
        self.assertEqual(status, 401)

    def test_listed_and_ended_by_the_cli(self):
        transport, port = self.login()
        transport.open_sftp_client().listdir(".")
        result = self.service.cli("sessions", "list", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        sessions = json.loads(result.stdout)
        self.assertEqual([s["container"] for s in sessions], ["web"])
        sessionId = sessions[0]["id"]

        table = self.service.cli("sessions", "list")
        self.assertEqual(table.returncode, 0, table.stderr)
        header, row = table.stdout.splitlines()
        self.assertEqual(header.split(), ["ID", "CONTAINER", "USERNAME", "IP", "METHOD", "STARTED", "IN", "OUT"])
        self.assertEqual(row.split()[:5], [sessionId, "web", "web", "127.0.0.1", "password"])

        # A proxy in the environment is not used (it would be handed the token).
        proxied = subprocess.run(
            [sys.executable, "-m", "lightd_conch.cli", "--config", str(self.service.config_path),
             "sessions", "list", "--json"],
            cwd=self.service.root, capture_output=True, text=True, timeout=60,
            env=dict(harness.service_env(), http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"),
        )
        self.assertEqual(proxied.returncode, 0, proxied.stderr)
        self.assertEqual([s["id"] for s in json.loads(proxied.stdout)], [sessionId])

        ended = self.service.cli("sessions", "end", sessionId)
        self.assertEqual((ended.returncode, ended.stdout, ended.stderr), (0, f"ended {sessionId}\n", ""))
        wait_for(lambda: not transport.is_active(), what="the session to end")
        again = self.service.cli("sessions", "end", sessionId)
        self.assertEqual(
            (again.returncode, again.stderr), (1, "lightd-sftp: error: no such session\n")
        )
        self.assertEqual(json.loads(self.service.cli("sessions", "list", "--json").stdout), [])

    def test_cli_without_a_daemon(self):
        """
        With the daemon stopped, the CLI says in one line that it cannot
        reach it.
        """
        self.service.stop()
        result = self.service.cli("sessions", "list")
        port = self.service.config["server"]["port"]
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"lightd-sftp: error: cannot reach the daemon's API at http://127.0.0.1:{port}:"
            " Connection refused (is lightd-sftp running?)\n",
        )


class MetricsTests(TestCase):
    def test_counters_move_with_logins_and_transfers(self):
        paramiko = harness.require_paramiko()
        service = harness.start_service(self, operations_config())
        creds = harness.make_credentials(service, "web")

        def scrape():
            status, body = api(service, "GET", "/metrics")
            self.assertEqual(status, 200)
            return samples(body.decode())

        before = scrape()
        self.assertEqual(before[("lightd_sftp_sessions", ())], 0)
        self.assertEqual(before[("lightd_sftp_bytes_in_total", ())], 0)

        transport = harness.paramiko_transport(self, service, creds["username"], creds["password"])
        sftp = transport.open_sftp_client()
        payload = os.urandom(1024 * 1024)
        with sftp.open("up.bin", "wb") as f:
            f.write(payload)
        with sftp.open("up.bin", "rb") as f:
            self.assertEqual(f.read(), payload)
        during = scrape()
        self.assertEqual(during[("lightd_sftp_sessions", ())], 1)
        self.assertGreater(during[("lightd_sftp_bytes_in_total", ())], len(payload))
        self.assertGreater(during[("lightd_sftp_bytes_out_total", ())], len(payload))
        self.assertGreater(during[("lightd_sftp_requests_total", (("type", "write"),))], 0)
        self.assertGreater(during[("lightd_sftp_requests_total", (("type", "read"),))], 0)
        self.assertEqual(during[("lightd_sftp_requests_total", (("type", "open"),))], 2)
        ok = ("lightd_sftp_logins_total", (("method", "password"), ("result", "ok")))
        failed = ("lightd_sftp_logins_total", (("method", "password"), ("result", "failed")))
        self.assertEqual(during[ok], 1)
        self.assertNotIn(failed, during)
        sftp.close()
        transport.close()

        self.assertRaises(
            paramiko.AuthenticationException,
            harness.paramiko_transport, self, service, creds["username"], "wrong password",
        )
        after = wait_for(
            lambda: (lambda m: m if m[("lightd_sftp_sessions", ())] == 0 else None)(scrape()),
            what="the session to end",
        )
        self.assertEqual(after[failed], 1)
        # The ended session's bytes are still counted.
        self.assertGreaterEqual(after[("lightd_sftp_bytes_in_total", ())], during[("lightd_sftp_bytes_in_total", ())])
        self.assertGreater(after[("lightd_sftp_reactor_lag_seconds_count", ())], 0)


class AuditTests(TestCase):
    def test_events_and_no_secret(self):
        paramiko = harness.require_paramiko()
        service = harness.start_service(self, operations_config())
        creds = harness.make_credentials(service, "web", password="cli-chosen-password")
        status, body = api(
            service, "POST", "/containers/web/sftp/credentials"
        )
        self.assertEqual(status, 200, body)
        creds = json.loads(body)
        self.assertRaises(
            paramiko.AuthenticationException,
            harness.paramiko_transport, self, service, "web", "not-the-password",
        )
        self.assertRaises(
            paramiko.AuthenticationException,
            harness.paramiko_transport, self, service, "nobody", "not-the-password",
        )
        transport = harness.paramiko_transport(self, service, creds["username"], creds["password"])
        sftp = transport.open_sftp_client()
        with sftp.open("f.bin", "wb") as f:
            f.write(b"y" * 100000)
        sftp.close()
        transport.close()
        entries = wait_for(
            lambda: (lambda e: e if any(x["event"] == "logout" for x in e) else None)(
                audit_entries(service)
            ),
            what="the logout event",
        )
        events = [e["event"] for e in entries]
        self.assertEqual(
            events,
            ["credentials_set", "credentials_set", "login_failed", "login_failed", "login",
             "upload", "logout"],
        )
        cliSet, apiSet, wrong, unknown, login, upload, logout = entries
        self.assertEqual((upload["path"], upload["bytes"]), ("/f.bin", 100000))
        for entry in entries:
            self.assertEqual(
                list(entry)[:6], ["time", "event", "session", "container", "username", "ip"]
            )
            self.assertRegex(entry["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual((cliSet["via"], cliSet["ip"], cliSet["generated"]), ("cli", None, False))
        self.assertEqual((apiSet["via"], apiSet["ip"], apiSet["generated"]), ("api", "127.0.0.1", True))
        self.assertEqual((wrong["username"], wrong["reason"], wrong["ip"]), ("web", "wrong_password", "127.0.0.1"))
        self.assertEqual((unknown["username"], unknown["reason"]), ("nobody", "unknown_user"))
        self.assertEqual(
            {k: login[k] for k in ("container", "username", "ip", "method")},
            {"container": "web", "username": "web", "ip": "127.0.0.1", "method": "password"},
        )
        self.assertRegex(login["session"], r"^[0-9a-f]{16}$")
        self.assertEqual(logout["session"], login["session"])
        self.assertGreater(logout["bytes_in"], 100000)
        self.assertGreater(logout["bytes_out"], 0)

        text = (service.storage / "sftp_audit.log").read_text()
        token = (service.storage / "api_token").read_text().strip()
        for secret in ("cli-chosen-password", creds["password"], "not-the-password", token, "$2b$"):
            self.assertNotIn(secret, text)

    def test_sighup_reopens(self):
        """
        After logrotate renames the file and sends SIGHUP, the service
        writes a new file at the path; the renamed one gets nothing more.
        """
        service = harness.start_service(self, operations_config())
        path = service.storage / "sftp_audit.log"
        harness.make_credentials(service, "web")
        os.rename(path, str(path) + ".old")
        service.process.send_signal(signal.SIGHUP)
        wait_for(path.exists, what="the audit log to be reopened")
        self.assertIsNone(service.process.poll())
        status, _ = api(service, "DELETE", "/containers/web/sftp/credentials")
        self.assertEqual(status, 204)
        wait_for(lambda: audit_entries(service), what="the revoke event")
        self.assertEqual([e["event"] for e in audit_entries(service)], ["credentials_revoked"])
        with open(str(path) + ".old") as f:
            self.assertEqual([json.loads(line)["event"] for line in f], ["credentials_set"])
        self.assertTrue(service.log_lines("SIGHUP: reopening the audit log"))


class ShutdownGraceTests(TestCase):
    grace = 4.0

    def setUp(self):
        harness.require_paramiko()
        self.service = harness.start_service(self, operations_config(shutdown_grace=self.grace))
        self.creds = harness.make_credentials(self.service, "web")

    def slow_upload(self, name, chunks, pause, outcome):
        """
        In a thread: write C{chunks} of 32 KiB to C{name}, pausing between
        them; record in C{outcome} what happened.
        """
        transport = harness.paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )
        sftp = transport.open_sftp_client()
        sftp.get_channel().settimeout(30)
        started = threading.Event()

        def run():
            try:
                with sftp.open(name, "wb") as f:
                    for n in range(chunks):
                        f.write(b"z" * 32768)
                        started.set()
                        time.sleep(pause)
                outcome["done"] = True
            except Exception as e:
                outcome["error"] = e
            finally:
                started.set()
                outcome["at"] = time.monotonic()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        started.wait(10)
        return worker, transport

    def test_transfer_in_flight_finishes(self):
        idle = harness.paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )
        idle.open_sftp_client().listdir(".")
        time.sleep(1.2)
        outcome = {}
        # About 2 s of writing, begun before SIGTERM.
        worker, transport = self.slow_upload("inflight.bin", 40, 0.05, outcome)
        sent = time.monotonic()
        self.service.process.send_signal(signal.SIGTERM)
        # Nothing new is accepted; the idle session is ended at once.
        wait_for(lambda: not idle.is_active(), timeout=3, what="the idle session to end")
        self.assertTrue(transport.is_active())
        with self.assertRaises(OSError):
            socket.create_connection((harness.HOST, self.service.port), timeout=5).recv(1)
        worker.join(30)
        self.assertEqual(outcome.get("error"), None)
        self.assertTrue(outcome.get("done"))
        self.assertEqual(os.path.getsize(self.service.volume("web") / "inflight.bin"), 40 * 32768)
        self.service.process.wait(self.grace + 10)
        self.assertLess(time.monotonic() - sent, self.grace + 1)
        # The audit log was written at the stop, the last logouts included.
        logouts = [e for e in audit_entries(self.service) if e["event"] == "logout"]
        self.assertEqual(len(logouts), 2)
        self.assertGreater(max(e["bytes_in"] for e in logouts), 40 * 32768)
        # twistd ends by the signal it stopped for, once its services stopped.
        self.assertEqual(self.service.process.returncode, -signal.SIGTERM)

    def test_stuck_transfer_cut_after_grace(self):
        outcome = {}
        worker, transport = self.slow_upload("stuck.bin", 10000, 0.05, outcome)
        sent = time.monotonic()
        self.service.process.send_signal(signal.SIGTERM)
        worker.join(self.grace + 10)
        self.assertIn("error", outcome)
        cut = outcome["at"] - sent
        self.assertGreater(cut, self.grace - 0.5)
        self.assertLess(cut, self.grace + 2)
        self.service.process.wait(10)
        # twistd ends by the signal it stopped for, once its services stopped.
        self.assertEqual(self.service.process.returncode, -signal.SIGTERM)
        self.assertTrue(self.service.log_lines("shutdown grace over: ending session"))


CONTRIB = harness.REPO_ROOT / "contrib"
UNIT = CONTRIB / "lightd-sftp.service"


def unit_values(key):
    """
    The values of C{key}= in the unit file, in order.
    """
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(key + "=")
    ]


class ServiceFileTests(TestCase):
    def test_systemd_analyze_verify(self):
        """
        systemd-analyze verify accepts the unit without a word, on a root
        where the venv's twistd it names exists.
        """
        analyze = harness.require_binary("systemd-analyze")
        units = next(
            (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
            None,
        )
        if units is None:
            raise unittest.SkipTest("systemd's own units are not installed (apt-get install systemd)")
        root = harness.make_temp_root(self)
        shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
        (root / "etc/systemd/system").mkdir(parents=True)
        shutil.copy(UNIT, root / "etc/systemd/system")
        binary = Path(unit_values("ExecStart")[0].split()[0])
        self.assertEqual(binary, Path("/opt/lightd-sftp/bin/twistd"))
        stand_in = root / binary.relative_to("/")
        stand_in.parent.mkdir(parents=True)
        stand_in.write_text("#!/bin/sh\nexec twistd \"$@\"\n")
        stand_in.chmod(0o755)
        result = subprocess.run(
            [analyze, "verify", f"--root={root}", str(root / "etc/systemd/system" / UNIT.name)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
        # A mistake in the file is not silently ignored by the same check.
        broken = root / "etc/systemd/system/broken.service"
        broken.write_text(UNIT.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
        result = subprocess.run(
            [analyze, "verify", f"--root={root}", str(broken)], capture_output=True, text=True, timeout=60
        )
        self.assertIn("Failed to parse kill mode", result.stderr)

    def test_exec_start_runs_the_service(self):
        """
        The unit's twistd arguments start the service, logging to standard
        output (the journal).
        """
        argv = unit_values("ExecStart")[0].split()
        self.assertEqual(argv[-2:], ["--config", "/etc/lightd/config.json"])
        root = harness.make_temp_root(self)
        config = harness.write_config(root, harness.default_config())
        command = harness.twistd_command(config, "unused")[:3] + argv[1:-1] + [str(config)]
        process = subprocess.Popen(
            command, cwd=root, env=harness.service_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        output = b""
        deadline = time.monotonic() + harness.START_TIMEOUT
        while b"SFTP listening on" not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output += line
        self.assertIn(b"SFTP listening on 127.0.0.1 port", output)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), -signal.SIGTERM)
        self.assertIn(["SIGTERM"], [v.split() for v in unit_values("SuccessExitStatus")])

    def test_sandbox_within_the_units_capabilities(self):
        """
        Under the unit's CapabilityBoundingSet and NoNewPrivileges (applied
        with setpriv, as systemd would), SFTP uploads still become the
        volume owner's and rsync still runs in its sandbox.
        """
        from .test_e2e_rsync_sandbox import require_root, require_sandbox
        from .test_e2e_clients import run, ssh_command

        require_root("the unit runs the service as root")
        require_sandbox()
        setpriv = harness.require_binary("setpriv")
        (caps,) = unit_values("CapabilityBoundingSet")
        self.assertEqual(unit_values("NoNewPrivileges"), ["yes"])
        bounding = "-all," + ",".join("+" + c[len("CAP_"):].lower() for c in caps.split())
        plain = harness.twistd_command
        self.patch(
            harness, "twistd_command",
            lambda *args: [setpriv, "--bounding-set", bounding, "--no-new-privs", "--"] + plain(*args),
        )
        service = harness.start_service(self)
        status = Path(f"/proc/{service.process.pid}/status").read_text()
        bounded = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)
        self.assertLess(bounded, (1 << 41) - 1)
        self.assertIn("NoNewPrivs:\t1", status)
        creds = harness.make_credentials(service, "web")
        volume = service.volume("web")
        os.chown(volume, 1000, 1000)
        sftp = harness.paramiko_sftp(self, service, creds)
        with sftp.open("by-sftp.txt", "wb") as f:
            f.write(b"sftp")
        self.assertEqual(((volume / "by-sftp.txt").stat().st_uid), 1000)
        local = service.root / "local"
        local.mkdir()
        (local / "by-rsync.txt").write_bytes(b"rsync")
        rc, out, err = run(
            ["rsync", "-e", ssh_command(service), "-a", str(local) + "/",
             f"{creds['username']}@{harness.HOST}:/up/"],
            env=harness._askpass_env(service, creds["password"]),
        )
        self.assertEqual(rc, 0, f"{out}\n{err}")
        self.assertEqual((volume / "up" / "by-rsync.txt").read_bytes(), b"rsync")
        self.assertEqual((volume / "up" / "by-rsync.txt").stat().st_uid, 1000)

    def test_logrotate_file(self):
        """
        logrotate, run with the contrib file on a running service's audit
        log, renames it with a date and sends SIGHUP; the service writes on
        into the new file.
        """
        logrotate = harness.require_binary("logrotate")
        service = harness.start_service(self, operations_config())
        harness.make_credentials(service, "web")
        path = service.storage / "sftp_audit.log"
        text = (CONTRIB / "lightd-sftp.logrotate").read_text()
        self.assertIn("/var/lib/lightd/sftp_audit.log {", text)
        command = "systemctl kill --kill-whom=main --signal=HUP lightd-sftp.service"
        self.assertIn(command, text)
        # Here the service is not under systemd: the same signal, by pid.
        config = service.root / "logrotate.conf"
        config.write_text(
            text.replace("/var/lib/lightd/sftp_audit.log", str(path))
            .replace(command, f"kill -HUP {service.process.pid}")
            .replace("create 0600 root root", "create 0600")
        )
        result = subprocess.run(
            [logrotate, "--force", "--state", str(service.root / "logrotate.state"), str(config)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        rotated = list(service.storage.glob("sftp_audit.log-*"))
        self.assertEqual(len(rotated), 1)
        self.assertEqual([json.loads(l)["event"] for l in rotated[0].read_text().splitlines()], ["credentials_set"])
        wait_for(lambda: service.log_lines("SIGHUP: reopening the audit log"), what="the SIGHUP")
        self.assertEqual(api(service, "DELETE", "/containers/web/sftp/credentials")[0], 204)
        wait_for(lambda: audit_entries(service), what="the revoke event")
        self.assertEqual([e["event"] for e in audit_entries(service)], ["credentials_revoked"])
