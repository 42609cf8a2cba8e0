"""
Tests for L{lightd_conch.fs}: lexical normalisation and kernel-enforced
confinement, for both resolvers (openat2 and the O_NOFOLLOW walk).
"""

import errno
import os
import stat
import subprocess
import threading
import time

from twisted.trial.unittest import SkipTest, TestCase

from lightd_conch import fs
from lightd_conch.fs import ConfinedFilesystem, normalize, openat2Available


class NormalizeTests(TestCase):
    def test_forms(self):
        cases = {
            b"": (),
            b".": (),
            b"/": (),
            b"..": (),
            b"../x": (b"x",),
            b"/../../x": (b"x",),
            b"a/../../x": (b"x",),
            b"//..//x": (b"x",),
            b"a/./b/": (b"a", b"b"),
            b"a\\..\\b": (b"a\\..\\b",),
            b"%2e%2e/x": (b"%2e%2e", b"x"),
            b"\xff\xfe/y": (b"\xff\xfe", b"y"),
        }
        for path, expected in cases.items():
            self.assertEqual(normalize(path), expected, path)

    def test_nul(self):
        e = self.assertRaises(OSError, normalize, b"a\0b")
        self.assertEqual(e.errno, errno.ENOENT)


class _ConfinementMixin:
    useOpenat2 = True

    def setUp(self):
        if self.useOpenat2 and not openat2Available():
            raise SkipTest("this kernel has no openat2")
        top = os.path.abspath(self.mktemp())
        self.volume = os.path.join(top, "volumes", "demo")
        self.outside = os.path.join(top, "outside")
        os.makedirs(self.volume)
        os.makedirs(self.outside)
        self.sentinel = os.path.join(self.outside, "secret.txt")
        with open(self.sentinel, "w") as f:
            f.write("top secret")
        os.utime(self.sentinel, (1000000000, 1000000000))
        self.sentinelBefore = self._snapshot()
        self.fs = ConfinedFilesystem(self.volume, useOpenat2=self.useOpenat2)
        self.addCleanup(self.fs.close)

    def _snapshot(self):
        st = os.stat(self.sentinel)
        # O_NOATIME: the check itself must not look like a read.
        fd = os.open(self.sentinel, os.O_RDONLY | os.O_NOATIME)
        try:
            content = os.read(fd, 1024).decode()
        finally:
            os.close(fd)
        return (
            content,
            st.st_mode,
            st.st_mtime,
            st.st_atime,
            sorted(os.listdir(self.outside)),
            sorted(os.listdir(os.path.dirname(self.volume))),
        )

    def tearDown(self):
        self.assertEqual(self._snapshot(), self.sentinelBefore)

    def plant(self, name, target):
        os.symlink(target, os.path.join(self.volume, name))

    def inVolume(self, *parts):
        return os.path.join(self.volume, *parts)

    def assertErrno(self, code, f, *args, **kwargs):
        e = self.assertRaises(OSError, f, *args, **kwargs)
        self.assertEqual(e.errno, code, e)

    def test_rootLink(self):
        """
        A link to "/" leads to the volume root.
        """
        with open(self.inVolume("mine"), "w") as f:
            f.write("x")
        self.plant("escape", "/")
        self.assertEqual(
            self.fs.stat(b"escape/mine").st_ino, os.stat(self.inVolume("mine")).st_ino
        )
        fd = self.fs.openDirectory(b"escape")
        try:
            self.assertIn("mine", os.listdir(fd))
        finally:
            os.close(fd)

    def test_relativeUpLink(self):
        self.plant("up", "../..")
        self.assertEqual(self.fs.stat(b"up").st_ino, os.stat(self.volume).st_ino)
        self.assertErrno(errno.ENOENT, self.fs.stat, b"up/outside/secret.txt")

    def test_absoluteHostLink(self):
        self.plant("abs", self.sentinel)
        self.assertErrno(errno.ENOENT, self.fs.openFile, b"abs", os.O_RDONLY)
        self.assertErrno(errno.ENOENT, self.fs.stat, b"abs")
        self.assertErrno(
            errno.ENOENT, self.fs.openFile, b"abs", os.O_WRONLY | os.O_TRUNC
        )
        self.assertErrno(errno.ENOENT, self.fs.setattrs, b"abs", mode=0o777)
        # lstat and readlink see the link itself, text verbatim.
        self.assertTrue(stat.S_ISLNK(self.fs.lstat(b"abs").st_mode))
        self.assertEqual(self.fs.readlink(b"abs"), os.fsencode(self.sentinel))

    def test_danglingLinkCreate(self):
        """
        Creating through a dangling link to a host path creates beneath the
        volume (chroot semantics) or fails; never outside.
        """
        target = os.path.join(self.outside, "newfile")
        self.plant("dangle", target)
        self.assertErrno(
            errno.ENOENT, self.fs.openFile, b"dangle", os.O_WRONLY | os.O_CREAT
        )
        os.makedirs(self.inVolume(*self.outside.strip("/").split("/")))
        fd = self.fs.openFile(b"dangle", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"in")
        os.close(fd)
        with open(self.inVolume(*target.strip("/").split("/"))) as f:
            self.assertEqual(f.read(), "in")
        self.assertFalse(os.path.exists(target))

    def test_openOrCreateSaysWhetherItCreated(self):
        """
        openOrCreate tells a file it made (through a dangling link too) from
        one that was there.
        """
        write = os.O_WRONLY | os.O_CREAT
        self.plant("dangle", "made")
        for name, created in ((b"new", True), (b"new", False), (b"dangle", True),
                              (b"dangle", False)):
            fd, made = self.fs.openOrCreate(name, write)
            os.close(fd)
            self.assertEqual((name, made), (name, created))
        self.assertTrue(os.path.isfile(self.inVolume("made")))

    def test_exclusiveCreateOnLink(self):
        self.plant("dangle", "/nowhere")
        self.assertErrno(
            errno.EEXIST,
            self.fs.openFile,
            b"dangle",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL,
        )

    def test_intermediateLink(self):
        self.plant("mid", self.outside)
        self.assertErrno(errno.ENOENT, self.fs.stat, b"mid/secret.txt")
        self.assertErrno(errno.ENOENT, self.fs.openFile, b"mid/secret.txt", os.O_RDONLY)
        self.assertErrno(errno.ENOENT, self.fs.remove, b"mid/secret.txt")
        self.assertErrno(errno.ENOENT, self.fs.rename, b"mid/secret.txt", b"stolen")
        self.assertErrno(errno.ENOENT, self.fs.mkdir, b"mid/newdir")
        self.assertErrno(errno.ENOENT, self.fs.openDirectory, b"mid")
        self.assertErrno(
            errno.ENOENT, self.fs.setattrs, b"mid/secret.txt", times=(1, 1)
        )
        self.assertErrno(errno.ENOENT, self.fs.symlink, b"x", b"mid/newlink")

    def test_siblingLink(self):
        sibling = os.path.join(os.path.dirname(self.volume), "demo2")
        os.mkdir(sibling)
        with open(os.path.join(sibling, "theirs"), "w") as f:
            f.write("theirs")
        self.sentinelBefore = self._snapshot()
        self.plant("sib", "../demo2")
        self.assertErrno(errno.ENOENT, self.fs.stat, b"sib/theirs")
        self.plant("sibabs", sibling)
        self.assertErrno(errno.ENOENT, self.fs.stat, b"sibabs/theirs")

    def test_magicLinks(self):
        self.plant("root", "/proc/self/root")
        self.plant("cwd", "/proc/self/cwd")
        self.assertErrno(errno.ENOENT, self.fs.stat, b"root/etc/passwd")
        self.assertErrno(errno.ENOENT, self.fs.stat, b"cwd")

    def test_loop(self):
        self.plant("a", "b")
        self.plant("b", "a")
        self.assertErrno(errno.ELOOP, self.fs.stat, b"a")

    def test_removeAndRenameActOnLinksNotTargets(self):
        self.plant("abs", self.sentinel)
        self.fs.rename(b"abs", b"renamed")
        self.assertTrue(os.path.islink(self.inVolume("renamed")))
        self.fs.remove(b"renamed")
        self.assertFalse(os.path.lexists(self.inVolume("renamed")))

    def test_renameOntoLink(self):
        """
        Renaming onto a link replaces nothing (v3 semantics); replacing
        replaces the link itself, not what it points at.
        """
        with open(self.inVolume("f"), "w") as f:
            f.write("mine")
        self.plant("abs", self.sentinel)
        self.assertErrno(errno.EEXIST, self.fs.rename, b"f", b"abs")
        self.fs.rename(b"f", b"abs", replace=True)
        self.assertFalse(os.path.islink(self.inVolume("abs")))

    def test_renameWithoutNoReplace(self):
        """
        On a file system that refuses RENAME_NOREPLACE (EINVAL), a rename
        still works and still refuses an existing target.
        """
        def refused(*args):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        self.patch(fs, "_renameat2", refused)
        for name in ("a", "b"):
            with open(self.inVolume(name), "w") as f:
                f.write(name)
        self.assertErrno(errno.EEXIST, self.fs.rename, b"a", b"b")
        self.plant("dangling", "nowhere")
        self.assertErrno(errno.EEXIST, self.fs.rename, b"a", b"dangling")
        self.fs.rename(b"a", b"c")
        with open(self.inVolume("c")) as f:
            self.assertEqual(f.read(), "a")
        self.assertFalse(os.path.lexists(self.inVolume("a")))

    def test_symlinkOwnedByTheVolumeOwner(self):
        """
        When the service runs as root, a link it makes belongs to the
        volume's owner (set through an fd on the link itself).
        """
        if os.geteuid() != 0:
            raise SkipTest("giving files away needs root")
        os.chown(self.volume, 4321, 4322)
        volumeFS = ConfinedFilesystem(self.volume, useOpenat2=self.useOpenat2)
        self.addCleanup(volumeFS.close)
        volumeFS.symlink(b"/etc/passwd", b"link")
        st = os.lstat(self.inVolume("link"))
        self.assertEqual((stat.S_ISLNK(st.st_mode), st.st_uid, st.st_gid), (True, 4321, 4322))
        self.assertEqual(os.readlink(self.inVolume("link")), "/etc/passwd")

    def test_whatAppearsAtADanglingLinkIsNeverOpened(self):
        """
        OPEN with O_CREAT of a link leading nowhere creates its target
        exclusively: a FIFO (or a device node) that appears there meanwhile
        is refused by its type, never opened.
        """
        self.plant("d", "fifo")
        found = self.fs._linkTarget

        def appearing(parts):
            os.mkfifo(self.inVolume("fifo"))
            return found(parts)

        self.patch(self.fs, "_linkTarget", appearing)
        # Opened for writing with no reader, a FIFO would say ENXIO.
        self.assertErrno(errno.EINVAL, self.fs.openFile, b"d", os.O_WRONLY | os.O_CREAT)

    def test_createThroughDanglingLinks(self):
        os.makedirs(self.inVolume("sub"))
        self.plant("sub/rel", "../made-rel")
        self.plant("abs", "/sub/made-abs")
        self.plant("chain", "abs2")
        self.plant("abs2", "/made-chain")
        for link, made in (("sub/rel", "made-rel"), ("abs", "sub/made-abs"),
                           ("chain", "made-chain")):
            fd = self.fs.openFile(link.encode(), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x")
            os.close(fd)
            with open(self.inVolume(made)) as f:
                self.assertEqual(f.read(), "x", link)
        self.plant("loop", "loop")
        self.assertErrno(errno.ELOOP, self.fs.openFile, b"loop", os.O_WRONLY | os.O_CREAT)

    def test_createThroughADanglingLinkResolvesItsFolderAsTheKernel(self):
        """
        A ".." in a dangling link's text climbs from where the link before
        it leads, and a missing name before ".." is ENOENT, as the kernel
        has it: no other file is created or truncated.
        """
        os.makedirs(self.inVolume("sub", "deep"))
        self.plant("sym", "sub/deep")
        with open(self.inVolume("y"), "w") as f:
            f.write("precious")
        self.plant("e", "sym/../y")
        self.plant("f", "missing/../y")
        self.plant("g", "nothere/")
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.close(self.fs.openFile(b"e", write))
        self.assertTrue(os.path.isfile(self.inVolume("sub", "y")))
        self.assertErrno(errno.ENOENT, self.fs.openFile, b"f", write)
        self.assertErrno(errno.EISDIR, self.fs.openFile, b"g", write)
        with open(self.inVolume("y")) as f:
            self.assertEqual(f.read(), "precious")

    def test_mountedEntriesAreNeverChanged(self):
        """
        A host folder and a host file bind-mounted in the volume: lsetstat
        and hardlink, which act on a name's entry, refuse both.
        """
        if os.geteuid() != 0:
            raise SkipTest("bind mounts need root")
        for name, source in (("m", self.outside), ("mf", self.sentinel)):
            target = self.inVolume(name)
            if os.path.isdir(source):
                os.mkdir(target)
            else:
                open(target, "w").close()
            subprocess.run(["mount", "--bind", source, target], check=True)
            self.addCleanup(subprocess.run, ["umount", "-l", target], check=True)
        for name in (b"m", b"mf"):
            self.assertErrno(errno.EXDEV, self.fs.lsetattrs, name, None, (1, 2))
        self.assertErrno(errno.EXDEV, self.fs.lsetattrs, b"mf", 0o777, None)
        self.assertErrno(errno.EXDEV, self.fs.hardlink, b"mf", b"copy")

    def test_rootCannotBeNamed(self):
        for f in (self.fs.remove, self.fs.rmdir, self.fs.readlink):
            self.assertErrno(errno.EPERM, f, b"/")
        self.assertErrno(errno.EPERM, self.fs.rename, b"..", b"x")

    def test_lexicalDotDot(self):
        self.assertEqual(self.fs.realpath(b"../../x/.."), b"/")
        self.assertErrno(errno.ENOENT, self.fs.stat, b"../outside/secret.txt")
        self.assertErrno(errno.ENOENT, self.fs.stat, os.fsencode(self.sentinel))

    def test_fifoRefusedWithoutBlocking(self):
        os.mkfifo(self.inVolume("fifo"))
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_CREAT):
            self.assertErrno(errno.EINVAL, self.fs.openFile, b"fifo", flags)

    def test_directoryRefusedAsFile(self):
        os.mkdir(self.inVolume("d"))
        self.assertErrno(errno.EISDIR, self.fs.openFile, b"d", os.O_RDONLY)

    def test_creationModes(self):
        os.close(self.fs.openFile(b"default", os.O_WRONLY | os.O_CREAT))
        os.close(self.fs.openFile(b"asked", os.O_WRONLY | os.O_CREAT, 0o4777))
        self.fs.mkdir(b"d")
        self.fs.mkdir(b"d700", 0o700)
        self.fs.mkdir(b"d777", 0o777)
        modes = {
            name: stat.S_IMODE(os.stat(self.inVolume(name)).st_mode)
            for name in ("default", "asked", "d", "d700", "d777")
        }
        self.assertEqual(
            modes,
            {"default": 0o644, "asked": 0o755, "d": 0o755, "d700": 0o700, "d777": 0o755},
        )

    def test_setattrsExactMode(self):
        os.close(self.fs.openFile(b"f", os.O_WRONLY | os.O_CREAT))
        self.fs.setattrs(b"f", mode=0o4767, times=(5, 7), size=3)
        st = os.stat(self.inVolume("f"))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_atime, st.st_mtime, st.st_size), (0o767, 5, 7, 3))

    def test_symlinkStoredVerbatim(self):
        self.fs.symlink(b"/etc/passwd", b"l")
        self.assertEqual(os.readlink(self.inVolume("l")), "/etc/passwd")
        self.assertErrno(errno.ENOENT, self.fs.openFile, b"l", os.O_RDONLY)

    def test_mountsInsideAreNotCrossed(self):
        """
        A filesystem mounted inside the volume (a procfs propagated from a
        privileged container, say) is never entered.
        """
        if os.geteuid() != 0:
            raise SkipTest("mounting needs root")
        mountpoint = self.inVolume("mnt")
        os.mkdir(mountpoint)
        done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mountpoint], capture_output=True)
        if done.returncode:
            raise SkipTest("cannot mount here: %s" % done.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mountpoint])
        with open(os.path.join(mountpoint, "inner"), "w") as f:
            f.write("x")
        self.plant("via", "/mnt")
        for path in (b"mnt", b"mnt/inner", b"via/inner"):
            self.assertErrno(errno.EXDEV, self.fs.stat, path)
            self.assertErrno(errno.EXDEV, self.fs.openFile, path, os.O_RDONLY)
        self.assertErrno(errno.EXDEV, self.fs.openDirectory, b"mnt")
        self.assertErrno(errno.EXDEV, self.fs.remove, b"mnt/inner")

    def test_swapRace(self):
        """
        A directory swapped with a link to the outside, in a tight loop from
        outside the session, never lets an operation beneath it out.
        """
        os.mkdir(self.inVolume("d"))
        stop = threading.Event()

        def swap():
            d = self.inVolume("d")
            parked = self.inVolume("parked")
            link = self.inVolume("link")
            os.symlink(self.outside, link)
            while not stop.is_set():
                os.rename(d, parked)
                os.rename(link, d)
                os.rename(d, link)
                os.rename(parked, d)

        thread = threading.Thread(target=swap)
        thread.start()
        try:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                for op in (
                    lambda: self.fs.stat(b"d/secret.txt"),
                    lambda: os.close(self.fs.openFile(b"d/secret.txt", os.O_RDONLY)),
                    lambda: os.close(
                        self.fs.openFile(b"d/new", os.O_WRONLY | os.O_CREAT)
                    ),
                    lambda: self.fs.setattrs(b"d/secret.txt", mode=0o777),
                    lambda: self.fs.remove(b"d/secret.txt"),
                    lambda: self.fs.mkdir(b"d/newdir"),
                ):
                    try:
                        op()
                    except OSError:
                        pass
        finally:
            stop.set()
            thread.join()


class Openat2ConfinementTests(_ConfinementMixin, TestCase):
    useOpenat2 = True


class WalkConfinementTests(_ConfinementMixin, TestCase):
    useOpenat2 = False
