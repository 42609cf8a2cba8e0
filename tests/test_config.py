"""
Tests for L{lightd_conch.config}: what an operator gets from config.json,
and the one-line refusals naming the file and the key.
"""

import json
import os
import re

from twisted.trial.unittest import TestCase

from lightd_conch.config import ConfigError, load

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LoadTestsMixin:
    def writeConfig(self, document, text=None):
        """
        Write C{document} as JSON (or C{text} verbatim) to config.json in a
        new folder and return the file's path.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(document) if text is None else text)
        return path

    def assertRefused(self, document, message, text=None):
        """
        Loading the file is refused with C{<file>: message}, and nothing
        appears in its folder.
        """
        path = self.writeConfig(document, text)
        error = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(error), f"{path}: {message}")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["config.json"])
        return error


class DefaultsTests(LoadTestsMixin, TestCase):
    def test_emptyObject(self):
        """
        Every key is optional; paths default under the file's folder.
        """
        path = self.writeConfig({})
        folder = os.path.dirname(path)
        config = load(path)
        self.assertEqual(config.path, path)
        self.assertEqual((config.server.host, config.server.port), ("127.0.0.1", 8070))
        self.assertEqual(
            (config.authorization.enabled, config.authorization.token), (True, "")
        )
        self.assertEqual(config.storage.base_path, os.path.join(folder, "storage"))
        self.assertEqual(
            config.storage.volumes_path, os.path.join(folder, "storage", "volumes")
        )
        sftp = config.sftp
        self.assertEqual(
            (sftp.enabled, sftp.host, sftp.port, sftp.public_host),
            (True, "0.0.0.0", 2022, ""),
        )
        self.assertEqual(
            sftp.host_key, os.path.join(folder, "storage", "sftp_host_ed25519_key")
        )
        self.assertEqual(
            (
                sftp.bcrypt_cost,
                sftp.idle_timeout,
                sftp.login_grace_time,
                sftp.max_auth_tries,
                sftp.window_size,
                sftp.max_packet_size,
                sftp.max_handles,
            ),
            (10, 300.0, 120.0, 6, 2 * 1024 * 1024, 32 * 1024, 512),
        )
        self.assertEqual(sftp.max_handles_per_container, 4096)
        self.assertEqual(
            (
                sftp.max_sessions_per_container,
                sftp.max_sessions_per_ip,
                sftp.max_queued_output_per_container,
            ),
            (32, 64, 64 * 1024 * 1024),
        )

    def test_shippedConfig(self):
        """
        The repository's config.json loads as is, rooted at the checkout.
        """
        config = load(os.path.join(REPOSITORY, "config.json"))
        self.assertEqual(config.sftp.port, 2022)
        self.assertEqual(
            config.storage.base_path, os.path.join(REPOSITORY, "storage")
        )

    def test_derivedPaths(self):
        """
        The credential store, API token and volumes live under the storage
        paths.
        """
        config = load(
            self.writeConfig(
                {"storage": {"base_path": "/srv/state", "volumes_path": "/srv/vols"}}
            )
        )
        self.assertEqual(config.credentials_path, "/srv/state/sftp_credentials")
        self.assertEqual(config.api_token_path, "/srv/state/api_token")
        self.assertEqual(config.volume_path("web1"), "/srv/vols/web1")
        self.assertEqual(config.sftp.host_key, "/srv/state/sftp_host_ed25519_key")


class ValuesTests(LoadTestsMixin, TestCase):
    def test_givenValues(self):
        """
        Given values replace the defaults.
        """
        config = load(
            self.writeConfig(
                {
                    "server": {"host": "0.0.0.0", "port": 9000},
                    "authorization": {"enabled": False, "token": "lightd_x"},
                    "sftp": {
                        "enabled": False,
                        "host": "::",
                        "port": 0,
                        "public_host": "sftp.example.com",
                        "bcrypt_cost": 12,
                        "idle_timeout": 0,
                        "login_grace_time": 2.5,
                        "max_auth_tries": 3,
                        "window_size": 65536,
                        "max_packet_size": 65536,
                        "max_handles": 10,
                    },
                }
            )
        )
        self.assertEqual((config.server.host, config.server.port), ("0.0.0.0", 9000))
        self.assertEqual(
            (config.authorization.enabled, config.authorization.token),
            (False, "lightd_x"),
        )
        sftp = config.sftp
        self.assertEqual(
            (sftp.enabled, sftp.host, sftp.port, sftp.public_host, sftp.bcrypt_cost),
            (False, "::", 0, "sftp.example.com", 12),
        )
        self.assertEqual((sftp.idle_timeout, sftp.login_grace_time), (0.0, 2.5))
        self.assertEqual(
            (sftp.max_auth_tries, sftp.window_size, sftp.max_packet_size),
            (3, 65536, 65536),
        )
        self.assertEqual(sftp.max_handles, 10)

    def test_relativePaths(self):
        """
        Relative paths resolve against the file's folder, not the current
        directory; absolute ones are kept.
        """
        path = self.writeConfig(
            {
                "storage": {"base_path": "../state", "volumes_path": "/srv/volumes"},
                "sftp": {"host_key": "keys/host"},
            }
        )
        folder = os.path.dirname(path)
        config = load(os.path.relpath(path))
        self.assertEqual(config.path, path)
        self.assertEqual(
            config.storage.base_path,
            os.path.join(os.path.dirname(folder), "state"),
        )
        self.assertEqual(config.storage.volumes_path, "/srv/volumes")
        self.assertEqual(config.sftp.host_key, os.path.join(folder, "keys", "host"))

    def test_lightdKeysIgnored(self):
        """
        Lightd's own sections and C{storage.containers_path} are accepted
        whatever they hold, so one Lightd config.json serves both.
        """
        config = load(
            self.writeConfig(
                {
                    "version": "1.2.0",
                    "docker": {"socket": "/var/run/docker.sock", "anything": [1]},
                    "monitoring": {"enabled": True, "interval": 30},
                    "remote": {"enabled": False, "url": ""},
                    "storage": {"containers_path": "storage/containers"},
                    "sftp": {"port": 2200},
                }
            )
        )
        self.assertEqual(config.sftp.port, 2200)
        self.assertFalse(hasattr(config.storage, "containers_path"))


class RefusalTests(LoadTestsMixin, TestCase):
    def test_portNotInteger(self):
        """
        A port that is not an integer is refused, naming file and key and
        showing the value as written.
        """
        error = self.assertRefused(
            {"sftp": {"port": "abc"}},
            'sftp.port: must be an integer 0..65535, got "abc"',
        )
        self.assertEqual(error.key, "sftp.port")

    def test_portBoolean(self):
        """
        true is not a port, although Python's bool is an int.
        """
        self.assertRefused(
            {"server": {"port": True}},
            "server.port: must be an integer 0..65535, got true",
        )

    def test_portOutOfRange(self):
        """
        Ports outside 0..65535 are refused.
        """
        for port in (-1, 65536):
            self.assertRefused(
                {"sftp": {"port": port}},
                f"sftp.port: must be an integer 0..65535, got {port}",
            )

    def test_wrongTypes(self):
        """
        Each key's type is checked.
        """
        seconds = "must be a number of seconds, 0 or more (0 disables)"
        for section, key, value, problem in [
            ("sftp", "enabled", "yes", 'must be true or false, got "yes"'),
            ("authorization", "enabled", 1, "must be true or false, got 1"),
            ("authorization", "token", None, "must be a string, got null"),
            ("authorization", "token", 5, "must be a string, got 5"),
            ("sftp", "public_host", [], "must be a string, got []"),
            ("sftp", "port", 2022.0, "must be an integer 0..65535, got 2022.0"),
            ("storage", "base_path", "", 'must be a non-empty path, got ""'),
            ("storage", "volumes_path", 5, "must be a non-empty path, got 5"),
            ("sftp", "host_key", None, "must be a non-empty path, got null"),
            ("sftp", "bcrypt_cost", 3, "must be an integer 4..31, got 3"),
            ("sftp", "bcrypt_cost", 32, "must be an integer 4..31, got 32"),
            ("sftp", "max_auth_tries", 0, "must be an integer 1..100, got 0"),
            ("sftp", "max_handles", 0, "must be an integer 1..65536, got 0"),
            ("sftp", "max_handles_per_container", 0, "must be an integer 1..1048576, got 0"),
            ("sftp", "max_sessions_per_container", 0, "must be an integer 1..65536, got 0"),
            ("sftp", "max_sessions_per_ip", "8", 'must be an integer 1..65536, got "8"'),
            (
                "sftp",
                "max_queued_output_per_container",
                1024,
                "must be an integer 4194304..1099511627776, got 1024",
            ),
            (
                "sftp",
                "window_size",
                1024,
                "must be an integer 32768..2147483647, got 1024",
            ),
            (
                "sftp",
                "max_packet_size",
                1024,
                "must be an integer 4096..131072, got 1024",
            ),
            ("sftp", "idle_timeout", -1, f"{seconds}, got -1"),
            ("sftp", "login_grace_time", True, f"{seconds}, got true"),
        ]:
            self.assertRefused(
                {section: {key: value}}, f"{section}.{key}: {problem}"
            )

    def test_bindAddresses(self):
        """
        C{server.host} and C{sftp.host} are IP address literals: "" would
        bind every interface, and a name or a bad address would fail only
        when the service binds, after it wrote its files.
        """
        problem = "must be an IPv4 or IPv6 address such as 127.0.0.1, 0.0.0.0 or ::"
        for section in ("server", "sftp"):
            for value, shown in [
                ("", '""'),
                ("localhost", '"localhost"'),
                ("sftp.example.test", '"sftp.example.test"'),
                ("999.1.1.1", '"999.1.1.1"'),
                (" 127.0.0.1", '" 127.0.0.1"'),
                ("10.0.0.0/8", '"10.0.0.0/8"'),
                (2130706433, "2130706433"),
                (True, "true"),
                (None, "null"),
            ]:
                self.assertRefused(
                    {section: {"host": value}}, f"{section}.host: {problem}, got {shown}"
                )
        for value in ("127.0.0.1", "0.0.0.0", "192.0.2.7", "::", "::1", "fe80::1%lo"):
            config = load(self.writeConfig({"server": {"host": value}, "sftp": {"host": value}}))
            self.assertEqual((config.server.host, config.sftp.host), (value, value))

    def test_safeListItemsAreStrings(self):
        """
        Each C{safe_list} item is a string: C{ipaddress} would take 5 as
        0.0.0.5/32 and true as 0.0.0.1/32.
        """
        for item, shown in [(5, "5"), (True, "true"), (None, "null"), ([], "[]"), ("x", '"x"')]:
            self.assertRefused(
                {"sftp": {"defender": {"safe_list": ["10.0.0.0/8", item]}}},
                "sftp.defender.safe_list: must be a list of addresses or networks"
                f" like 10.0.0.0/8, got {shown}",
            )
        config = load(
            self.writeConfig({"sftp": {"defender": {"safe_list": ["10.0.0.0/8", "::1"]}}})
        )
        self.assertEqual(
            [str(network) for network in config.sftp.defender.safe_list],
            ["10.0.0.0/8", "::1/128"],
        )

    def test_nestedTooDeeply(self):
        """
        JSON nested deeper than the parser goes is refused in one line, not
        with a RecursionError.
        """
        deep = "[" * 100000 + "]" * 100000
        self.assertRefused(None, "invalid JSON: nested too deeply", text=deep)
        self.assertRefused(
            None,
            "invalid JSON: nested too deeply",
            text='{"sftp": {"port": ' + deep + "}}",
        )

    def test_nestedValueShown(self):
        """
        A value nested nearly as deep as the parser goes is refused in one
        line too, whether the parser or the message runs out of stack.
        """
        # Just below the depth json.loads gives up at, json.dumps, called
        # deeper in the stack, can give up instead: try every depth near it.
        for depth in range(900, 1000):
            path = self.writeConfig(
                None, text='{"sftp": {"port": ' + "[" * depth + "]" * depth + "}}"
            )
            error = self.assertRaises(ConfigError, load, path)
            self.assertRegex(
                str(error),
                "^" + re.escape(f"{path}: ")
                + r"(invalid JSON: nested too deeply"
                r"|sftp\.port: must be an integer 0\.\.65535, got (\[{37}\.\.\."
                r"|a value nested too deeply))$",
            )

    def test_notANumber(self):
        """
        JSON's NaN and Infinity extensions are no timeouts.
        """
        self.assertRefused(
            None,
            "sftp.idle_timeout: must be a number of seconds, 0 or more"
            " (0 disables), got NaN",
            text='{"sftp": {"idle_timeout": NaN}}',
        )

    def test_packetLargerThanWindow(self):
        """
        A packet must fit in the window.
        """
        self.assertRefused(
            {"sftp": {"window_size": 65536, "max_packet_size": 131072}},
            "sftp.max_packet_size: must not exceed sftp.window_size (65536),"
            " got 131072",
        )

    def test_unknownTopLevelKey(self):
        """
        An unknown section is refused.
        """
        self.assertRefused({"bogus": {}}, "bogus: unknown key")

    def test_unknownKeySuggestion(self):
        """
        A misspelt key is refused with the likely intended one.
        """
        self.assertRefused(
            {"sftp": {"prot": 2022}},
            'sftp.prot: unknown key (did you mean "sftp.port"?)',
        )
        self.assertRefused(
            {"sftpp": {}}, 'sftpp: unknown key (did you mean "sftp"?)'
        )

    def test_unknownKeyInSections(self):
        """
        Unknown keys are refused in every section this service reads;
        C{containers_path} is only ignored in C{storage}.
        """
        for section in ("server", "authorization", "storage", "sftp"):
            self.assertRefused(
                {section: {"xyzzy": 1}}, f"{section}.xyzzy: unknown key"
            )
        self.assertRefused(
            {"sftp": {"containers_path": "x"}}, "sftp.containers_path: unknown key"
        )

    def test_sectionNotObject(self):
        """
        A section must be an object.
        """
        self.assertRefused({"sftp": [2022]}, "sftp: must be an object, got [2022]")

    def test_longValueShortened(self):
        """
        A long rejected value is shortened so the message stays short.
        """
        self.assertRefused(
            {"server": {"port": "9" * 100}},
            'server.port: must be an integer 0..65535, got "' + "9" * 36 + "...",
        )

    def test_missingFile(self):
        """
        A missing file is refused, naming it.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")
        self.assertFalse(os.path.exists(path))

    def test_invalidJSON(self):
        """
        Invalid JSON is refused with where the parser stopped.
        """
        self.assertRefused(
            None,
            "invalid JSON at line 2 column 1: Expecting property name enclosed"
            " in double quotes",
            text='{"sftp": {"port": 1},\n}',
        )

    def test_notUTF8(self):
        """
        A file that is not UTF-8 is refused.
        """
        path = self.writeConfig({})
        with open(path, "wb") as f:
            f.write(b'{"server": {"host": "\xff"}}')
        error = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(error), f"{path}: invalid JSON: not UTF-8")

    def test_notAnObject(self):
        """
        The top level must be an object.
        """
        self.assertRefused([1, 2], "must be a JSON object, got [1, 2]")

    def test_oneLine(self):
        """
        Control characters in a value cannot break the message's one line.
        """
        error = self.assertRefused(
            {"server": {"port": "1\n2"}},
            'server.port: must be an integer 0..65535, got "1\\n2"',
        )
        self.assertNotIn("\n", str(error))
