"""
Bad input and unforeseen failures in the admin API: deep JSON, values out of
range, and exceptions no handler expected all get a JSON answer with a
fitting status and at most one log line, never twisted.web's HTML page or a
traceback.  (scp's records: tests.test_exec; both, end to end:
tests.test_e2e_hardening; any value: tests.test_fuzz.)
"""

import json

from twisted.internet.defer import succeed
from twisted.logger import formatEvent

from lightd_conch import api

from .test_api import APITestCase, LogCapture

ENDPOINTS = [
    ("POST", "/containers/demo/sftp/credentials"),
    ("GET", "/containers/demo/sftp/info"),
    ("DELETE", "/containers/demo/sftp/credentials"),
]


class DeepJSONTests(APITestCase):
    def test_deepNestingRefused(self):
        """
        50,000 "[" (under the size limit) is bad input: 400 in JSON, and
        nothing is made.
        """
        for body in ("[" * 50000, '{"a":' * 10000, '{"username": ' + "[" * 40 + "]" * 40 + "}"):
            request = self.generate(body=body)
            message = self.assertError(request, 400)
            self.assertIn("nested deeper than", message)
        self.assertEqual(self.store.list(), [])

    def test_nestingUpToTheLimitIsParsed(self):
        inner = "[" * (api.MAX_DEPTH - 1) + "]" * (api.MAX_DEPTH - 1)
        self.assertResponse(self.generate(body='{"pad": %s}' % inner), 200)

    def test_bracketsInStringsDoNotCount(self):
        body = json.dumps({"username": "deep", "pad": "[" * 50000})
        self.assertEqual(self.assertResponse(self.generate(body=body), 200)["username"], "deep")


class OutOfRangeTests(APITestCase):
    def test_valuesOutOfRange(self):
        for body in (
            '{"password": "\\ud800xxxxxxxx"}',
            '{"password": "abc\\u0000defgh"}',
            '{"username": "\\udfff"}',
            '{"username": NaN}',
            '{"password": 1e999}',
            '{"username": %s}' % ("9" * 5000),
            '{"username": "%s"}' % ("a" * 60000),
        ):
            self.assertError(self.generate(body=body), 400)
        self.assertEqual(self.store.list(), [])

    def test_absurdContentLength(self):
        request = self.generate(body="{}", headers={"Content-Length": "9" * 5000})
        self.assertError(request, 413)


class UnexpectedErrorTests(APITestCase):
    def assertOneLine(self, log, word):
        self.assertEqual([e for e in log.events if "log_failure" in e], [])
        lines = [formatEvent(e) for e in log.events if e.get("log_namespace") == "lightd_conch.api"]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(word, lines[0])

    def test_beforeTheHandler(self):
        log = LogCapture(self)

        def broken(request):
            raise KeyError("nobody foresaw this")

        self.patch(self.api, "_route", broken)
        for method, path in ENDPOINTS:
            self.assertError(self.request(method, path), 500, "internal error, see the service log")
        self.assertEqual(len([e for e in log.events if "KeyError" in formatEvent(e)]), 3)
        self.assertEqual([e for e in log.events if "log_failure" in e], [])

    def test_inTheHandler(self):
        log = LogCapture(self)

        def broken(*args):
            raise ZeroDivisionError("no")

        self.patch(self.accounts, "info", broken)
        self.assertError(
            self.request("GET", "/containers/demo/sftp/info"), 500,
            "internal error, see the service log",
        )
        self.assertOneLine(log, "ZeroDivisionError")

    def test_answerThatCannotBeWritten(self):
        log = LogCapture(self)
        self.patch(self.accounts, "info", lambda containerId: {"created_at": object()})
        self.assertError(
            self.request("GET", "/containers/demo/sftp/info"), 500,
            "internal error, see the service log",
        )
        self.assertOneLine(log, "TypeError")

    def test_runFailsSynchronously(self):
        log = LogCapture(self)

        def run(f, *args):
            raise MemoryError()

        self.api = api.AdminAPI(self.accounts, self.token, run=run)
        self.assertError(self.generate(), 500)
        self.assertOneLine(log, "MemoryError")
        self.api = api.AdminAPI(self.accounts, self.token, run=lambda f, *a: succeed(None))
        log.events[:] = []
        self.assertError(self.generate(), 500)
        self.assertOneLine(log, "TypeError")
