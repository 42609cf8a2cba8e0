"""
End-to-end harness: a real ``twistd lightd-sftp`` in a temporary folder, and the clients that talk
to it (OpenSSH ``sftp``/``scp``, paramiko, and raw SFTP packets over a paramiko channel).

Everything here blocks; end-to-end tests are plain synchronous trial tests. Trial's ``timeout``
cannot interrupt a blocking test, so every subprocess and every socket read carries its own timeout.
"""

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

LISTENING = re.compile(r"SFTP listening on (\S+) port (\d+)")
START_TIMEOUT = 20
STOP_TIMEOUT = 10
CLIENT_TIMEOUT = 120
HOST = "127.0.0.1"
# OpenSSH ties the host key to this name instead of "[127.0.0.1]:port", so a restart on another
# free port is still checked against the key the first run saw.
HOST_KEY_ALIAS = "lightd-sftp-e2e"


def require_binary(name):
    """The path of a client binary, or skip the test: a missing client is never a pass."""
    path = shutil.which(name)
    if path is None:
        raise unittest.SkipTest(f"{name!r} is not on PATH (install openssh-client)")
    return path


def require_paramiko():
    try:
        import paramiko
    except ImportError:
        raise unittest.SkipTest("paramiko is not installed (pip install '.[test]')")
    # Refusals the tests provoke on purpose would otherwise be printed amid trial's report.
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return paramiko


# --- configuration and the CLI ---------------------------------------------------------------


def default_config():
    return {
        "server": {"host": HOST, "port": 0},
        "authorization": {"enabled": True, "token": ""},
        "storage": {"base_path": "storage", "volumes_path": "storage/volumes"},
        "sftp": {"host": HOST, "port": 0, "bcrypt_cost": 4},
    }


def write_config(root, config):
    path = Path(root) / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def service_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def twistd_command(config_path, log_path):
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        f"--logfile={log_path}",
        "lightd-sftp",
        "--config",
        str(config_path),
    ]


def make_temp_root(testcase):
    root = Path(tempfile.mkdtemp(prefix="lightd-e2e-"))
    testcase.addCleanup(shutil.rmtree, root, ignore_errors=True)
    return root


# --- the service -----------------------------------------------------------------------------


class Service:
    """
    One lightd-sftp daemon rooted in its own temporary folder.

    ``root`` holds config.json, service.log, storage/ (credentials, host key, volumes) and
    client/ (askpass scripts, known_hosts, batch files for the OpenSSH clients).
    """

    def __init__(self, testcase, config=None):
        self.testcase = testcase
        self.root = make_temp_root(testcase)
        self.config = config if config is not None else default_config()
        self.config_path = write_config(self.root, self.config)
        self.storage = self.root / "storage"
        self.volumes = self.storage / "volumes"
        self.credentials_path = self.storage / "sftp_credentials"
        self.host_key_path = self.storage / "sftp_host_ed25519_key"
        self.log_path = self.root / "service.log"
        self.output_path = self.root / "twistd.out"
        self.client_dir = self.root / "client"
        self.client_dir.mkdir()
        self.process = None
        self.port = None
        self.host = None
        # Cleanups run last-in first-out: the log is checked after the service has stopped.
        testcase.addCleanup(self.assertCleanLog)
        testcase.addCleanup(self.stop)

    def volume(self, container="demo"):
        return self.volumes / container

    def start(self):
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(
                twistd_command(self.config_path, self.log_path),
                cwd=self.root,
                env=service_env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(self._read_log(self.log_path, log_offset))
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return self
            if process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        self.testcase.fail(
            "the service did not log 'SFTP listening on HOST port N' within "
            f"{START_TIMEOUT}s (exit code {process.returncode}).\n"
            f"--- twistd output ---\n{self.output_text()}\n--- log ---\n{self.log_text()}"
        )

    def stop(self):
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def restart(self):
        self.stop()
        return self.start()

    def assertCleanLog(self):
        """Whatever a test did, the service never logged an unhandled exception."""
        text = self.log_text() + self.output_text()
        for marker in ("Traceback", "Unhandled Error"):
            if marker in text:
                self.testcase.fail(f"the service logged {marker!r}:\n{text}")

    def output_text(self):
        return self._read_log(self.output_path)

    def log_text(self):
        """The whole service log, including files twistd's LogFile rotated away."""
        rotated = sorted(
            self.root.glob("service.log.*"),
            key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
            reverse=True,
        )
        return "".join(self._read_log(p) for p in rotated + [self.log_path])

    def log_lines(self, *words):
        """Log lines containing every one of ``words``."""
        return [line for line in self.log_text().splitlines() if all(w in line for w in words)]

    def wait_for_log(self, predicate, timeout=10):
        """Poll the log until ``predicate(log_text)`` is true; returns the last text seen."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if predicate(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    @staticmethod
    def _read_log(path, offset=0):
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args, stdin=None, timeout=60):
        """Run ``lightd-sftp --config CFG ARGS...`` as the operator would."""
        return subprocess.run(
            [sys.executable, "-m", "lightd_conch.cli", "--config", str(self.config_path), *args],
            cwd=self.root,
            env=service_env(),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def start_service(testcase, config=None):
    """Start a fresh service on a free loopback port; it is stopped when the test ends."""
    return Service(testcase, config).start()


def make_credentials(service, container="demo", username=None, password=None):
    """
    Credentials from the CLI (``generate CONTAINER --create-volume --json``): a dict with
    username, password, host, port and volume_path. Works with the daemon running or not.
    """
    args = ["credentials", "generate", container, "--create-volume", "--json"]
    if username is not None:
        args += ["--username", username]
    if password is not None:
        args += ["--password-stdin"]
    result = service.cli(*args, stdin=password + "\n" if password is not None else None)
    if result.returncode != 0:
        service.testcase.fail(
            f"credentials generate {container} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return json.loads(result.stdout)


# --- OpenSSH clients -------------------------------------------------------------------------


def _askpass_env(service, password):
    """An SSH_ASKPASS script answering ``password``; OpenSSH asks it instead of a terminal."""
    secret = service.client_dir / f"password-{time.monotonic_ns()}"
    secret.write_text(password + "\n")
    script = secret.with_suffix(".sh")
    script.write_text(f"#!/bin/sh\nexec cat {shlex.quote(str(secret))}\n")
    script.chmod(0o700)
    env = dict(os.environ)
    env.update(SSH_ASKPASS=str(script), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    return env


def _ssh_options(service, strict_host_key):
    return [
        "-F", "/dev/null",
        "-P", str(service.port),
        "-o", f"StrictHostKeyChecking={'yes' if strict_host_key else 'no'}",
        "-o", f"UserKnownHostsFile={service.client_dir / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"HostKeyAlias={HOST_KEY_ALIAS}",
        "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password",
        "-o", "NumberOfPasswordPrompts=1",
        "-o", "ConnectTimeout=20",
        "-o", "BatchMode=no",
    ]


def _run_client(argv, env, timeout, cwd):
    try:
        result = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{argv[0]} did not finish within {timeout}s\nstdout: {e.stdout}\nstderr: {e.stderr}"
        )
    return result.returncode, result.stdout, result.stderr


def run_sftp(service, creds, batch_lines, timeout=CLIENT_TIMEOUT, cwd=None, strict_host_key=False):
    """
    Run OpenSSH ``sftp -b`` with ``batch_lines``; returns (exit code, stdout, stderr).

    In batch mode sftp stops at the first failing command (unless it starts with ``-``) and
    exits 1, so rc == 0 means every command succeeded.
    """
    sftp = require_binary("sftp")
    batch = service.client_dir / f"batch-{time.monotonic_ns()}"
    batch.write_text("".join(line + "\n" for line in batch_lines))
    argv = [sftp, *_ssh_options(service, strict_host_key), "-b", str(batch),
            f"{creds['username']}@{HOST}"]
    return _run_client(argv, _askpass_env(service, creds["password"]), timeout,
                       cwd or service.client_dir)


def run_scp(service, creds, *paths, options=(), timeout=CLIENT_TIMEOUT):
    """
    Run OpenSSH ``scp`` (SFTP protocol); a path starting with ":" is remote, e.g. ":/a.txt".
    Returns (exit code, stdout, stderr).
    """
    scp = require_binary("scp")
    remote = f"{creds['username']}@{HOST}"
    argv = [scp, *_ssh_options(service, False), *options]
    argv += [remote + p if p.startswith(":") else p for p in paths]
    return _run_client(argv, _askpass_env(service, creds["password"]), timeout,
                       service.client_dir)


# --- paramiko --------------------------------------------------------------------------------


def paramiko_transport(testcase, service, username, password, timeout=30, sock=None):
    """
    An authenticated paramiko Transport (closed at cleanup); auth failure raises.
    ``sock`` is a connected socket to use instead of connecting to the service.
    """
    paramiko = require_paramiko()
    transport = paramiko.Transport(sock if sock is not None else (HOST, service.port))
    testcase.addCleanup(transport.close)
    transport.banner_timeout = timeout
    transport.auth_timeout = timeout
    transport.start_client(timeout=timeout)
    transport.auth_password(username, password)
    return transport


def within(transport, timeout, what, call, *args):
    """
    ``call(*args)`` with a deadline. paramiko waits for replies to channel and global requests
    without any timeout, so a server that stays silent would hang the test run: on timeout the
    transport is closed and the test fails.
    """
    outcome = {}

    def run():
        try:
            outcome["value"] = call(*args)
        except BaseException as e:
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        transport.close()
        worker.join(5)
        raise AssertionError(f"{what}: the server did not answer within {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def paramiko_sftp(testcase, service, creds, timeout=30):
    """A paramiko SFTPClient logged in with ``creds`` (closed at cleanup)."""
    paramiko = require_paramiko()
    transport = paramiko_transport(
        testcase, service, creds["username"], creds["password"], timeout
    )
    client = within(transport, timeout, "opening the sftp subsystem",
                    paramiko.SFTPClient.from_transport, transport)
    client.get_channel().settimeout(timeout)
    testcase.addCleanup(_close_quietly, client.close)
    return client


def _close_quietly(close):
    """Close a client at cleanup; a test may already have stopped the service under it."""
    try:
        close()
    except (EOFError, OSError, require_paramiko().SSHException):
        pass


# --- raw SFTP v3 packets ---------------------------------------------------------------------

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE = 1, 2, 3, 4, 5, 6
FXP_LSTAT, FXP_FSTAT, FXP_SETSTAT, FXP_FSETSTAT, FXP_OPENDIR, FXP_READDIR = 7, 8, 9, 10, 11, 12
FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_REALPATH, FXP_STAT, FXP_RENAME = 13, 14, 15, 16, 17, 18
FXP_READLINK, FXP_SYMLINK = 19, 20
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FXP_EXTENDED, FXP_EXTENDED_REPLY = 200, 201

FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = 0, 1, 2, 3, 4
FX_BAD_MESSAGE, FX_NO_CONNECTION, FX_CONNECTION_LOST, FX_OP_UNSUPPORTED = 5, 6, 7, 8

ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 2, 4, 8

PFLAG_READ, PFLAG_WRITE, PFLAG_APPEND, PFLAG_CREAT, PFLAG_TRUNC, PFLAG_EXCL = 1, 2, 4, 8, 16, 32


def uint32(n):
    return struct.pack(">I", n)


def uint64(n):
    return struct.pack(">Q", n)


def string(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return uint32(len(data)) + data


def attrs(permissions=None):
    """An ATTRS block; no fields at all unless ``permissions`` is given."""
    if permissions is None:
        return uint32(0)
    return uint32(ATTR_PERMISSIONS) + uint32(permissions)


def packet(ptype, payload=b""):
    """A framed SFTP packet: uint32 length, byte type, payload (which starts with the id)."""
    return uint32(1 + len(payload)) + bytes([ptype]) + payload


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError(f"short reply: wanted {n} bytes at {self.pos} of {self.data!r}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint32(self):
        return struct.unpack(">I", self.take(4))[0]

    def uint64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def string(self):
        return self.take(self.uint32())


class RawSFTP:
    """
    An ``sftp`` subsystem channel driven byte by byte, for what real clients never send.
    Reads time out after ``timeout`` seconds (socket.timeout), so a silent server fails a test
    instead of hanging it.
    """

    def __init__(self, testcase, service, creds, timeout=10):
        self.testcase = testcase
        self.transport = paramiko_transport(
            testcase, service, creds["username"], creds["password"]
        )
        self.channel = within(self.transport, timeout, "open_session", self.transport.open_session)
        self.channel.settimeout(timeout)
        within(self.transport, timeout, "the sftp subsystem request",
               self.channel.invoke_subsystem, "sftp")
        self.send(packet(FXP_INIT, uint32(3)))
        ptype, body = self.read_packet()
        testcase.assertEqual(ptype, FXP_VERSION)
        reader = Reader(body)
        testcase.assertEqual(reader.uint32(), 3)
        self.extensions = {}
        while reader.pos < len(body):
            name = reader.string().decode("utf-8", "replace")
            self.extensions[name] = reader.string()

    def send(self, data):
        self.channel.sendall(data)

    def request(self, ptype, request_id, *fields):
        self.send(packet(ptype, uint32(request_id) + b"".join(fields)))

    def _read_exactly(self, n):
        chunks = []
        while n:
            chunk = self.channel.recv(n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read_packet(self):
        """(type, body after the type byte), or None once the channel is closed."""
        header = self._read_exactly(4)
        if header is None:
            return None
        body = self._read_exactly(struct.unpack(">I", header)[0])
        if body is None or not body:
            return None
        return body[0], body[1:]

    def read_reply(self, request_id):
        """The reply to ``request_id`` as (type, Reader positioned after the id), or None."""
        while True:
            received = self.read_packet()
            if received is None:
                return None
            ptype, body = received
            reader = Reader(body)
            if reader.uint32() == request_id:
                return ptype, reader

    def status(self, request_id):
        """(code, message) of the STATUS reply to ``request_id``; fails on any other reply."""
        reply = self.read_reply(request_id)
        self.testcase.assertIsNotNone(reply, f"channel closed before replying to {request_id}")
        ptype, reader = reply
        self.testcase.assertEqual(ptype, FXP_STATUS, f"expected STATUS for {request_id}")
        code = reader.uint32()
        message = reader.string().decode("utf-8", "replace")
        return code, message

    def extended(self, request_id, name, *fields):
        """Send an SSH_FXP_EXTENDED request ``name`` (e.g. "hardlink@openssh.com")."""
        self.request(FXP_EXTENDED, request_id, string(name), *fields)

    def realpath(self, request_id, path):
        self.request(FXP_REALPATH, request_id, string(path))
        reply = self.read_reply(request_id)
        self.testcase.assertIsNotNone(reply, "channel closed before the REALPATH reply")
        ptype, reader = reply
        self.testcase.assertEqual(ptype, FXP_NAME)
        self.testcase.assertEqual(reader.uint32(), 1)
        return reader.string().decode("utf-8")

    def wait_closed(self, timeout=10):
        """True once the server closed the channel (EOF), draining whatever it sent first."""
        deadline = time.monotonic() + timeout
        self.channel.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if not self.channel.recv(65536):
                    return True
            except socket.timeout:
                continue
            except (EOFError, OSError):
                return True
        return self.channel.closed


class StallingProxy:
    """
    A loopback TCP relay for one client connection whose server-to-client
    direction can be held: while held, nothing the service sends is read, so
    its socket fills as if the client had stopped reading, while requests
    still flow to it.
    """

    def __init__(self, testcase, service, buffer_size=65536):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self._listener.listen(1)
        self.port = self._listener.getsockname()[1]
        self._service_port = service.port
        self._buffer_size = buffer_size
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()
        testcase.addCleanup(self.close)

    def connect(self):
        """A socket to the service through this proxy, for paramiko.Transport."""
        return socket.create_connection((HOST, self.port), timeout=10)

    def hold(self):
        self._flowing.clear()

    def release(self):
        self._flowing.set()

    def close(self):
        self._closed = True
        self._flowing.set()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self):
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer, so the service's side fills soon.
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._buffer_size)
        upstream.connect((HOST, self._service_port))
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, self._flowing),
                         daemon=True).start()

    def _pump(self, source, target, gate):
        try:
            while not self._closed:
                if gate is not None:
                    gate.wait()
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass
