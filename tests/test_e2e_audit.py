"""
The audit log's content events, end to end: what an OpenSSH sftp session, a
legacy scp upload and an rsync upload leave in the file, with their virtual
paths, byte counts and outcomes, beside the login and API events; and no
secret anywhere in it.
"""

import json
import os
import shutil
import unittest as pyunittest

from twisted.trial.unittest import TestCase

from tests import harness
from tests.test_e2e_clients import run, ssh_command
from tests.test_e2e_operations import api, audit_entries, operations_config, wait_for


class ContentEventTests(TestCase):
    def setUp(self):
        harness.require_binary("sftp")
        self.service = harness.start_service(self, operations_config())
        self.creds = harness.make_credentials(self.service, "web")
        self.local = harness.make_temp_root(self)
        self.payload = os.urandom(300_000)
        (self.local / "up.bin").write_bytes(self.payload)

    def entries(self, count_logouts):
        return wait_for(
            lambda: (lambda e: e if sum(x["event"] == "logout" for x in e) >= count_logouts else None)(
                audit_entries(self.service)
            ),
            what=f"{count_logouts} logout events",
        )

    def test_sftp_session(self):
        rc, out, err = harness.run_sftp(
            self.service,
            self.creds,
            [
                "put up.bin",
                "get up.bin down.bin",
                "mkdir folder",
                "rename up.bin folder/moved.bin",
                "chmod 600 folder/moved.bin",
                "ln -s folder/moved.bin link",
                "rm link",
                "-rm missing",
                "rmdir nowhere",
            ],
            cwd=self.local,
        )
        self.assertEqual(rc, 1, f"only the last command fails\n{out}\n{err}")
        entries = self.entries(1)
        content = [e for e in entries if e["event"] not in ("login", "logout", "credentials_set")]
        summary = [(e["event"], e.get("path"), e.get("to"), e["result"]) for e in content]
        self.assertEqual(
            summary,
            [
                ("upload", "/up.bin", None, "ok"),
                ("download", "/up.bin", None, "ok"),
                ("mkdir", "/folder", None, "ok"),
                ("rename", "/up.bin", "/folder/moved.bin", "ok"),
                ("setstat", "/folder/moved.bin", None, "ok"),
                ("symlink", "/link", None, "ok"),
                ("remove", "/link", None, "ok"),
                ("remove", "/missing", None, "No such file or directory"),
                ("rmdir", "/nowhere", None, "No such file or directory"),
            ],
        )
        upload, download = content[0], content[1]
        self.assertEqual((upload["bytes"], download["bytes"]), (300_000, 300_000))
        self.assertEqual(content[4]["mode"], "0600")
        self.assertEqual(content[5]["target"], "folder/moved.bin")
        login = next(e for e in entries if e["event"] == "login")
        for entry in content:
            self.assertEqual(
                (entry["session"], entry["container"], entry["username"], entry["ip"]),
                (login["session"], "web", "web", harness.HOST),
            )

    def test_legacy_scp_upload(self):
        rc, out, err = harness.run_scp(
            self.service, self.creds, str(self.local / "up.bin"), ":/scp.bin", options=("-O",)
        )
        self.assertEqual(rc, 0, err)
        entries = self.entries(1)
        upload = next(e for e in entries if e["event"] == "upload")
        self.assertEqual((upload["path"], upload["bytes"], upload["result"]), ("/scp.bin", 300_000, "ok"))
        command = next(e for e in entries if e["event"] == "exec")
        self.assertEqual(command["command"], "scp -t /scp.bin")
        self.assertEqual(command["result"], "ok")
        self.assertGreater(command["bytes_in"], 300_000)

    def test_rsync_upload(self):
        rsync = harness.require_binary("rsync")
        harness.require_binary("ssh")
        from lightd_conch.rsync import findSandbox

        if shutil.which("bwrap") is None or findSandbox() is None:
            raise pyunittest.SkipTest("bubblewrap (bwrap) is not installed: rsync is not served")
        rc, out, err = run(
            [rsync, "-e", ssh_command(self.service), str(self.local / "up.bin"),
             f"{self.creds['username']}@{harness.HOST}:/synced.bin"],
            env=harness._askpass_env(self.service, self.creds["password"]),
        )
        self.assertEqual(rc, 0, err)
        entries = self.entries(1)
        command = next(e for e in entries if e["event"] == "exec")
        self.assertTrue(command["command"].startswith("rsync --server"), command)
        self.assertTrue(command["command"].endswith(" /synced.bin"), command)
        self.assertEqual(command["result"], "ok")
        self.assertGreater(command["bytes_in"], 300_000)

    def test_failed_login_and_reset_no_secret(self):
        paramiko = harness.require_paramiko()
        self.assertRaises(
            paramiko.AuthenticationException,
            harness.paramiko_transport, self, self.service, "web", "wrong-password-here",
        )
        status, body = api(self.service, "POST", "/containers/web/sftp/credentials")
        self.assertEqual(status, 200, body)
        password = json.loads(body)["password"]
        entries = wait_for(
            lambda: (lambda e: e if any(x["event"] == "credentials_set" and x["via"] == "api"
                                        for x in e) else None)(audit_entries(self.service)),
            what="the API's reset",
        )
        failed = next(e for e in entries if e["event"] == "login_failed")
        self.assertEqual((failed["username"], failed["reason"]), ("web", "wrong_password"))
        text = (self.service.storage / "sftp_audit.log").read_text()
        for secret in (password, self.creds["password"], "wrong-password-here", "$2b$"):
            self.assertNotIn(secret, text)
