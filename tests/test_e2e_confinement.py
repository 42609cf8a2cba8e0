"""
Confinement, end to end: no client path reaches outside the volume.

Hostile symlinks are planted from outside the session (as another container process could),
``..`` is sent in every spelling, host paths are sent as they are. Each request must either fail
or take effect inside the volume (chroot semantics: a link to "/" means the volume root). After
every test the sentinels outside the volume are compared with their state before: same content,
mode, times (atime too: they are read with O_NOATIME here, so a read by the service shows) and
listings, and nothing new exists outside the volume.
"""

import hashlib
import os
import socket
import stat
import threading
import time
import uuid

from twisted.trial import unittest

from tests.harness import (
    FX_OK,
    FXP_NAME,
    FXP_STATUS,
    RawSFTP,
    attrs,
    make_credentials,
    paramiko_sftp,
    start_service,
    string,
)

SECRET = b"TOP SECRET: the service must never read this\n"
SIBLING = b"another container's file\n"
OUTSIDE_X = b"OUTSIDE-X: lives next to the volume\n"
OLD = 1_000_000_000


def tree_state(path):
    """Everything observable about ``path`` and below, without touching atimes."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path)}
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        return {
            "dir": (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns),
            "entries": {name: tree_state(os.path.join(path, name)) for name in names},
        }
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 16):
            digest.update(chunk)
    finally:
        os.close(fd)
    # st_nlink: a hard link made to a sentinel from anywhere shows here.
    return {"file": (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                     st.st_atime_ns, digest.hexdigest())}


class ConfinementTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.root = self.service.root
        self.probe = "lightd-probe-" + uuid.uuid4().hex[:12]

        self.outside = self.root / "outside"
        self.secret = self.outside / "secret.txt"
        (self.outside / "subdir").mkdir(parents=True)
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o640)
        self.sibling = self.service.volumes / "demo2"
        self.sibling.mkdir()
        (self.sibling / "other.txt").write_bytes(SIBLING)
        (self.service.volumes / "x").write_bytes(OUTSIDE_X)
        for path in (self.secret, self.outside / "subdir", self.outside,
                     self.sibling / "other.txt", self.sibling, self.service.volumes / "x"):
            os.utime(path, (OLD, OLD), follow_symlinks=False)

        (self.volume / "inside.txt").write_bytes(b"inside\n")
        (self.volume / "x").write_bytes(b"x-inside\n")
        (self.volume / "a").mkdir()
        self.plant("escape", "/")
        self.plant("up", "../..")
        self.plant("up3", "../../..")  # from the volume's folder, the temp root: outside/ is there
        self.plant("abs", str(self.secret))
        self.plant("dangle", str(self.outside / "newfile"))
        self.plant("mid", str(self.outside))
        self.plant("sib", "../demo2")

        self.before = self.outside_state()
        self.sftp = paramiko_sftp(self, self.service, self.creds)
        self.addCleanup(self.assertOutsideUnchanged)

    def plant(self, name, target):
        os.symlink(target, self.volume / name)

    def outside_state(self):
        storage = self.service.storage
        return {
            "outside": tree_state(self.outside),
            "volumes": {
                name: tree_state(self.service.volumes / name)
                for name in sorted(os.listdir(self.service.volumes)) if name != "demo"
            },
            "storage": {
                name: tree_state(storage / name)
                for name in sorted(os.listdir(storage))
                # The audit log records the logins the tests make.
                if name not in ("volumes", "sftp_credentials", "sftp_audit.log")
            },
            "root": sorted(n for n in os.listdir(self.root) if not n.startswith("service.log")),
            "probe": [
                str(p) for p in (
                    self.root, self.service.storage, self.service.volumes, self.outside,
                    self.root.parent, "/",
                )
                if os.path.lexists(os.path.join(p, self.probe))
            ],
        }

    def assertOutsideUnchanged(self):
        self.assertEqual(self.outside_state(), self.before)

    # --- outcomes: a refusal, or an effect that stays inside ------------------------------

    def check_message(self, exc, args):
        if any(str(self.root) in str(a) for a in args):
            return  # the client sent that path itself; echoing it reveals nothing
        self.assertNotIn(str(self.root), str(exc), "a reply revealed a host path")
        self.assertNotIn("storage/volumes", str(exc), "a reply revealed a host path")
        self.assertNotIn(SECRET.decode().strip(), str(exc))

    def refused(self, call, *args):
        """``call(*args)`` must fail with an SFTP error; returns the exception."""
        try:
            result = call(*args)
        except IOError as e:
            self.check_message(e, args)
            return e
        self.fail(f"{call.__name__}{args!r} succeeded with {result!r}; it must be refused")

    def not_found(self, call, *args):
        exc = self.refused(call, *args)
        self.assertIsInstance(exc, FileNotFoundError, f"{call.__name__}{args!r}: {exc!r}")
        return exc

    def outcome(self, call, *args):
        """(True, result) or (False, exception): for requests where both are acceptable."""
        try:
            return True, call(*args)
        except IOError as e:
            self.check_message(e, args)
            return False, e

    def read(self, path):
        with self.sftp.open(path, "r") as f:
            data = f.read()
        self.assertNotIn(SECRET, data)
        self.assertNotIn(SIBLING, data)
        self.assertNotIn(OUTSIDE_X, data)
        return data

    def write(self, path, data=b"written by the client\n", mode="w"):
        with self.sftp.open(path, mode) as f:
            f.write(data)

    def volume_listing(self):
        return sorted(self.sftp.listdir("/"))


class LinksToTheRootTests(ConfinementTestCase):
    """``escape -> /``, ``up -> ../..`` and ``up3 -> ../../..`` all lead to the volume root."""

    def test_listing_through_the_link_lists_the_volume(self):
        for link in ("escape", "up", "up3", "escape/", "up/", "escape/escape/up3"):
            self.assertEqual(sorted(self.sftp.listdir(link)), self.volume_listing(), link)

    def test_read_through_the_link_reads_inside(self):
        for link in ("escape", "up", "up3"):
            self.assertEqual(self.read(f"{link}/inside.txt"), b"inside\n")
            self.not_found(self.read, f"{link}/outside/secret.txt")
            self.not_found(self.read, f"{link}/../outside/secret.txt")
            self.not_found(self.read, f"{link}/storage/volumes/demo2/other.txt")
            self.not_found(self.read, f"{link}/{self.secret}")
            self.not_found(self.read, f"{link}/etc/passwd")

    def test_stat_lstat_readlink_realpath(self):
        for link, target in (("escape", "/"), ("up", "../..")):
            self.assertTrue(stat.S_ISLNK(self.sftp.lstat(link).st_mode))
            self.assertTrue(stat.S_ISDIR(self.sftp.stat(link).st_mode))
            self.assertEqual(self.sftp.readlink(link), target)
            self.assertEqual(self.sftp.stat(f"{link}/inside.txt").st_size, len(b"inside\n"))
            self.assertIn(self.sftp.normalize(link), ("/", f"/{link}"))
            self.assertEqual(self.sftp.normalize(f"{link}/.."), "/")

    def test_create_write_and_mkdir_through_the_link_land_inside(self):
        self.write(f"escape/{self.probe}", b"via escape\n")
        self.assertEqual((self.volume / self.probe).read_bytes(), b"via escape\n")
        self.write(f"up/{self.probe}", b"+via up\n", mode="a")
        self.assertEqual((self.volume / self.probe).read_bytes(), b"via escape\n+via up\n")
        self.sftp.mkdir(f"up/{self.probe}-dir", 0o755)
        self.assertTrue((self.volume / f"{self.probe}-dir").is_dir())
        self.sftp.rmdir(f"escape/{self.probe}-dir")
        self.assertFalse((self.volume / f"{self.probe}-dir").exists())

    def test_setstat_through_the_link_changes_inside(self):
        self.sftp.chmod("escape/inside.txt", 0o600)
        self.sftp.utime("up/inside.txt", (OLD, OLD))
        on_disk = os.stat(self.volume / "inside.txt")
        self.assertEqual(stat.S_IMODE(on_disk.st_mode), 0o600)
        self.assertEqual(int(on_disk.st_mtime), OLD)

    def test_rename_and_remove_through_the_link_stay_inside(self):
        self.sftp.rename("escape/inside.txt", "up/renamed.txt")
        self.assertEqual((self.volume / "renamed.txt").read_bytes(), b"inside\n")
        self.sftp.remove("escape/renamed.txt")
        self.assertFalse((self.volume / "renamed.txt").exists())
        self.refused(self.sftp.rename, "x", "escape/../../outside/x")
        self.assertEqual((self.volume / "x").read_bytes(), b"x-inside\n")

    def test_rmdir_of_the_root_or_the_link_is_refused(self):
        for path in ("escape", "up", "escape/", "/", "..", "escape/..", "up/../.."):
            self.refused(self.sftp.rmdir, path)
        self.refused(self.sftp.remove, "/")
        self.assertTrue(self.volume.is_dir())
        self.assertTrue((self.volume / "inside.txt").exists())


class LinksToHostPathsTests(ConfinementTestCase):
    """``abs``, ``dangle`` and ``mid`` hold absolute host paths: inside, those do not exist."""

    def test_read_and_stat_through_a_host_path_link_find_nothing(self):
        for path in ("abs", "dangle", "mid/secret.txt", "mid/subdir", "mid/", "mid/."):
            self.not_found(self.sftp.stat, path)
        for path in ("abs", "dangle", "mid/secret.txt"):
            self.not_found(self.read, path)
        self.not_found(self.sftp.lstat, "mid/secret.txt")
        self.not_found(self.sftp.listdir, "mid")
        self.not_found(self.sftp.listdir, "mid/subdir")
        for link in ("abs", "dangle", "mid"):
            self.assertTrue(stat.S_ISLNK(self.sftp.lstat(link).st_mode))

    def test_readlink_returns_the_planted_text_verbatim(self):
        self.assertEqual(self.sftp.readlink("abs"), str(self.secret))
        self.assertEqual(self.sftp.readlink("mid"), str(self.outside))
        self.assertEqual(self.sftp.readlink("dangle"), str(self.outside / "newfile"))
        self.not_found(self.sftp.readlink, "mid/secret.txt")

    def test_realpath_never_answers_with_the_real_volume(self):
        for path in ("abs", "dangle", "mid", "mid/secret.txt", "sib"):
            ok, result = self.outcome(self.sftp.normalize, path)
            if ok:
                self.assertTrue(result.startswith("/"), result)
                self.assertNotIn(str(self.volume), result)
                self.assertNotIn("storage/volumes", result)

    def test_write_through_a_host_path_link_is_refused(self):
        for path in ("abs", "dangle", "mid/secret.txt", "mid/newfile", "mid/subdir/newfile"):
            for mode in ("w", "a", "r+"):
                self.refused(self.write, path, b"overwritten\n", mode)

    def test_create_through_a_dangling_link_stays_inside(self):
        # Once the link's target directories exist inside the volume, creating through the link
        # may succeed, but then the file is made inside.
        inner = self.volume / str(self.outside).lstrip("/")
        inner.mkdir(parents=True)
        ok, _ = self.outcome(self.write, "dangle", b"through the dangling link\n")
        if ok:
            self.assertEqual((inner / "newfile").read_bytes(), b"through the dangling link\n")
        self.assertFalse((self.outside / "newfile").exists())
        ok, _ = self.outcome(self.write, "mid/created.txt", b"through mid\n")
        if ok:
            self.assertEqual((inner / "created.txt").read_bytes(), b"through mid\n")
        self.assertFalse((self.outside / "created.txt").exists())

    def test_setstat_through_a_host_path_link_is_refused(self):
        for path in ("mid/secret.txt", "mid/subdir"):
            self.refused(self.sftp.chmod, path, 0o777)
            self.refused(self.sftp.utime, path, (2_000_000_000, 2_000_000_000))
        for path in ("abs", "dangle"):
            # Acting on the link itself (not following it) would also be inside the volume.
            self.outcome(self.sftp.chmod, path, 0o777)
            self.outcome(self.sftp.utime, path, (2_000_000_000, 2_000_000_000))
        for path in ("abs", "dangle", "mid/secret.txt"):
            self.refused(self.sftp.truncate, path, 0)

    def test_remove_rmdir_mkdir_through_a_host_path_link_are_refused(self):
        self.refused(self.sftp.remove, "mid/secret.txt")
        self.refused(self.sftp.rmdir, "mid/subdir")
        self.refused(self.sftp.rmdir, "mid")
        self.refused(self.sftp.mkdir, "mid/newdir", 0o755)
        self.refused(self.sftp.mkdir, "mid/subdir/newdir", 0o755)
        self.refused(self.sftp.symlink, "/", "mid/planted-link")

    def test_rename_through_a_host_path_link_is_refused(self):
        self.refused(self.sftp.rename, "mid/secret.txt", "stolen.txt")
        self.refused(self.sftp.rename, "mid/subdir", "stolen-dir")
        self.refused(self.sftp.rename, "inside.txt", "mid/planted.txt")
        self.refused(self.sftp.rename, "inside.txt", "mid/subdir/planted.txt")
        self.assertEqual((self.volume / "inside.txt").read_bytes(), b"inside\n")

    def test_links_themselves_can_be_renamed_and_removed_inside(self):
        # These act on the link, which is inside the volume; the target is untouched.
        self.sftp.rename("abs", "abs-renamed")
        self.assertEqual(os.readlink(self.volume / "abs-renamed"), str(self.secret))
        self.sftp.remove("abs-renamed")
        self.assertFalse(os.path.lexists(self.volume / "abs-renamed"))
        self.write("replacement.txt", b"replacement\n")
        ok, _ = self.outcome(self.sftp.rename, "replacement.txt", "dangle")
        if ok:
            self.assertEqual((self.volume / "dangle").read_bytes(), b"replacement\n")
        self.assertFalse((self.outside / "newfile").exists())
        self.sftp.remove("mid")
        self.assertFalse(os.path.lexists(self.volume / "mid"))


class LinkToSiblingVolumeTests(ConfinementTestCase):
    """``sib -> ../demo2``: ``..`` at the volume root stays at the root."""

    def test_every_request_through_the_sibling_link_misses(self):
        self.not_found(self.read, "sib/other.txt")
        self.not_found(self.sftp.stat, "sib/other.txt")
        self.not_found(self.sftp.listdir, "sib")
        self.not_found(self.sftp.stat, "sib")
        self.refused(self.write, "sib/other.txt")
        self.refused(self.write, "sib/new.txt")
        self.refused(self.sftp.chmod, "sib/other.txt", 0o777)
        self.refused(self.sftp.remove, "sib/other.txt")
        self.refused(self.sftp.rename, "sib/other.txt", "taken.txt")
        self.refused(self.sftp.rename, "inside.txt", "sib/given.txt")
        self.refused(self.sftp.mkdir, "sib/newdir", 0o755)
        self.assertEqual(self.sftp.readlink("sib"), "../demo2")

    def test_dot_dot_to_the_sibling_misses(self):
        for path in ("../demo2/other.txt", "/../demo2/other.txt", "escape/../demo2/other.txt",
                     "up/../../demo2/other.txt"):
            self.not_found(self.read, path)


class ClientMadeLinksTests(ConfinementTestCase):
    """Links the client makes itself get the same treatment."""

    def test_client_links_to_host_paths_resolve_inside(self):
        self.sftp.symlink(str(self.outside), "my-mid")
        self.sftp.symlink("../../../outside/secret.txt", "my-rel")
        self.sftp.symlink("/", "my-root")
        self.not_found(self.read, "my-mid/secret.txt")
        self.not_found(self.read, "my-rel")
        self.refused(self.write, "my-rel")
        self.refused(self.write, "my-mid/secret.txt")
        self.assertEqual(sorted(self.sftp.listdir("my-root")), self.volume_listing())

    def test_link_in_an_intermediate_directory(self):
        self.sftp.mkdir("deep", 0o755)
        self.sftp.symlink("../../..", "deep/hop")
        self.assertEqual(self.read("deep/hop/inside.txt"), b"inside\n")
        self.not_found(self.read, "deep/hop/outside/secret.txt")
        self.not_found(self.read, "deep/hop/../outside/secret.txt")


class DotDotAndHostPathTests(ConfinementTestCase):
    def test_dot_dot_forms_stay_at_the_root(self):
        for path in ("../x", "/../../x", "a/../../x", "//..//x", "../../../../../x", "./../x",
                     "a/./../../a/../x", "/a/../../../x"):
            self.assertEqual(self.read(path), b"x-inside\n", path)
            self.assertEqual(self.sftp.stat(path).st_size, len(b"x-inside\n"), path)

    def test_realpath_of_dot_dot_is_the_root(self):
        for path in ("..", "../..", "/..", "/../..", "a/../..", "//..//", "."):
            self.assertEqual(self.sftp.normalize(path), "/", path)
        self.assertEqual(self.sftp.normalize("../x"), "/x")
        self.assertEqual(self.sftp.normalize("/../a/../x"), "/x")

    def test_listing_dot_dot_lists_the_volume(self):
        for path in ("..", "/..", "../..", "a/../.."):
            self.assertEqual(sorted(self.sftp.listdir(path)), self.volume_listing(), path)

    def test_writes_with_dot_dot_land_inside(self):
        self.write(f"../{self.probe}", b"one\n")
        self.assertEqual((self.volume / self.probe).read_bytes(), b"one\n")
        self.sftp.mkdir(f"../../{self.probe}-dir", 0o755)
        self.assertTrue((self.volume / f"{self.probe}-dir").is_dir())
        self.sftp.rename(f"/../{self.probe}", f"a/../../{self.probe}-moved")
        self.assertEqual((self.volume / f"{self.probe}-moved").read_bytes(), b"one\n")
        self.sftp.chmod(f"../{self.probe}-moved", 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / f"{self.probe}-moved").st_mode), 0o600)
        self.sftp.remove(f"../../{self.probe}-moved")
        self.sftp.rmdir(f"../{self.probe}-dir")
        self.refused(self.write, "../../outside/new.txt")
        self.refused(self.write, "../demo2/other.txt")

    def test_host_paths_are_interpreted_inside_the_volume(self):
        for path in (str(self.volume / "inside.txt"), str(self.secret), "/etc/passwd",
                     str(self.sibling / "other.txt")):
            self.not_found(self.sftp.stat, path)
            self.not_found(self.read, path)
            self.refused(self.write, path)
            self.refused(self.sftp.chmod, path, 0o777)
            self.refused(self.sftp.remove, path)
            self.refused(self.sftp.rename, path, "taken.txt")
        self.not_found(self.sftp.listdir, str(self.outside))
        self.not_found(self.sftp.listdir, str(self.volume))
        self.not_found(self.sftp.listdir, "/etc")
        self.refused(self.sftp.mkdir, str(self.outside / "newdir"), 0o755)
        self.refused(self.sftp.rename, "inside.txt", str(self.outside / "planted.txt"))

    def test_host_path_appears_in_no_error_message(self):
        errors = [
            self.refused(self.sftp.stat, "missing"),
            self.refused(self.read, "missing/file"),
            self.refused(self.sftp.rmdir, "inside.txt"),
            self.refused(self.sftp.remove, "a"),
            self.refused(self.sftp.mkdir, "a", 0o755),
            self.refused(self.sftp.listdir, "inside.txt"),
            self.refused(self.sftp.readlink, "inside.txt"),
            self.refused(self.sftp.open, "a", "w"),
            self.refused(self.sftp.rename, "missing", "elsewhere"),
        ]
        for exc in errors:
            self.assertNotIn(str(self.root), str(exc))
            self.assertNotIn("/tmp", str(exc))


class RaceTests(ConfinementTestCase):
    """A link swapped between a directory inside and targets outside, while the client works."""

    timeout = 120

    def swap_links_until(self, stop):
        targets = ["realdir", str(self.outside), "../../../outside", "/", "realdir"]
        count = 0
        while not stop.is_set():
            spare = self.volume / f".race-{count}"
            os.symlink(targets[count % len(targets)], spare)
            os.replace(spare, self.volume / "race")
            count += 1
        return count

    def test_swapped_link_never_leads_outside(self):
        (self.volume / "realdir").mkdir()
        (self.volume / "realdir" / "secret.txt").write_bytes(b"inside-race\n")
        self.plant("race", "realdir")
        stop = threading.Event()
        swapper = threading.Thread(target=self.swap_links_until, args=(stop,), daemon=True)
        swapper.start()
        self.addCleanup(swapper.join, 10)
        self.addCleanup(stop.set)

        inside_reads = 0
        deadline = time.monotonic() + 4
        i = 0
        while time.monotonic() < deadline:
            i += 1
            ok, data = self.outcome(self.read, "race/secret.txt")
            if ok:
                self.assertEqual(data, b"inside-race\n")
                inside_reads += 1
            ok, listing = self.outcome(self.sftp.listdir, "race")
            if ok:
                self.assertNotIn("subdir", listing)
            ok, attributes = self.outcome(self.sftp.stat, "race/secret.txt")
            if ok:
                self.assertEqual(attributes.st_size, len(b"inside-race\n"))
            self.outcome(self.sftp.chmod, "race/secret.txt", 0o600)
            self.outcome(self.sftp.utime, "race/secret.txt", (2_000_000_000, 2_000_000_000))
            self.outcome(self.write, f"race/new-{i}.txt", b"new\n")
            self.outcome(self.sftp.remove, f"race/new-{i}.txt")
            self.outcome(self.sftp.mkdir, f"race/dir-{i}", 0o755)
            self.outcome(self.sftp.rename, f"race/dir-{i}", f"race/dir-{i}-moved")
        stop.set()
        swapper.join(10)
        self.assertGreater(inside_reads, 0, "the race never let a read through; test is void")


class SpecialFileTests(ConfinementTestCase):
    """FIFOs, sockets and devices planted in the volume are never opened (an open could block)."""

    def plant_special_files(self):
        os.mkfifo(self.volume / "fifo")
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(str(self.volume / "sock"))
        names = ["fifo", "sock"]
        try:
            os.mknod(self.volume / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
            names.append("null")
        except OSError:
            pass  # no CAP_MKNOD here; the FIFO and the socket still count
        return names

    def test_special_files_are_never_opened(self):
        names = self.plant_special_files()
        for name in names:
            for mode in ("r", "w", "a", "r+"):
                self.refused(self.sftp.open, name, mode)
            for link in (f"escape/{name}", f"up3/{name}"):
                self.refused(self.sftp.open, link, "r")
        self.assertTrue(stat.S_ISFIFO(self.sftp.stat("fifo").st_mode))
        self.assertTrue(stat.S_ISSOCK(self.sftp.lstat("sock").st_mode))
        self.assertEqual(sorted(self.sftp.listdir("/")), sorted(os.listdir(self.volume)))
        # The session (and the daemon) did not block on any of it.
        self.assertEqual(self.read("inside.txt"), b"inside\n")
        other = paramiko_sftp(self, self.service, self.creds, timeout=15)
        self.assertEqual(other.normalize("."), "/")

    def test_a_link_to_a_fifo_is_not_opened_either(self):
        os.mkfifo(self.volume / "fifo")
        self.plant("to-fifo", "/fifo")
        self.refused(self.sftp.open, "to-fifo", "r")
        self.refused(self.sftp.open, "to-fifo", "w")
        self.assertEqual(self.read("inside.txt"), b"inside\n")


class ExtensionTests(ConfinementTestCase):
    """
    The OpenSSH extensions that take paths get the same confinement. An extension the service
    does not offer must answer OP_UNSUPPORTED, which counts as a refusal here.
    """

    def setUp(self):
        super().setUp()
        self.raw = RawSFTP(self, self.service, self.creds)
        self.next_id = 100

    def ask(self, name, *paths, extra=b""):
        """(type, Reader) of the reply to extension ``name`` with ``paths``."""
        self.next_id += 1
        self.raw.extended(self.next_id, name, *[string(p) for p in paths], extra)
        reply = self.raw.read_reply(self.next_id)
        self.assertIsNotNone(reply, f"{name}{paths!r} closed the channel")
        return reply

    def refused_ext(self, name, *paths, extra=b""):
        ptype, reader = self.ask(name, *paths, extra=extra)
        self.assertEqual(ptype, FXP_STATUS, f"{name}{paths!r}")
        code = reader.uint32()
        message = reader.string().decode("utf-8", "replace")
        self.assertNotEqual(code, FX_OK, f"{name}{paths!r} succeeded; it must be refused")
        if not any(str(self.root) in p for p in paths):
            self.assertNotIn(str(self.root), message)

    def ok_ext(self, name, *paths):
        ptype, reader = self.ask(name, *paths)
        self.assertEqual(ptype, FXP_STATUS)
        code = reader.uint32()
        return code == FX_OK

    def test_hardlink_never_links_a_file_from_outside(self):
        for old in ("mid/secret.txt", "up3/outside/secret.txt", "../../outside/secret.txt",
                    str(self.secret), "sib/other.txt", "../demo2/other.txt",
                    "escape/../../storage/volumes/x", "mid/subdir"):
            self.refused_ext("hardlink@openssh.com", old, "stolen")
        for new in ("mid/planted", "../../outside/planted", str(self.outside / "planted"),
                    "sib/planted", "up3/outside/planted"):
            self.refused_ext("hardlink@openssh.com", "inside.txt", new)
        self.assertFalse(os.path.lexists(self.volume / "stolen"))
        # A hard link of a planted link itself (link(2) does not follow) stays a link to a path
        # that is not there.
        for link in ("abs", "dangle"):
            if self.ok_ext("hardlink@openssh.com", link, f"{link}-hard"):
                self.assertTrue(os.path.islink(self.volume / f"{link}-hard"))
                self.not_found(self.read, f"{link}-hard")
        if self.ok_ext("hardlink@openssh.com", "../x", "x-hard"):
            self.assertEqual(os.stat(self.volume / "x-hard").st_ino,
                             os.stat(self.volume / "x").st_ino)

    def test_posix_rename_stays_inside(self):
        for old, new in (("mid/secret.txt", "taken"), ("inside.txt", "mid/planted"),
                         ("sib/other.txt", "taken"), ("inside.txt", "../../outside/planted"),
                         ("mid/subdir", "taken-dir"), ("inside.txt", "sib/planted")):
            self.refused_ext("posix-rename@openssh.com", old, new)
        if self.ok_ext("posix-rename@openssh.com", "escape/x", "up3/x-renamed"):
            self.assertEqual((self.volume / "x-renamed").read_bytes(), b"x-inside\n")

    def test_lsetstat_through_host_path_links_is_refused(self):
        for path in ("mid/secret.txt", "mid/subdir", "sib/other.txt", str(self.secret)):
            self.refused_ext("lsetstat@openssh.com", path, extra=attrs(0o777))

    def test_statvfs_through_host_path_links_is_refused(self):
        for path in ("mid/subdir", "sib", str(self.outside)):
            self.refused_ext("statvfs@openssh.com", path)

    def test_expand_path_answers_inside_paths(self):
        for path in ("~", "~/..", "~/../../outside", "~demo/../..", "~root", "~/mid",
                     "~/../demo2", "../..", str(self.outside)):
            ptype, reader = self.ask("expand-path@openssh.com", path)
            if ptype == FXP_NAME:
                self.assertEqual(reader.uint32(), 1)
                answer = reader.string().decode("utf-8", "replace")
                self.assertTrue(answer.startswith("/"), answer)
                self.assertNotIn(str(self.volume), answer)
                self.assertNotIn("storage/volumes", answer)
            else:
                self.assertEqual(ptype, FXP_STATUS)
                self.assertNotEqual(reader.uint32(), FX_OK)
