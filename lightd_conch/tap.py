"""
C{twistd lightd-sftp}: the command-line options and the service tree.

One L{MultiService} holds the audit log, the credential store's lifecycle,
the watcher that ends sessions whose credentials changed, the thread pools,
the SSH listener, the shutdown drain, the reactor lag monitor and the admin
API listener.  Blocking resources (LMDB, threads) are opened in
C{startService}, after twistd has forked, never at import or in makeService.
Its children stop one after the other, in reverse order, each waiting for
the one before: the listeners first, then the sessions drain (up to
C{sftp.shutdown_grace}), and the audit log last.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

from twisted.application.service import MultiService, Service
from twisted.conch.ssh import keys
from twisted.cred.portal import Portal
from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from . import config as _config
from .accounts import Accounts
from .audit import AuditFile, AuditLog, AuditService, NullAudit
from .api import (
    AdminAPI,
    TokenError,
    configureToken,
    makeSite,
    warnAuthorizationDisabled,
)
from .containers import MemoryContainerStates
from .checkqueue import FairCheckQueue, bcryptThreads, usableCores
from .cred import ContainerRealm, PasswordChecker, PublicKeyChecker
from .quota import QuotaMeasurer
from .metrics import Metrics, ReactorLagMonitor
from .sessions import CredentialWatcher, SessionRegistry, drain
from .ssh import SSHFactory, loadOrCreateHostKey
from .totp import SecretBox, TOTPVerifier
from .store import LMDBCredentialStore

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = "Serve each container's volume over SFTP, confined to the volume."
    optParameters = [
        ["config", "c", "config.json", "Path to config.json (default: ./config.json)."],
    ]


class _LazyStore:
    """
    The credential store, opened when the service starts.

    The checker holds this from makeService on; the LMDB environment itself is
    only opened in the running process.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._store = None

    def open(self) -> None:
        self._store = LMDBCredentialStore(self._path)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __getattr__(self, name):
        if self._store is None:
            raise RuntimeError("credential store is not open")
        return getattr(self._store, name)


class _SequentialMultiService(MultiService):
    """
    A L{MultiService} whose children stop in reverse order, each once the
    one after it has finished stopping: connections drain before the store
    closes, and the audit log is written after the last logout.
    """

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for child in reversed(list(self)):

            def stop(ignored, child=child):
                return child.stopService()

            d.addCallback(stop)
            d.addErrback(lambda failure: log.failure("cannot stop a service", failure))
        return d


class _Drain(Service):
    """
    At stop, lets the SSH connections' transfers in flight finish for up to
    C{grace} seconds, then ends them (L{lightd_conch.sessions.drain}).
    """

    def __init__(self, factory, clock, grace: float) -> None:
        self._factory = factory
        self._clock = clock
        self._grace = grace

    def stopService(self):
        super().stopService()
        connections = self._factory.connections
        if connections:
            log.info(
                "shutting down: {count} SSH connections open, waiting up to {grace} s"
                " for transfers in flight",
                count=len(connections),
                grace=self._grace,
            )
        return drain(connections, self._clock, self._grace)


class _ReopenOnHangup(Service):
    """
    SIGHUP makes the audit log reopen its file (logrotate renamed it).
    """

    def __init__(self, audit, reactor) -> None:
        self._audit = audit
        self._reactor = reactor
        self._previous = None

    def startService(self) -> None:
        super().startService()

        def hangup(signum, frame):
            self._reactor.callFromThread(self._reopen)

        self._previous = signal.signal(signal.SIGHUP, hangup)

    def _reopen(self) -> None:
        log.info("SIGHUP: reopening the audit log")
        self._audit.reopen()
        self._audit.flush()

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()


def _checkAuditLog(cfg) -> None:
    """
    The audit log can be opened (and is created), or the start stops.
    """
    path = cfg.sftp.audit_log
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise _config.ConfigError(
            cfg.path, "sftp.audit_log", f"cannot open {path}: {e.strerror}"
        ) from None


class _StoreService(Service):
    def __init__(self, store: _LazyStore) -> None:
        self._store = store

    def startService(self) -> None:
        self._store.open()
        super().startService()

    def stopService(self):
        super().stopService()
        self._store.close()


class _ThreadPoolService(Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self):
        super().stopService()
        self.pool.stop()


class _Listener(Service):
    """
    Listens on a TCP address and logs the port actually bound (port 0 asks
    for any free one).

    @param listening: if given, called with the bound address once
        listening.
    """

    def __init__(
        self, reactor, label: str, host: str, port: int, factory, listening=None
    ) -> None:
        self._reactor = reactor
        self._label = label
        self._host = host
        self._port = port
        self._factory = factory
        self._listening = listening
        self.listeningPort = None

    def boundPort(self) -> int:
        """
        The port listened on, once bound; before, the one configured.
        """
        if self.listeningPort is None:
            return self._port
        return self.listeningPort.getHost().port

    def privilegedStartService(self) -> None:
        self.listeningPort = self._reactor.listenTCP(
            self._port, self._factory, interface=self._host
        )
        super().privilegedStartService()

    def startService(self) -> None:
        if self.listeningPort is None:
            self.privilegedStartService()
        address = self.listeningPort.getHost()
        log.info(
            "{label} listening on {host} port {port}",
            label=self._label,
            host=address.host,
            port=address.port,
        )
        if self._listening is not None:
            self._listening(address)
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.listeningPort = self.listeningPort, None
        if port is not None:
            return port.stopListening()


def _hostKey(cfg) -> keys.Key:
    try:
        return loadOrCreateHostKey(cfg.sftp.host_key)
    except keys.BadKeyError as e:
        raise _config.ConfigError(cfg.path, "sftp.host_key", str(e)) from None


def _makeFolders(cfg) -> None:
    for key, folder in (
        ("storage.base_path", cfg.storage.base_path),
        ("storage.volumes_path", cfg.storage.volumes_path),
    ):
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except OSError as e:
            raise _config.ConfigError(
                cfg.path, key, f"cannot create the folder {folder}: {e.strerror}"
            ) from None


_NR_OPEN = 1048576  # Linux's default fs.nr_open


def raiseOpenFileLimit(resourceModule=resource) -> None:
    """
    Take the soft limit on open files up to the hard one.  Every handle,
    session and connection is a descriptor, and systemd's soft default of
    1,024 is one container's busy sessions away from refusing every other
    container's; the hard limit (524,288 under systemd) is what an operator
    allows.
    """
    soft, hard = resourceModule.getrlimit(resourceModule.RLIMIT_NOFILE)
    if soft == hard:
        return
    # "Unlimited" is refused for open files: the kernel's ceiling stands in.
    target = _NR_OPEN if hard == resourceModule.RLIM_INFINITY else hard
    if soft != resourceModule.RLIM_INFINITY and soft >= target:
        return
    try:
        resourceModule.setrlimit(resourceModule.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit from {soft}: {error}", soft=soft, error=e)


def warnIfFewOpenFiles(perContainer: int, resourceModule=resource) -> None:
    """
    Say so when the open files limit leaves room for only a few containers
    at C{sftp.max_handles_per_container} each: then one container's
    sessions could still take every descriptor.
    """
    soft = resourceModule.getrlimit(resourceModule.RLIMIT_NOFILE)[0]
    if soft != resourceModule.RLIM_INFINITY and soft < 4 * perContainer:
        log.warn(
            "the open files limit ({limit}) is below 4 x sftp.max_handles_per_container"
            " ({handles}): one container's sessions could use up the service's open files;"
            " raise the limit (systemd: LimitNOFILE) or lower the setting",
            limit=soft,
            handles=perContainer,
        )


def makeService(options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        cfg = _config.load(os.path.abspath(options["config"]))
        # A host key already there must be usable before anything is written;
        # a missing one is made once the folders and the token are.
        hostKey = None
        if cfg.sftp.enabled and os.path.lexists(cfg.sftp.host_key):
            hostKey = _hostKey(cfg)
        _makeFolders(cfg)
        token = configureToken(cfg)
        if cfg.sftp.enabled and hostKey is None:
            hostKey = _hostKey(cfg)
        if cfg.sftp.audit_log:
            _checkAuditLog(cfg)
    except (_config.ConfigError, TokenError) as e:
        # Stop before anything is bound, with one clear line.
        sys.stderr.write(f"lightd-sftp: {e}\n")
        raise SystemExit(1)
    raiseOpenFileLimit()
    if cfg.sftp.enabled:
        warnIfFewOpenFiles(cfg.sftp.max_handles_per_container)

    # Children stop in reverse order: the listeners and thread pools before
    # the watcher, the watcher before the store closes.
    top = _SequentialMultiService()
    audit = NullAudit()
    if cfg.sftp.audit_log:
        # One thread: one write at a time, in order, off the reactor.
        auditPool = ThreadPool(minthreads=1, maxthreads=1, name="lightd-sftp-audit")
        _ThreadPoolService(auditPool).setServiceParent(top)
        audit = AuditLog(
            AuditFile(cfg.sftp.audit_log, cfg.sftp.audit_log_max_bytes, cfg.sftp.audit_log_keep),
            reactor,
            run=lambda f, *args: deferToThreadPool(reactor, auditPool, f, *args),
        )
        AuditService(audit, reactor).setServiceParent(top)
        _ReopenOnHangup(audit, reactor).setServiceParent(top)
    metrics = Metrics()
    ReactorLagMonitor(metrics, reactor).setServiceParent(top)
    store = _LazyStore(cfg.credentials_path)
    _StoreService(store).setServiceParent(top)
    sessions = SessionRegistry()
    states = MemoryContainerStates(reactor)
    metrics.quotaUsed = states.quotaUsed
    quotas = QuotaMeasurer(
        lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args), reactor
    )
    watcher = CredentialWatcher(
        store, sessions, reactor, states=states, quotas=quotas, volumePath=cfg.volume_path
    )
    watcher.setServiceParent(top)

    sftpPort = None
    if cfg.sftp.enabled:
        # bcrypt holds the GIL only briefly: one check thread per core this
        # process may use (shared out among the worker processes) lets logins
        # grow with the cores.  The queue hands them one check per thread at
        # a time, fairly among source addresses, and bounds those waiting.
        threads = bcryptThreads(usableCores(), getattr(cfg.sftp, "workers", 1))
        pool = ThreadPool(minthreads=1, maxthreads=threads, name="lightd-sftp-bcrypt")
        _ThreadPoolService(pool).setServiceParent(top)
        checks = FairCheckQueue(reactor, pool, threads)
        realm = ContainerRealm(cfg, states=states, quotas=quotas, clock=reactor)
        portal = Portal(
            realm,
            [
                PublicKeyChecker(store, checks),
                PasswordChecker(store, checks, cfg.sftp.bcrypt_cost),
            ],
        )
        factory = SSHFactory(portal, hostKey, cfg.sftp, reactor)
        factory.sessions = sessions
        factory.totp = TOTPVerifier(store, SecretBox(cfg.totp_key_path), checks)
        factory.checks = checks
        factory.audit = audit
        factory.metrics = metrics
        # Stopped after the listener: no new connection while they drain.
        _Drain(factory, reactor, cfg.sftp.shutdown_grace).setServiceParent(top)
        listener = _Listener(reactor, "SFTP", cfg.sftp.host, cfg.sftp.port, factory)
        listener.setServiceParent(top)
        # With sftp.port 0 only the listener knows the port clients dial.
        sftpPort = listener.boundPort

    # The API's own thread, for bcrypt and LMDB writes: a burst of API calls
    # queues here instead of delaying logins or stalling the reactor.
    apiPool = ThreadPool(minthreads=1, maxthreads=1, name="lightd-sftp-api")
    _ThreadPoolService(apiPool).setServiceParent(top)
    api = AdminAPI(
        Accounts(cfg, store, totpBox=SecretBox(cfg.totp_key_path)),
        token,
        run=lambda f, *args: deferToThreadPool(reactor, apiPool, f, *args),
        changed=lambda containerId: watcher.check([containerId]),
        sftpPort=sftpPort,
        sessions=sessions if cfg.sftp.enabled else None,
        endSession=lambda sessionId: sessions.end(sessionId, reactor),
        metrics=metrics,
        audit=audit,
    )
    _Listener(
        reactor,
        "API",
        cfg.server.host,
        cfg.server.port,
        makeSite(api),
        # Said once bound, so that it names the port really open.
        listening=(
            (lambda address: warnAuthorizationDisabled(cfg.server.host, address.port))
            if token is None
            else None
        ),
    ).setServiceParent(top)
    return top
