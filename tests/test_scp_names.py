"""
Names in legacy scp's C and D records.

A record is one line: a name holding a newline, planted in the volume, would
end the record early and let the rest of the name speak the protocol to the
user's client (``scp -O host:logs/* ~/`` writing a ``.bashrc`` the container
chose).  The source skips such a file or directory with an error, as
OpenSSH's scp server once did; the sink refuses names that are not one entry
of a directory; messages never carry a raw control character.
"""

import os

from twisted.trial.unittest import TestCase

from tests.harness import make_credentials, require_binary, run_scp, start_service
from tests.test_exec import ScpDriver

SKIPPING = b"skipping, filename contains a newline"
PAYLOAD = b"echo INJECTED-BY-CONTAINER\n"
# Sent verbatim, this name ends its C record after "x"; its file's content then
# reads, to the client, as the end of x and a new record for .bashrc.
INJECTED_TAIL = b"C0644 %d .bashrc\n" % len(PAYLOAD) + PAYLOAD
INJECTED_NAME = b"x\n" + b"A" * len(INJECTED_TAIL)
INJECTED_CONTENT = b"\0" + INJECTED_TAIL
# Sent verbatim, this directory's D record would also make "evil" inside "sub".
INJECTED_DIRECTORY = b"sub\nD0755 0 evil"


def _writeFile(path, data, mode=0o644, mtime=None):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


class _ScpProtocolTestCase(ScpDriver, TestCase):
    """Drives scp's protocol object over a fake channel, on a real volume."""

    def setUp(self):
        super().setUp()
        self.volumeBytes = os.fsencode(self.volume)

    def path(self, *names):
        return os.path.join(self.volumeBytes, *names)

    def assertOneLineMessages(self, output):
        """Every error record in C{output} is one line, with no control character."""
        for kind in (b"\x01", b"\x02"):
            start = output.find(kind)
            while start >= 0:
                end = output.index(b"\n", start)
                self.assertFalse(
                    any(c < 0x20 or c == 0x7F for c in output[start + 1:end]),
                    output[start:end + 1],
                )
                start = output.find(kind, end)


class SourceNewlineTests(_ScpProtocolTestCase):
    def test_fileWithNewlineSkipped(self):
        """
        The planted file gets an error record instead of a C record; the other
        file goes through and the exit status is 1.
        """
        os.mkdir(self.path(b"logs"), 0o755)
        os.chmod(self.path(b"logs"), 0o755)
        _writeFile(self.path(b"logs", b"app.log"), b"log\n")
        _writeFile(self.path(b"logs", INJECTED_NAME), INJECTED_CONTENT)
        protocol, channel = self.start(b"scp -r -f logs")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"D0755 0 logs\n")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"C0644 4 app.log\n")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"log\n\0")
        protocol.dataReceived(b"\0")
        self.assertEqual(
            channel.output(),
            b"\x01scp: /logs/x\\n" + b"A" * len(INJECTED_TAIL) + b": " + SKIPPING + b"\n"
            + b"E\n",
        )
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.exitCode, 1)

    def test_globSkipsNewlineNameWithoutTimeRecord(self):
        """
        With -p the check comes before the T record, so no times are left
        waiting for a file that never comes.
        """
        _writeFile(self.path(b"a"), b"aa", mtime=1000000000)
        _writeFile(self.path(b"b\nc"), b"bb", mtime=1000000000)
        protocol, channel = self.start(b"scp -p -f *")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"T1000000000 0 1000000000 0\n")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"C0644 2 a\n")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"aa\0")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"\x01scp: /b\\nc: " + SKIPPING + b"\n")
        self.assertEqual(channel.exitCode, 1)

    def test_directoryWithNewlineSkipped(self):
        """
        A directory whose name holds a newline is skipped whole: no D record,
        nothing from inside it, and the rest of the tree still goes.
        """
        os.mkdir(self.path(b"tree"), 0o755)
        os.chmod(self.path(b"tree"), 0o755)
        _writeFile(self.path(b"tree", b"ok"), b"ok")
        os.mkdir(self.path(b"tree", INJECTED_DIRECTORY))
        _writeFile(self.path(b"tree", INJECTED_DIRECTORY, b"inner"), b"secret-ish")
        protocol, channel = self.start(b"scp -r -f tree")
        sent = []
        for _ in range(10):
            protocol.dataReceived(b"\0")
            sent.append(channel.output())
        output = b"".join(sent)
        self.assertEqual(
            output,
            b"D0755 0 tree\n"
            b"C0644 2 ok\n" b"ok\0"
            b"\x01scp: /tree/sub\\nD0755 0 evil: " + SKIPPING + b"\n"
            b"E\n",
        )
        self.assertNotIn(b"inner", output)
        self.assertEqual(channel.exitCode, 1)

    def test_requestedPathWithNewlineSkipped(self):
        """The path on the command line is held to the same rule."""
        _writeFile(self.path(b"a\nC0644 1 b"), b"x")
        protocol, channel = self.start(b"scp -f a\nC0644 1 b")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"\x01scp: /a\\nC0644 1 b: " + SKIPPING + b"\n")
        self.assertEqual(channel.exitCode, 1)

    def test_messagesEscapeControlCharacters(self):
        """
        A message naming a path is one line of plain text, whatever the name
        holds: error records from the source, fatal ones from the sink.
        """
        protocol, channel = self.start(b"scp -f nope\x1b[2J\x7f")
        protocol.dataReceived(b"\0")
        output = channel.output()
        self.assertEqual(output, b"\x01scp: /nope\\x1b[2J\\x7f: No such file or directory\n")
        self.assertOneLineMessages(output)
        protocol, channel = self.start(b"scp -d -t a\nb")
        output = channel.output()
        self.assertEqual(output, b"\x02scp: /a\\nb: Not a directory\n")
        self.assertEqual(channel.exitCode, 1)


class SinkNameTests(_ScpProtocolTestCase):
    def assertRefused(self, command, record):
        protocol, channel = self.start(command)
        self.assertEqual(channel.output(), b"\0")
        protocol.dataReceived(record)
        output = channel.output()
        self.assertTrue(output.startswith(b"\x02scp: error: unexpected filename"), (record, output))
        self.assertOneLineMessages(output)
        self.assertEqual(channel.exitCode, 1, record)
        self.assertEqual(os.listdir(self.volume), [], record)

    def test_refusesNamesThatAreNotOneEntry(self):
        """
        C and D records name one entry of the target directory: no slash, no
        NUL, not empty, not "." or "..", whatever the target.
        """
        names = [b"a/b", b"/abs", b"../evil", b"..", b".", b"", b"a\0b", b"d/"]
        for command in (b"scp -r -t /", b"scp -r -t ~", b"scp -r -t /newfile"):
            for name in names:
                self.assertRefused(command, b"C0644 1 " + name + b"\n")
                self.assertRefused(command, b"D0755 0 " + name + b"\n")

    def test_refusedInsideADirectory(self):
        """The rule holds at every depth of a recursive upload."""
        protocol, channel = self.start(b"scp -r -t /")
        protocol.dataReceived(b"D0755 0 d\nC0644 1 ../../x\n")
        output = channel.output()
        self.assertTrue(output.startswith(b"\0\0\x02scp: error: unexpected filename"), output)
        self.assertEqual(channel.exitCode, 1)
        self.assertEqual(os.listdir(self.path(b"d")), [])
        self.assertEqual(os.listdir(self.volume), ["d"])

    def test_newlineEndsTheName(self):
        """
        A client cannot create a name with a newline through a record: the
        line ends at the newline, the rest is data, and the stream then fails.
        """
        protocol, channel = self.start(b"scp -t /")
        channel.output()
        protocol.dataReceived(b"C0644 1 a\nb\n")
        self.assertEqual(channel.exitCode, 1)
        self.assertIn(b"\x02scp: protocol error: expected end of file\n", channel.output())
        self.assertEqual([n for n in os.listdir(self.volumeBytes) if b"\n" in n], [])


class ScpNewlineNamesEndToEndTests(TestCase):
    """
    The real OpenSSH ``scp -O`` client downloading from the real service on
    loopback, from a volume where the container planted newline names.
    """

    timeout = 300

    def setUp(self):
        require_binary("scp")
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.home = self.service.root / "home"
        self.home.mkdir()

    def local_tree(self):
        return sorted(
            os.path.relpath(os.path.join(folder, name), self.home)
            for folder, folders, files in os.walk(self.home)
            for name in folders + files
        )

    def test_planted_file_is_skipped(self):
        logs = os.path.join(os.fsencode(self.volume), b"logs")
        os.mkdir(logs)
        _writeFile(os.path.join(logs, b"app.log"), b"normal log\n")
        _writeFile(os.path.join(logs, INJECTED_NAME), INJECTED_CONTENT)
        rc, out, err = run_scp(self.service, self.creds, ":logs/*", str(self.home) + "/",
                               options=("-O",))
        self.assertFalse((self.home / ".bashrc").exists(), "the planted name wrote .bashrc")
        self.assertFalse((self.home / "x").exists())
        self.assertEqual((self.home / "app.log").read_bytes(), b"normal log\n")
        self.assertEqual(self.local_tree(), ["app.log"])
        self.assertIn("logs/x\\n" + "A" * len(INJECTED_TAIL) + ": " + SKIPPING.decode(), err)
        self.assertNotEqual(rc, 0, err)

    def test_planted_directory_is_skipped(self):
        tree = os.path.join(os.fsencode(self.volume), b"tree")
        os.mkdir(tree)
        _writeFile(os.path.join(tree, b"ok"), b"ok\n")
        os.mkdir(os.path.join(tree, INJECTED_DIRECTORY))
        _writeFile(os.path.join(tree, INJECTED_DIRECTORY, b"inner"), b"inner\n")
        rc, out, err = run_scp(self.service, self.creds, ":tree", str(self.home / "tree"),
                               options=("-O", "-r"))
        self.assertEqual(self.local_tree(), ["tree", os.path.join("tree", "ok")])
        self.assertEqual((self.home / "tree" / "ok").read_bytes(), b"ok\n")
        self.assertIn("tree/sub\\nD0755 0 evil: " + SKIPPING.decode(), err)
        self.assertNotEqual(rc, 0, err)
