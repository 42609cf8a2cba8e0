"""
Tests for L{lightd_conch.policy} and the ways a policy is kept and changed:
the store (LMDB and its memory fake), L{lightd_conch.accounts.Accounts}, the
admin API's C{/containers/{id}/sftp/policy} and C{lightd-sftp policy}.
"""

import json
import os

from twisted.trial.unittest import TestCase

from lightd_conch.accounts import AccountError, Accounts
from lightd_conch.containers import ContainerState
from lightd_conch.policy import MAX_BYTES, MAX_LIST, Policy, PolicyError, parseSetting
from lightd_conch.quota import (
    REMEASURE_AFTER,
    QuotaExceeded,
    QuotaMeasurer,
    QuotaUsage,
    measure,
)
from lightd_conch.store import LMDBCredentialStore
from lightd_conch.testing import MemoryCredentialStore
from tests.test_api import APITestCase, writeConfig
from tests.test_cli import CLITestsMixin
from tests.test_store import credential

DEFAULTS = {
    "read_only": False,
    "suspended": False,
    "quota_bytes": 0,
    "max_sessions": 0,
    "allowed_ips": [],
    "bandwidth_up": 0,
    "bandwidth_down": 0,
    "denylist": [],
    "password_login": True,
}


class PatchedTests(TestCase):
    def assertRefused(self, changes, key, why):
        """
        C{changes} is refused with a L{PolicyError} that names C{key} and
        says C{why}.
        """
        with self.assertRaises(PolicyError) as caught:
            Policy().patched(changes)
        self.assertEqual(caught.exception.key, key)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{key}: "), message)
        self.assertIn(why, message)

    def test_defaults(self):
        """
        The default policy is the service without a policy, and every key
        is in its JSON.
        """
        self.assertEqual(Policy().toJSON(), DEFAULTS)

    def test_changesOnlyTheKeysGiven(self):
        policy = Policy().patched({"read_only": True, "quota_bytes": 10})
        self.assertEqual(
            policy.toJSON(), {**DEFAULTS, "read_only": True, "quota_bytes": 10}
        )
        again = policy.patched({"quota_bytes": 0})
        self.assertEqual(again.toJSON(), {**DEFAULTS, "read_only": True})

    def test_unknownKey(self):
        self.assertRefused({"readonly": True}, "readonly", "unknown policy key")

    def test_notAnObject(self):
        for value in ([], "read_only", 1, None):
            with self.assertRaises(PolicyError) as caught:
                Policy().patched(value)
            self.assertEqual(caught.exception.key, "policy")

    def test_nothingChangedWhenOneKeyIsBad(self):
        policy = Policy()
        self.assertRaises(
            PolicyError, policy.patched, {"read_only": True, "quota_bytes": -1}
        )
        self.assertEqual(policy, Policy())

    def test_booleansAreBooleans(self):
        """
        A boolean key takes true or false only: not 0, 1 or a string.
        """
        for key in ("read_only", "suspended", "password_login"):
            for value in (0, 1, "true", None, []):
                self.assertRefused({key: value}, key, "must be true or false")
            self.assertTrue(getattr(Policy().patched({key: True}), key))
            self.assertFalse(getattr(Policy().patched({key: False}), key))

    def test_integersAreIntegersInRange(self):
        """
        A size or count is a whole number from 0 to its limit: no bool,
        float, string or negative number.
        """
        for key, limit in [
            ("quota_bytes", MAX_BYTES),
            ("bandwidth_up", MAX_BYTES),
            ("bandwidth_down", MAX_BYTES),
            ("max_sessions", 1_000_000),
        ]:
            for value in (True, False, 1.5, 1.0, "10", None, -1, limit + 1):
                self.assertRefused({key: value}, key, f"must be an integer 0..{limit}")
            self.assertEqual(getattr(Policy().patched({key: limit}), key), limit)
            self.assertEqual(getattr(Policy().patched({key: 0}), key), 0)

    def test_networks(self):
        """
        C{allowed_ips} takes addresses and networks, IPv4 and IPv6, stored
        in their canonical form; an IPv4-mapped IPv6 network is kept as the
        IPv4 one it maps.
        """
        policy = Policy().patched(
            {
                "allowed_ips": [
                    "203.0.113.7",
                    "10.1.2.3/8",
                    " 192.0.2.0/24 ",
                    "2001:DB8::/32",
                    "::1",
                    "::ffff:127.0.0.1",
                    "::ffff:198.51.100.0/120",
                ]
            }
        )
        self.assertEqual(
            policy.allowed_ips,
            (
                "203.0.113.7/32",
                "10.0.0.0/8",
                "192.0.2.0/24",
                "2001:db8::/32",
                "::1/128",
                "127.0.0.1/32",
                "198.51.100.0/24",
            ),
        )

    def test_badNetworks(self):
        for value in (["10.0.0.0/33"], ["example.com"], [""], ["1.2.3.4/"], ["::g"]):
            self.assertRefused({"allowed_ips": value}, "allowed_ips", "not an address or network")
        for value in ("10.0.0.0/8", [1], None, {"a": 1}):
            self.assertRefused({"allowed_ips": value}, "allowed_ips", "must be a list of strings")
        self.assertRefused(
            {"allowed_ips": ["10.0.0.1"] * (MAX_LIST + 1)}, "allowed_ips", f"at most {MAX_LIST}"
        )

    def test_admits(self):
        """
        A login address is compared with each network; an IPv4-mapped IPv6
        address is the IPv4 address it maps; an empty list admits any.
        """
        self.assertTrue(Policy().admits("10.9.9.9"))
        local = Policy().patched({"allowed_ips": ["127.0.0.0/8", "::1"]})
        self.assertTrue(local.admits("127.0.0.1"))
        self.assertTrue(local.admits("127.200.0.1"))
        self.assertTrue(local.admits("::ffff:127.0.0.1"))
        self.assertTrue(local.admits("::1"))
        self.assertFalse(local.admits("10.0.0.1"))
        self.assertFalse(local.admits("::ffff:10.0.0.1"))
        self.assertFalse(local.admits("::2"))
        self.assertFalse(local.admits("not an address"))
        mapped = Policy().patched({"allowed_ips": ["::ffff:127.0.0.1"]})
        self.assertTrue(mapped.admits("127.0.0.1"))
        self.assertTrue(mapped.admits("::ffff:127.0.0.1"))
        self.assertFalse(Policy().patched({"allowed_ips": ["10.0.0.0/8"]}).admits("127.0.0.1"))

    def test_refusal(self):
        self.assertIsNone(Policy().refusal("127.0.0.1", "password"))
        self.assertEqual(
            Policy().patched({"suspended": True}).refusal("127.0.0.1", "publickey"),
            "the container is suspended",
        )
        self.assertEqual(
            Policy().patched({"allowed_ips": ["10.0.0.0/8"]}).refusal("127.0.0.1", "password"),
            "logins from this address are not allowed for this container",
        )
        noPasswords = Policy().patched({"password_login": False})
        self.assertEqual(
            noPasswords.refusal("127.0.0.1", "password"),
            "password logins are disabled for this container",
        )
        self.assertIsNone(noPasswords.refusal("127.0.0.1", "publickey"))

    def test_patterns(self):
        policy = Policy().patched({"denylist": ["*.jar", "config/secrets/", "!keep.jar"]})
        self.assertEqual(policy.denylist, ("*.jar", "config/secrets/", "!keep.jar"))
        self.assertTrue(policy.denies((b"lib", b"a.jar")))
        self.assertFalse(policy.denies((b"lib", b"keep.jar")))
        self.assertTrue(policy.denies((b"config", b"secrets"), isFolder=True))
        self.assertTrue(policy.denies((b"config", b"secrets", b"key")))
        self.assertFalse(policy.denies((b"config", b"secrets")))  # a file of that name
        self.assertFalse(policy.denies((b"other", b"config", b"secrets"), isFolder=True))
        # Case-sensitive, as git is on Linux; the root is never hidden.
        self.assertFalse(policy.denies((b"A.JAR",)))
        self.assertFalse(policy.denies(()))

    def test_badPatterns(self):
        for value in ([""], ["  "], ["a\nb"], ["a\0"], ["x" * 1025]):
            self.assertRefused({"denylist": value}, "denylist", "each pattern must be")
        self.assertRefused({"denylist": "*.jar"}, "denylist", "must be a list of strings")

    def test_storedFormRoundTrips(self):
        policy = Policy().patched(
            {"read_only": True, "allowed_ips": ["::1"], "denylist": ["*.jar"], "quota_bytes": 5}
        )
        self.assertEqual(Policy.decode(policy.encode()), policy)
        self.assertEqual(Policy.decode(None), Policy())

    def test_storedUnknownKeysIgnored(self):
        """
        A record written by a newer version, with keys this one does not
        know, is read for the keys it knows.
        """
        data = json.dumps({"read_only": True, "future_key": 1}).encode()
        self.assertEqual(Policy.decode(data), Policy(read_only=True))


class ParseSettingTests(TestCase):
    def test_booleans(self):
        for text in ("true", "TRUE", "yes", "on", "1"):
            self.assertEqual(parseSetting(f"read_only={text}"), ("read_only", True))
        for text in ("false", "No", "off", "0"):
            self.assertEqual(parseSetting(f"suspended={text}"), ("suspended", False))

    def test_sizes(self):
        self.assertEqual(parseSetting("quota_bytes=123"), ("quota_bytes", 123))
        self.assertEqual(parseSetting("quota_bytes=10K"), ("quota_bytes", 10 * 1024))
        self.assertEqual(parseSetting("quota_bytes=10k"), ("quota_bytes", 10 * 1024))
        self.assertEqual(parseSetting("bandwidth_up=2M"), ("bandwidth_up", 2 * 1024**2))
        self.assertEqual(parseSetting("quota_bytes=3G"), ("quota_bytes", 3 * 1024**3))
        self.assertEqual(parseSetting("quota_bytes=1T"), ("quota_bytes", 1024**4))
        self.assertEqual(parseSetting(" quota_bytes = 0 "), ("quota_bytes", 0))

    def test_lists(self):
        self.assertEqual(
            parseSetting("allowed_ips=127.0.0.0/8, ::1"), ("allowed_ips", ["127.0.0.0/8", "::1"])
        )
        self.assertEqual(parseSetting("denylist=*.jar,config/secrets/"),
                         ("denylist", ["*.jar", "config/secrets/"]))
        self.assertEqual(parseSetting("denylist="), ("denylist", []))

    def test_refused(self):
        for setting, key, why in [
            ("read_only", "read_only", "expected KEY=VALUE"),
            ("nothing=1", "nothing", "unknown policy key"),
            ("read_only=maybe", "read_only", "must be true or false"),
            ("quota_bytes=1.5G", "quota_bytes", "must be a whole number"),
            ("quota_bytes=-1", "quota_bytes", "must be a whole number"),
            ("quota_bytes=", "quota_bytes", "must be a whole number"),
            ("quota_bytes=G", "quota_bytes", "must be a whole number"),
            ("quota_bytes=10P", "quota_bytes", "must be a whole number"),
        ]:
            with self.assertRaises(PolicyError) as caught:
                parseSetting(setting)
            self.assertEqual(caught.exception.key, key)
            self.assertIn(why, str(caught.exception))


class PolicyStoreTestsMixin:
    """
    What every store does with policies.  Subclasses define C{makeStore()}.
    """

    def setUp(self):
        self.store = self.makeStore()
        self.addCleanup(self.store.close)

    def test_defaultWithoutOne(self):
        self.assertEqual(self.store.get_policy("web1"), Policy())
        self.assertEqual(self.store.get_policy(""), Policy())
        self.assertEqual(self.store.get_policy("x" * 600), Policy())

    def test_updateKeepsOtherKeys(self):
        self.assertEqual(
            self.store.update_policy("web1", {"read_only": True}), Policy(read_only=True)
        )
        self.assertEqual(
            self.store.update_policy("web1", {"quota_bytes": 4096}),
            Policy(read_only=True, quota_bytes=4096),
        )
        self.assertEqual(self.store.get_policy("web1"), Policy(read_only=True, quota_bytes=4096))
        self.assertEqual(self.store.get_policy("web2"), Policy())

    def test_refusedChangeWritesNothing(self):
        self.store.update_policy("web1", {"read_only": True})
        self.assertRaises(
            PolicyError, self.store.update_policy, "web1", {"suspended": True, "bogus": 1}
        )
        self.assertEqual(self.store.get_policy("web1"), Policy(read_only=True))

    def test_backToDefaults(self):
        self.store.update_policy("web1", {"read_only": True})
        self.assertEqual(self.store.update_policy("web1", {"read_only": False}), Policy())
        self.assertEqual(self.store.get_policy("web1"), Policy())

    def test_keptAcrossCredentialChanges(self):
        """
        A reset (put over) or a revoke (delete) of the credentials leaves
        the policy as it was.
        """
        self.store.update_policy("web1", {"suspended": True, "denylist": ["*.jar"]})
        self.store.put(credential("web1"))
        self.store.put(credential("web1", password_hash=b"$2b$04$other"))
        expected = Policy(suspended=True, denylist=("*.jar",))
        self.assertEqual(self.store.get_policy("web1"), expected)
        self.store.delete("web1")
        self.assertEqual(self.store.get_policy("web1"), expected)
        self.store.put(credential("web1"))
        self.assertEqual(self.store.get_policy("web1"), expected)


class MemoryPolicyStoreTests(PolicyStoreTestsMixin, TestCase):
    def makeStore(self):
        return MemoryCredentialStore()


class LMDBPolicyStoreTests(PolicyStoreTestsMixin, TestCase):
    def makeStore(self):
        self.path = os.path.abspath(self.mktemp())
        return LMDBCredentialStore(self.path)


class AccountsPolicyTests(TestCase):
    def setUp(self):
        self.config = writeConfig(self)
        self.store = MemoryCredentialStore()
        self.accounts = Accounts(self.config, self.store)
        os.makedirs(self.config.volume_path("web1"))

    def test_needsTheVolumeNotCredentials(self):
        self.assertEqual(self.accounts.policy("web1"), DEFAULTS)
        self.assertEqual(
            self.accounts.set_policy("web1", {"read_only": True}),
            {**DEFAULTS, "read_only": True},
        )
        self.assertIsNone(self.store.get("web1"))

    def test_noVolume(self):
        for call in (
            lambda: self.accounts.policy("web2"),
            lambda: self.accounts.set_policy("web2", {"read_only": True}),
        ):
            with self.assertRaises(AccountError) as caught:
                call()
            self.assertEqual(caught.exception.kind, "not_found")
        self.assertEqual(self.store.get_policy("web2"), Policy())

    def test_badValueNamesTheKey(self):
        with self.assertRaises(AccountError) as caught:
            self.accounts.set_policy("web1", {"quota_bytes": "1G"})
        self.assertEqual(caught.exception.kind, "invalid")
        self.assertTrue(caught.exception.message.startswith("quota_bytes: "))

    def test_badContainerId(self):
        for bad in ("../etc", "", "a/b"):
            with self.assertRaises(AccountError) as caught:
                self.accounts.policy(bad)
            self.assertEqual(caught.exception.kind, "invalid")


class PolicyAPITests(APITestCase):
    path = "/containers/demo/sftp/policy"

    def test_get(self):
        self.assertResponse(self.request("GET", self.path), 200, DEFAULTS)

    def test_patchReturnsTheWholePolicy(self):
        answer = self.assertResponse(
            self.request("PATCH", self.path, {"read_only": True, "quota_bytes": 1024}), 200
        )
        self.assertEqual(answer, {**DEFAULTS, "read_only": True, "quota_bytes": 1024})
        answer = self.assertResponse(
            self.request("PATCH", self.path, {"denylist": ["*.jar"]}), 200
        )
        self.assertEqual(
            answer, {**DEFAULTS, "read_only": True, "quota_bytes": 1024, "denylist": ["*.jar"]}
        )
        self.assertResponse(self.request("GET", self.path), 200, answer)
        # Live sessions are told at once.
        self.assertEqual(self.changed, ["demo", "demo"])

    def test_emptyPatchChangesNothing(self):
        self.assertResponse(self.request("PATCH", self.path, ""), 200, DEFAULTS)
        self.assertResponse(self.request("PATCH", self.path, {}), 200, DEFAULTS)

    def test_badKeyOrValueIs400NamingTheKey(self):
        for body, key in [
            ({"readonly": True}, "readonly"),
            ({"read_only": 1}, "read_only"),
            ({"quota_bytes": True}, "quota_bytes"),
            ({"quota_bytes": -5}, "quota_bytes"),
            ({"allowed_ips": ["nowhere"]}, "allowed_ips"),
            ({"allowed_ips": "127.0.0.1"}, "allowed_ips"),
            ({"denylist": [""]}, "denylist"),
            ({"read_only": True, "suspended": "yes"}, "suspended"),
        ]:
            answer = self.assertResponse(self.request("PATCH", self.path, body), 400)
            self.assertTrue(answer["error"].startswith(f"{key}: "), (body, answer))
        self.assertEqual(self.store.get_policy("demo"), Policy())
        self.assertEqual(self.changed, [])

    def test_notAnObject(self):
        self.assertResponse(
            self.request("PATCH", self.path, [1]), 400,
            {"error": "request body must be a JSON object"},
        )
        self.assertResponse(self.request("PATCH", self.path, "{"), 400)

    def test_noVolumeIs404(self):
        for method, body in (("GET", None), ("PATCH", {"read_only": True})):
            self.assertResponse(
                self.request(method, "/containers/nothing/sftp/policy", body), 404,
                {"error": "container volume does not exist"},
            )
        self.assertEqual(self.store.get_policy("nothing"), Policy())

    def test_needsTheToken(self):
        for method, body in (("GET", None), ("PATCH", {"read_only": True})):
            self.assertResponse(
                self.request(method, self.path, body, token=None), 401,
                {"error": "missing bearer token"},
            )
            self.assertEqual(
                self.assertResponse(self.request(method, self.path, body, token="wrong"), 401)
                .keys(),
                {"error"},
            )
        self.assertEqual(self.store.get_policy("demo"), Policy())

    def test_otherMethods(self):
        for method in ("POST", "PUT", "DELETE"):
            self.assertResponse(self.request(method, self.path, {}), 405)
        self.assertEqual(self.store.get_policy("demo"), Policy())

    def test_keptAcrossCredentialReset(self):
        self.request("PATCH", self.path, {"suspended": True})
        self.assertResponse(self.request("POST", "/containers/demo/sftp/credentials", {}), 200)
        self.assertResponse(self.request("DELETE", "/containers/demo/sftp/credentials"), 204)
        self.assertResponse(self.request("GET", self.path), 200, {**DEFAULTS, "suspended": True})


class PolicyCLITests(CLITestsMixin, TestCase):
    def setUp(self):
        super().setUp()
        os.makedirs(os.path.join(self.volumes, "web1"))

    def test_showHuman(self):
        status, stdout, stderr = self.runScript("policy", "show", "web1")
        self.assertEqual((status, stderr), (0, ""))
        self.assertEqual(
            stdout.splitlines(),
            [
                "read_only: false",
                "suspended: false",
                "quota_bytes: 0",
                "max_sessions: 0",
                "allowed_ips: ",
                "bandwidth_up: 0",
                "bandwidth_down: 0",
                "denylist: ",
                "password_login: true",
            ],
        )

    def test_setAndShowJSON(self):
        status, stdout, stderr = self.runScript(
            "policy", "set", "web1", "read_only=yes", "quota_bytes=10M",
            "allowed_ips=127.0.0.0/8,::1", "denylist=*.jar,config/secrets/", "--json",
        )
        self.assertEqual((status, stderr), (0, ""))
        expected = {
            **DEFAULTS,
            "read_only": True,
            "quota_bytes": 10 * 1024 * 1024,
            "allowed_ips": ["127.0.0.0/8", "::1/128"],
            "denylist": ["*.jar", "config/secrets/"],
        }
        self.assertEqual(json.loads(stdout), expected)
        status, stdout, stderr = self.runScript("policy", "show", "web1", "--json")
        self.assertEqual((status, json.loads(stdout), stderr), (0, expected, ""))
        status, stdout, _ = self.runScript("policy", "show", "web1")
        self.assertIn("allowed_ips: 127.0.0.0/8,::1/128\n", stdout)
        self.assertIn("denylist: *.jar,config/secrets/\n", stdout)
        # What the daemon reads.
        store = LMDBCredentialStore(self.credentials)
        self.addCleanup(store.close)
        self.assertEqual(store.get_policy("web1").toJSON(), expected)

    def test_setHumanShowsTheWholePolicy(self):
        status, stdout, stderr = self.runScript("policy", "set", "web1", "suspended=on")
        self.assertEqual((status, stderr), (0, ""))
        self.assertIn("suspended: true\n", stdout)
        self.assertEqual(len(stdout.splitlines()), len(DEFAULTS))

    def test_refusedChangesExit1(self):
        for setting, message in [
            ("bogus=1", "bogus: unknown policy key"),
            ("read_only=maybe", 'read_only: must be true or false, got "maybe"'),
            ("quota_bytes=lots",
             'quota_bytes: must be a whole number (K, M, G, T suffixes), got "lots"'),
            ("allowed_ips=nowhere", 'allowed_ips: not an address or network: "nowhere"'),
            ("read_only", "read_only: expected KEY=VALUE"),
        ]:
            self.assertRefused(message, "policy", "set", "web1", "suspended=true", setting)
        status, stdout, _ = self.runScript("policy", "show", "web1", "--json")
        self.assertEqual(json.loads(stdout), DEFAULTS)

    def test_quotaOutOfRange(self):
        status, stdout, stderr = self.runScript("policy", "set", "web1", "quota_bytes=99999999T")
        self.assertEqual((status, stdout), (1, ""))
        self.assertIn("quota_bytes: must be an integer 0..", stderr)

    def test_noVolumeExit1(self):
        self.assertRefused("container volume does not exist", "policy", "show", "web2")
        self.assertRefused("container volume does not exist", "policy", "set", "web2",
                           "read_only=true")

    def test_usageExit2(self):
        for argv in (("policy",), ("policy", "set", "web1"), ("policy", "show"),
                     ("policy", "frob", "web1")):
            status, stdout, stderr = self.runScript(*argv)
            self.assertEqual(status, 2, argv)
            self.assertIn("usage:", stderr)


class MeasureTests(TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub", "deeper"))
        with open(os.path.join(self.root, "sub", "file"), "wb") as f:
            f.write(os.urandom(100_000))
        os.link(os.path.join(self.root, "sub", "file"), os.path.join(self.root, "hard"))
        with open(os.path.join(self.root, "sparse"), "wb") as f:
            f.truncate(10**9)
        os.symlink("/etc/passwd", os.path.join(self.root, "link"))
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, self.fd)

    def test_countsAsDuDoes(self):
        """
        What du -sB1 counts: every entry's blocks, a file of several names
        once, a sparse file as what it takes, no link followed.
        """
        import subprocess

        du = int(subprocess.run(["du", "-sB1", self.root], capture_output=True, text=True,
                                check=True).stdout.split()[0])
        self.assertEqual(measure(self.fd), du)

    def test_rate(self):
        """
        Past C{rate} entries a second it sleeps rather than read on.
        """
        for index in range(1200):
            open(os.path.join(self.root, "sub", f"n{index}"), "w").close()
        slept = []
        measure(self.fd, rate=100, sleep=slept.append)
        self.assertTrue(slept)
        self.assertGreater(sum(slept), 5)


class QuotaMeasurerTests(TestCase):
    def setUp(self):
        from twisted.internet.defer import maybeDeferred
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.walked = []
        self.size = 5000

        def fakeMeasure(fd):
            self.walked.append(fd)
            return self.size

        self.measurer = QuotaMeasurer(maybeDeferred, self.clock, measure=fakeMeasure)
        self.state = ContainerState("web1", Policy(quota_bytes=10_000))
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def test_ensureMeasuresOnce(self):
        fired = []
        self.measurer.ensure(self.state, self.root).addCallback(fired.append)
        self.assertEqual((fired, self.state.quota.used), ([None], 5000))
        self.measurer.ensure(self.state, self.root)
        self.assertEqual(len(self.walked), 1)

    def test_refreshEveryTwoMinutes(self):
        self.measurer.ensure(self.state, self.root)
        self.size = 7000
        self.clock.advance(REMEASURE_AFTER - 1)
        self.measurer.refresh(self.state, self.root)
        self.assertEqual((len(self.walked), self.state.quota.used), (1, 5000))
        self.clock.advance(1)
        self.measurer.refresh(self.state, self.root)
        self.assertEqual((len(self.walked), self.state.quota.used), (2, 7000))

    def test_chargesDuringAMeasurementAreKept(self):
        usage = QuotaUsage()
        usage.startMeasure()
        usage.charge(10_000, 3000)
        usage.measured(5000, 0)
        self.assertEqual(usage.used, 8000)
        self.assertRaises(QuotaExceeded, usage.charge, 10_000, 2001)
        self.assertEqual(usage.used, 8000)
        usage.charge(10_000, 2000)
        usage.free(20_000)
        self.assertEqual(usage.used, 0)

    def test_failedMeasurementCountsFromNothing(self):
        def broken(fd):
            raise OSError(5, "I/O error")

        from twisted.internet.defer import maybeDeferred

        measurer = QuotaMeasurer(maybeDeferred, self.clock, measure=broken)
        measurer.ensure(self.state, self.root)
        self.assertEqual(self.state.quota.used, 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class ContainerStatesTests(TestCase):
    def test_quotaSetAgainMeasuresAgain(self):
        """
        Writes are not counted without a quota: one set again forgets the
        old figure, so the next login or check measures the volume.
        """
        from lightd_conch.containers import MemoryContainerStates

        states = MemoryContainerStates()
        state = states.update("web1", Policy(quota_bytes=100))
        state.quota.measured(50, 10.0)
        states.update("web1", Policy(quota_bytes=200))
        self.assertEqual((state.quota.used, state.quota.measuredAt), (50, 10.0))
        states.update("web1", Policy())
        self.assertEqual(state.quota.used, 50)
        states.update("web1", Policy(quota_bytes=100))
        self.assertEqual((state.quota.used, state.quota.measuredAt), (None, None))
        self.assertIs(states.get("web1"), state)


class PolicyWatcherTests(TestCase):
    """
    What watches a container's policy (rsync in its sandbox) hears of each
    change, and only of changes, until its volume closes.
    """

    def setUp(self):
        from lightd_conch.containers import MemoryContainerStates

        self.states = MemoryContainerStates()
        self.root = self.mktemp()
        os.mkdir(self.root)

    def volume(self):
        from lightd_conch.volume import Volume

        return Volume.open(self.root, "web1", state=self.states.get("web1"))

    def test_toldOfChangesOnly(self):
        volume = self.volume()
        heard = []
        volume.whenPolicyChanges(heard.append)
        self.states.update("web1", Policy())
        self.assertEqual(heard, [])
        self.states.update("web1", Policy(read_only=True))
        self.states.update("web1", Policy(read_only=True))
        self.states.update("web1", Policy())
        self.assertEqual(heard, [Policy(read_only=True), Policy()])
        volume.close()

    def test_notToldAfterClose(self):
        volume = self.volume()
        heard = []
        volume.whenPolicyChanges(heard.append)
        volume.close()
        self.states.update("web1", Policy(read_only=True))
        self.assertEqual(heard, [])
        self.assertEqual(self.states.get("web1").watchers, [])

    def test_oneFailingWatcherDoesNotStopTheOthers(self):
        volume = self.volume()
        heard = []

        def fails(policy):
            raise RuntimeError("boom")

        volume.whenPolicyChanges(fails)
        volume.whenPolicyChanges(heard.append)
        state = self.states.update("web1", Policy(suspended=True))
        self.assertEqual(heard, [Policy(suspended=True)])
        self.assertEqual(state.policy, Policy(suspended=True))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        volume.close()
