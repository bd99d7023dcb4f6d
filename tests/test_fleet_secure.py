"""EtcdStore over TLS and with etcd's authentication, against real etcd clusters
(tests/etcd_cluster.py, one member each): https verified with the fleet's ca_file,
mutual TLS (etcd's --client-cert-auth), and etcd users, whose tokens the store renews
when etcd drops them (expired, restart, password change).

The certificates are made for the test run with the openssl CLI: a CA, etcd's
certificate for 127.0.0.1 and a client certificate, all signed by that CA. Every wait
is a poll with a bound.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
from aiohttp import web

from tests.etcd_cluster import TLS, EtcdCluster
from zdproxy.config.fleet import FleetSettings
from zdproxy.fleet.etcd import EtcdStore
from zdproxy.fleet.gateway import GRPC_PERMISSION_DENIED, AuthFailed, RequestFailed
from zdproxy.fleet.store import ABSENT, Change, StoreUnavailable

SHORT = 1.5  # seconds: the timeout of a call meant to fail (a busy machine's handshake fits)
WITHIN = 10.0  # seconds for what the test waits for (a watch's change, a restart)
USER, PASSWORD, ROOT_PASSWORD = "member", "member-secret", "root-secret"
PREFIX = "/fleet/"  # where USER may read and write


class Certificates(NamedTuple):
    ca: Path
    server: TLS  # etcd's, also good as a client certificate (the cluster's health checks)
    client_cert: Path
    client_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def _signed(directory: Path, name: str, extensions: str) -> tuple[Path, Path]:
    """A P-256 key and a certificate for it that the test CA signed."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(directory, "req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt",
             "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
             "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("pki")
    _openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", "/CN=zdproxy test CA", "-keyout", "ca.key", "-out", "ca.crt",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    server = _signed(
        directory, "etcd", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    client = _signed(directory, "zdproxy", "extendedKeyUsage=clientAuth\n")
    ca = directory / "ca.crt"
    return Certificates(ca, TLS(*server, ca), *client)


@pytest.fixture
def https_node(tmp_path: Path, certificates: Certificates) -> Iterator[EtcdCluster]:
    """One etcd member on https, any client welcome."""
    with EtcdCluster(tmp_path, size=1, tls=certificates.server) as cluster:
        yield cluster


@pytest.fixture
def mtls_node(tmp_path: Path, certificates: Certificates) -> Iterator[EtcdCluster]:
    """One etcd member on https that takes only clients with a certificate its CA signed."""
    flags = ("--client-cert-auth", f"--trusted-ca-file={certificates.ca}")
    with EtcdCluster(tmp_path, size=1, tls=certificates.server, flags=flags) as cluster:
        yield cluster


def etcdctl(url: str, *args: str, user: str = "", stdin: str = "") -> None:
    """etcd's own client: the test's administration, not the client under test."""
    command = ["etcdctl", f"--endpoints={url}", *([f"--user={user}"] if user else []), *args]
    subprocess.run(command, input=stdin.encode(), check=True, capture_output=True, timeout=10)


@pytest.fixture
def auth_node(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member (http) with auth on: root, and USER with read and write on PREFIX.
    Tokens expire after 1 s idle (--auth-token-ttl), so a test can outwait one."""
    with EtcdCluster(tmp_path, size=1, flags=("--auth-token-ttl=1",)) as cluster:
        url = cluster.client_urls[0]
        etcdctl(url, "user", "add", f"root:{ROOT_PASSWORD}")
        etcdctl(url, "user", "grant-role", "root", "root")
        etcdctl(url, "role", "add", "fleet")
        etcdctl(url, "role", "grant-permission", "fleet", "--prefix=true", "readwrite", PREFIX)
        etcdctl(url, "user", "add", f"{USER}:{PASSWORD}")
        etcdctl(url, "user", "grant-role", USER, "fleet")
        etcdctl(url, "auth", "enable")
        yield cluster


def settings(cluster: EtcdCluster, tmp_path: Path, **fields: object) -> FleetSettings:
    """The `[fleet]` section for `cluster`; `password` is written to a password_file."""
    if "password" in fields:
        password_file = tmp_path / "etcd-password"
        password_file.write_text(f"{fields.pop('password')}\n")
        fields["password_file"] = str(password_file)
    return FleetSettings.model_validate({"endpoints": cluster.client_urls, **fields})


@asynccontextmanager
async def opened(fleet: FleetSettings) -> AsyncIterator[EtcdStore]:
    store = EtcdStore.from_settings(fleet)
    try:
        yield store
    finally:
        await store.close()


async def until(condition: Callable[[], Awaitable[bool]], within: float = WITHIN) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within} s"
        await asyncio.sleep(0.05)


class Watch:
    """A watch run by a task: the changes it saw so far."""

    def __init__(self, store: EtcdStore, prefix: str, revision: int) -> None:
        self.changes: list[Change] = []
        self.task = asyncio.create_task(self._collect(store, prefix, revision))

    async def _collect(self, store: EtcdStore, prefix: str, revision: int) -> None:
        async with aclosing(store.watch(prefix, revision)) as changes:
            async for change in changes:
                self.changes.append(change)

    def saw(self, count: int) -> Callable[[], Awaitable[bool]]:
        async def condition() -> bool:
            if self.task.done():
                self.task.result()  # raises what ended the watch
            return len(self.changes) >= count

        return condition


@asynccontextmanager
async def watching(store: EtcdStore, prefix: str, revision: int) -> AsyncIterator[Watch]:
    watch = Watch(store, prefix, revision)
    try:
        yield watch
    finally:
        watch.task.cancel()
        await asyncio.gather(watch.task, return_exceptions=True)


async def exercise(store: EtcdStore, prefix: str = PREFIX) -> None:
    """Every kind of call: a write and a read, a watch, a lease with a key, its revoke."""
    key = f"{prefix}split"
    first = await store.put_if(key, b"10", ABSENT)
    assert first is not None
    assert await store.get(key) == (b"10", first)
    async with watching(store, prefix, first) as watch:
        second = await store.put_if(key, b"20", first)
        await until(watch.saw(2))
    assert watch.changes == [Change(key, b"10", first), Change(key, b"20", second)]

    lease = await store.lease(2)
    member = f"{prefix}members/a"
    assert await store.put_if(member, b"up", ABSENT, lease=lease) is not None
    assert [e.lease for e in (await store.range(member)).entries] == [lease.id]
    await store.revoke(lease)
    assert await store.get(member) == (None, ABSENT)


# -- TLS ---------------------------------------------------------------------------------


async def test_https_endpoints_are_verified_with_the_ca_file(
    https_node: EtcdCluster, certificates: Certificates, tmp_path: Path
) -> None:
    assert https_node.client_urls[0].startswith("https://127.0.0.1:")
    async with opened(settings(https_node, tmp_path, ca_file=str(certificates.ca))) as store:
        await exercise(store)


async def test_an_untrusted_etcd_certificate_is_refused_with_the_reason(
    https_node: EtcdCluster, tmp_path: Path
) -> None:
    # No ca_file: the system's CAs, which never signed the test CA's certificates.
    async with opened(settings(https_node, tmp_path, timeout=SHORT)) as store:
        with pytest.raises(StoreUnavailable) as refused:
            await store.get(f"{PREFIX}split")
    assert "etcd's certificate is not trusted: unable to get local issuer" in refused.value.reason


async def test_mutual_tls_takes_a_client_certificate_and_refuses_its_lack(
    mtls_node: EtcdCluster, certificates: Certificates, tmp_path: Path
) -> None:
    ca = str(certificates.ca)
    async with opened(settings(mtls_node, tmp_path, ca_file=ca, timeout=SHORT)) as store:
        with pytest.raises(StoreUnavailable) as refused:
            await store.put_if(f"{PREFIX}split", b"10", ABSENT)
    assert "etcd refused this client's certificate, or its lack of one" in refused.value.reason

    with_certificate = settings(
        mtls_node,
        tmp_path,
        ca_file=ca,
        cert_file=str(certificates.client_cert),
        key_file=str(certificates.client_key),
    )
    async with opened(with_certificate) as store:
        await exercise(store)


def test_an_unusable_tls_file_is_named(certificates: Certificates, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    https = {"endpoints": ["https://127.0.0.1:2379"]}
    with pytest.raises(ValueError, match=r"ca_file: .*not a usable CA bundle"):
        EtcdStore.from_settings(FleetSettings.model_validate({**https, "ca_file": str(not_pem)}))
    mismatched = {"cert_file": str(certificates.client_cert), "key_file": str(not_pem)}
    with pytest.raises(ValueError, match="cert_file: not a usable certificate and key"):
        EtcdStore.from_settings(FleetSettings.model_validate({**https, **mismatched}))


# -- Authentication ----------------------------------------------------------------------


async def test_a_user_with_the_right_password_reads_writes_watches_and_leases(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    async with opened(settings(auth_node, tmp_path, username=USER, password=PASSWORD)) as store:
        await exercise(store)


async def test_a_wrong_password_fails_at_once_naming_the_user(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    async with opened(settings(auth_node, tmp_path, username=USER, password="wrong")) as store:
        with pytest.raises(AuthFailed) as failed:
            await store.get(f"{PREFIX}split")
    assert str(failed.value) == (
        "etcd user 'member': etcdserver: authentication failed, invalid user ID or password"
        " (gRPC code 3)"
    )


async def test_no_user_on_an_etcd_with_auth_on_is_told_so(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    async with opened(settings(auth_node, tmp_path)) as store:
        with pytest.raises(AuthFailed, match="etcd has authentication on, and no username"):
            await store.get(f"{PREFIX}split")


async def test_outside_its_permissions_a_user_is_refused_writes_and_watches(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    async with opened(settings(auth_node, tmp_path, username=USER, password=PASSWORD)) as store:
        with pytest.raises(RequestFailed) as write:
            await store.put_if("/elsewhere/split", b"10", ABSENT)
        assert write.value.code == GRPC_PERMISSION_DENIED
        # A watch etcd refuses raises, instead of being made again and again.
        with pytest.raises(RequestFailed) as watch:
            async with asyncio.timeout(WITHIN), aclosing(store.watch("/elsewhere/", 1)) as changes:
                await anext(changes)
    assert str(watch.value) == "etcd user 'member': etcdserver: permission denied (gRPC code 7)"


async def test_a_token_invalidated_by_a_password_change_is_renewed(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    url = auth_node.client_urls[0]
    async with opened(settings(auth_node, tmp_path, username=USER, password=PASSWORD)) as store:
        first = await store.put_if(f"{PREFIX}split", b"10", ABSENT)
        # The same password again: etcd drops the user's tokens all the same.
        etcdctl(url, "user", "passwd", USER, "--interactive=false",
                user=f"root:{ROOT_PASSWORD}", stdin=f"{PASSWORD}\n")  # fmt: skip
        # Many calls at once meet the dropped token: each is repeated with a new one.
        reads = await asyncio.gather(*(store.get(f"{PREFIX}split") for _ in range(10)))
        assert set(reads) == {(b"10", first)}
        assert await store.put_if(f"{PREFIX}split", b"20", first) is not None


async def dropped_since_now(url: str) -> None:
    """Returns once etcd has dropped every token last used before this call. A token is
    dropped a little after --auth-token-ttl without use, and probing one that is still
    valid counts as a use: so witnesses, tokens asked for now, are probed once each, in
    turn, until etcd refuses one; the tokens used before them are gone by then."""
    authenticate = {"name": USER, "password": PASSWORD}
    range_request = {"key": base64.b64encode(PREFIX.encode()).decode()}
    async with aiohttp.ClientSession() as http:
        witnesses = []
        for _ in range(16):
            async with http.post(f"{url}/v3/auth/authenticate", json=authenticate) as answer:
                witnesses.append((await answer.json())["token"])
        for witness in witnesses:
            await asyncio.sleep(0.25)
            probe = {"Authorization": witness}
            async with http.post(f"{url}/v3/kv/range", json=range_request, headers=probe) as answer:
                if answer.status == 401:  # etcdserver: invalid auth token
                    return
    raise AssertionError("etcd kept a token past 4 s with --auth-token-ttl=1")


async def test_an_expired_token_is_renewed(auth_node: EtcdCluster, tmp_path: Path) -> None:
    async with opened(settings(auth_node, tmp_path, username=USER, password=PASSWORD)) as store:
        first = await store.put_if(f"{PREFIX}split", b"10", ABSENT)
        await dropped_since_now(auth_node.client_urls[0])
        assert await store.get(f"{PREFIX}split") == (b"10", first)


async def test_a_watch_reconnects_with_a_new_token_after_etcd_restarts(
    auth_node: EtcdCluster, tmp_path: Path
) -> None:
    url, root = auth_node.client_urls[0], f"root:{ROOT_PASSWORD}"
    async with opened(settings(auth_node, tmp_path, username=USER, password=PASSWORD)) as store:
        first = await store.put_if(f"{PREFIX}split", b"10", ABSENT)
        assert first is not None
        async with watching(store, PREFIX, first) as watch:
            await until(watch.saw(1))
            # etcd keeps its tokens in memory: after a restart it knows none. The store
            # makes no call meanwhile, so the watch's own reconnection meets the refusal.
            auth_node.stop(0)
            auth_node.start_member(0)

            async def written() -> bool:
                try:  # in a thread: the watch runs meanwhile
                    await asyncio.to_thread(etcdctl, url, "put", f"{PREFIX}split", "20", user=root)
                except subprocess.CalledProcessError:
                    return False
                return True

            await until(written)
            await until(watch.saw(2))
        assert (watch.changes[1].key, watch.changes[1].value) == (f"{PREFIX}split", b"20")


class TokenIssuer:
    """A stand-in for etcd's gateway that counts authentications: it answers a range
    only with the token it issued last, as etcd refuses one it dropped."""

    def __init__(self) -> None:
        self.issued = 0
        self.valid = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v3/auth/authenticate", self.authenticate)
        app.router.add_post("/v3/kv/range", self.range)
        return app

    async def authenticate(self, request: web.Request) -> web.Response:
        self.issued += 1
        self.valid = f"token-{self.issued}"
        return web.json_response({"header": {"revision": "1"}, "token": self.valid})

    async def range(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.valid:  # the token as is
            refused = "etcdserver: invalid auth token"
            return web.json_response({"error": refused, "message": refused, "code": 16}, status=401)
        return web.json_response({"header": {"revision": "1"}})


async def test_calls_refused_together_share_one_new_token() -> None:
    issuer = TokenIssuer()
    runner = web.AppRunner(issuer.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    (host, port) = runner.addresses[0][:2]
    store = EtcdStore([f"http://{host}:{port}"], username=USER, password=PASSWORD)
    try:
        await store.get("/fleet/split")
        assert issuer.issued == 1
        issuer.valid = "dropped"  # as etcd after a restart: every token refused
        await asyncio.gather(*(store.get("/fleet/split") for _ in range(10)))
        assert issuer.issued == 2
    finally:
        await store.close()
        await runner.cleanup()
