"""Security and bad input against a real daemon: tokens and roles, TLS and mTLS, limits, fuzzed input."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.security import Tokens
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import governor_cli, openssl
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

TOKENS = {
    "trainer": "trainer-token-0123456789",
    "viewer": "viewer-token-0123456789",
    "controller": "ctl-token-0123456789ab",
}


def write_tokens(path: Path) -> Path:
    path.write_text("# name role token\n" + "".join(f"{role}-bot {role} {token}\n" for role, token in TOKENS.items()))
    return path


def meta(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[role]}"),)


def journal(data_dir: Path, kind: str) -> list[dict[str, object]]:
    return [
        item.entry.payload
        for p in list_segments(data_dir)
        for item in read_segment(p)
        if isinstance(item, LocatedEntry) and item.entry.kind == kind
    ]


@pytest.fixture
def secured(tmp_path: Path):  # type: ignore[no-untyped-def]
    tokens = Tokens.load(write_tokens(tmp_path / "tokens"))
    with InProcessDaemon(tmp_path / "data", tokens=tokens) as daemon:
        yield daemon


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_missing_or_wrong_token_is_unauthenticated(secured: InProcessDaemon, tmp_path: Path) -> None:
    """No token or an unknown token: UNAUTHENTICATED, journaled once per window; health needs none."""
    channel = grpc.insecure_channel(secured.address)
    control = cgrpc.ControlServiceStub(channel)
    request = cpb.ListRunsRequest()
    assert code_of(lambda: control.ListRuns(request)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        code_of(lambda: control.ListRuns(request, metadata=(("authorization", "Bearer nope"),)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    client = AttachClient(secured.address, "r1")
    with pytest.raises(grpc.RpcError) as info:
        client.connect()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.close()
    channel.close()
    secured.stop()
    failures = journal(tmp_path / "data", "auth_failure")
    assert [f["reason"] for f in failures] == ["missing bearer token"], "one entry per host and code per window"


def test_roles(secured: InProcessDaemon, tmp_path: Path) -> None:
    """viewer cannot Halt; trainer cannot UpdatePolicy; controller can, and its name is journaled."""
    client = AttachClient(secured.address, "r1", metadata=meta("trainer"))
    client.connect()
    channel = grpc.insecure_channel(secured.address)
    control = cgrpc.ControlServiceStub(channel)
    assert control.ListRuns(cpb.ListRunsRequest(), metadata=meta("viewer")).runs[0].run_id == "r1"
    halt = cpb.HaltRequest(run_id="r1", reason="x")
    assert code_of(lambda: control.Halt(halt, metadata=meta("viewer"))) == grpc.StatusCode.PERMISSION_DENIED
    update = cpb.UpdatePolicyRequest(run_id="r1", changes=common_pb2.Policy(sensitivity=4.0))
    assert code_of(lambda: control.UpdatePolicy(update, metadata=meta("trainer"))) == grpc.StatusCode.PERMISSION_DENIED
    assert (
        code_of(lambda: control.ListRuns(cpb.ListRunsRequest(), metadata=meta("trainer")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    control.Halt(halt, metadata=meta("controller"))
    viewer_attach = AttachClient(secured.address, "r2", metadata=meta("viewer"))
    with pytest.raises(grpc.RpcError) as info:
        viewer_attach.connect()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    client.close()
    viewer_attach.close()
    channel.close()
    secured.stop()
    (request,) = journal(tmp_path / "data", "controller_request")
    assert request["caller"] == "controller-bot"
    assert journal(tmp_path / "data", "attach")[0]["caller"] == "trainer-bot"
    assert {f["code"] for f in journal(tmp_path / "data", "auth_failure")} == {"PERMISSION_DENIED"}


def test_cli_uses_token(secured: InProcessDaemon) -> None:
    """The CLI sends --token / GOVERNOR_TOKEN; without it the call fails with exit 2."""
    assert governor_cli(["runs", "--address", secured.address]).returncode == 2
    ok = governor_cli(["runs", "--address", secured.address], env={"GOVERNOR_TOKEN": TOKENS["viewer"]})
    assert ok.returncode == 0, ok.stderr


def test_bad_tokens_file_exits_2(tmp_path: Path) -> None:
    """A malformed tokens file names the line and stops start-up with exit 2."""
    bad = tmp_path / "tokens"
    bad.write_text("ops controller short\n")
    result = governor_cli(["serve", "--tokens-file", str(bad), "--data-dir", str(tmp_path / "d")])
    assert result.returncode == 2
    assert "tokens:1: token of 'ops' is shorter than 16 characters" in result.stderr


def test_non_loopback_without_tokens_exits_2(tmp_path: Path) -> None:
    """Listening beyond loopback without tokens or mTLS is refused unless --insecure."""
    result = governor_cli(["serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "d")])
    assert result.returncode == 2
    assert "--insecure" in result.stderr


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with CN ops-bot, via openssl."""

    def run(*args: str) -> None:
        openssl(folder, *args)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    issue_certificate(folder, "server", "localhost", days=2, alt_names="IP:127.0.0.1,DNS:localhost")
    issue_certificate(folder, "client", "ops-bot", days=2)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_and_mtls(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """TLS serves over an encrypted channel; with mTLS the client certificate's CN is the journaled identity.
    The server certificate expires in 2 days: start-up says so (review: an expiring certificate went unsaid)."""
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    certs = make_certs(certs_dir)
    ca = certs["ca.pem"].read_bytes()
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("ops-bot controller unused-token-0123456789\n")
    tokens = Tokens.load(tokens_file)
    with InProcessDaemon(
        tmp_path / "tls", tls_cert=certs["server.pem"].read_bytes(), tls_key=certs["server.key"].read_bytes()
    ) as daemon:
        channel = grpc.secure_channel(daemon.address, grpc.ssl_channel_credentials(root_certificates=ca))
        assert cgrpc.ControlServiceStub(channel).ListRuns(cpb.ListRunsRequest()).runs == []
        channel.close()
    out = capfd.readouterr().out
    assert "server certificate" in out
    assert "in 1 day; renew it" in out
    with InProcessDaemon(
        tmp_path / "mtls",
        tls_cert=certs["server.pem"].read_bytes(),
        tls_key=certs["server.key"].read_bytes(),
        tls_client_ca=ca,
        tokens=tokens,
    ) as daemon:
        anonymous = grpc.secure_channel(daemon.address, grpc.ssl_channel_credentials(root_certificates=ca))
        with pytest.raises(grpc.RpcError):
            cgrpc.ControlServiceStub(anonymous).ListRuns(cpb.ListRunsRequest(), timeout=5)
        anonymous.close()
        creds = grpc.ssl_channel_credentials(ca, certs["client.key"].read_bytes(), certs["client.pem"].read_bytes())
        channel = grpc.secure_channel(daemon.address, creds)
        control = cgrpc.ControlServiceStub(channel)
        assert control.ListRuns(cpb.ListRunsRequest()).runs == []
        assert code_of(lambda: control.Halt(cpb.HaltRequest(run_id="nope", reason="x"))) == grpc.StatusCode.NOT_FOUND
        channel.close()
        tls_args = ["--address", daemon.address, "--tls-ca", str(certs["ca.pem"])]
        refused = governor_cli(["runs", *tls_args])
        assert refused.returncode != 0, "no client certificate: refused"
        listed = governor_cli(
            ["runs", *tls_args, "--tls-cert", str(certs["client.pem"]), "--tls-key", str(certs["client.key"])]
        )
        assert listed.returncode == 0, listed.stderr
        # `governor health` opens its channel as the others do (tolaria.channel): over mTLS it is SERVING.
        healthy = governor_cli(
            ["health", *tls_args, "--tls-cert", str(certs["client.pem"]), "--tls-key", str(certs["client.key"])]
        )
        assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING"), healthy.stderr
        from tolaria_trainer.client import ClientOptions, GovernorConnection

        # The trainer's connection over mTLS: the channel works, and the subject's role (controller) is enforced.
        hello = trainer_service_pb2.Hello(run_id="tls-run", rank=0, world_size=1, incarnation_id="i", task="t")
        options = ClientOptions(
            tls_ca=ca, tls_cert=certs["client.pem"].read_bytes(), tls_key=certs["client.key"].read_bytes()
        )
        connection = GovernorConnection(daemon.address, hello, options)
        assert connection.start(wait_s=60) is False, "start returns at the refusal, not a Welcome"
        assert connection.refusal is not None
        assert connection.refusal.code == "PERMISSION_DENIED"
        connection.close(None, flush_timeout_s=0.1)


def test_oversize_message_is_resource_exhausted(tmp_path: Path) -> None:
    """A message over max_message_bytes gets RESOURCE_EXHAUSTED and changes nothing."""
    with InProcessDaemon(tmp_path / "data", max_message_bytes=16 * 1024) as daemon:
        client = AttachClient(daemon.address, "big")
        client.connect()
        client.vitals(list(range(1, 4001)), [1.0] * 4000)  # about 44 KB
        with pytest.raises(grpc.RpcError) as info:
            client.next("ack")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel = grpc.insecure_channel(daemon.address)
        status = cgrpc.ControlServiceStub(channel).GetPanicState(cpb.GetPanicStateRequest(run_id="big")).run
        assert status.ranks[0].num_records == 0
        channel.close()
        client.close()


# ----------------------------------------------------------------------------- fuzzed input

names = st.text(alphabet=st.characters(codec="utf-8"), max_size=140)
floats = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def bad_hellos(draw: st.DrawFn) -> trainer_service_pb2.Hello:
    hello = trainer_service_pb2.Hello(
        run_id=draw(st.one_of(names, st.just("ok-run"))),
        rank=draw(st.integers(min_value=0, max_value=5000)),
        world_size=draw(st.integers(min_value=0, max_value=5000)),
        incarnation_id=draw(st.one_of(st.just(""), st.text(max_size=200))),
    )
    if draw(st.booleans()):
        hello.num_classes = draw(st.integers(min_value=0, max_value=3))
    if draw(st.booleans()):
        hello.policy_overrides.recovery_lr_scale = draw(floats)
    if draw(st.booleans()):
        hello.policy_overrides.history_window = draw(st.integers(min_value=0, max_value=9))
    return hello


def is_valid_hello(h: trainer_service_pb2.Hello) -> bool:
    import re

    ok_policy = (
        not h.policy_overrides.HasField("recovery_lr_scale") or 0 < h.policy_overrides.recovery_lr_scale <= 1
    ) and (not h.policy_overrides.HasField("history_window"))
    return bool(
        re.fullmatch(r"[A-Za-z0-9._-]{1,128}", h.run_id)
        and 1 <= h.world_size <= 4096
        and h.rank < h.world_size
        and 1 <= len(h.incarnation_id) <= 128
        and (not h.HasField("num_classes") or h.num_classes >= 2)
        and ok_policy
    )


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with InProcessDaemon(tmp_path_factory.mktemp("fuzz") / "data") as daemon:
        client = AttachClient(daemon.address, "steady")
        client.connect()
        client.validation(10, 1.0)
        client.next("verdict")
        client.wait_ack(1)
        yield daemon, client


def snapshot_of(daemon: InProcessDaemon) -> tuple[int, str]:
    channel = grpc.insecure_channel(daemon.address)
    runs = cgrpc.ControlServiceStub(channel).ListRuns(cpb.ListRunsRequest()).runs
    channel.close()
    return len(runs), str(sorted((r.run_id, r.history_size, r.ranks[0].num_records) for r in runs))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hello=bad_hellos())
def test_malformed_hellos_get_a_status_and_change_nothing(fuzz_daemon, hello: trainer_service_pb2.Hello) -> None:  # type: ignore[no-untyped-def]
    """Every invalid Hello is refused with INVALID_ARGUMENT and leaves the runs as they were."""
    daemon, _ = fuzz_daemon
    if is_valid_hello(hello):
        return
    before = snapshot_of(daemon)
    client = AttachClient(daemon.address, "x")
    client.hello = hello
    with pytest.raises(grpc.RpcError) as info:
        client.connect()
    client.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert snapshot_of(daemon) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.integers(min_value=-5, max_value=10), max_size=5),
    losses=st.lists(floats, max_size=5),
    grads=st.lists(floats, max_size=5),
    first_seq=st.integers(min_value=0, max_value=3),
)
def test_malformed_batches_get_a_status_and_change_nothing(fuzz_daemon, steps, losses, grads, first_seq) -> None:  # type: ignore[no-untyped-def]
    """A VitalsBatch with unequal columns, no records, negative steps or seq 0 is refused; state is unchanged."""
    daemon, _ = fuzz_daemon
    valid = steps and len(losses) == len(steps) and len(grads) in (0, len(steps)) and first_seq >= 1 and min(steps) >= 0
    if valid:
        return
    client = AttachClient(daemon.address, "fuzz-run", incarnation_id="fuzz")
    client.connect()
    before = snapshot_of(daemon)
    client.send(
        vitals_batch=trainer_service_pb2.VitalsBatch(first_seq=first_seq, step=steps, loss=losses, grad_norm=grads)
    )
    with pytest.raises(grpc.RpcError) as info:
        client.next("ack")
    client.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert snapshot_of(daemon) == before


def test_active_runs_limit(tmp_path: Path) -> None:
    """Past --max-active-runs a new run gets RESOURCE_EXHAUSTED; a FINISHED run leaves the count."""
    with InProcessDaemon(tmp_path / "data", max_active_runs=1) as daemon:
        first = AttachClient(daemon.address, "first")
        first.connect()
        second = AttachClient(daemon.address, "second")
        with pytest.raises(grpc.RpcError) as info:
            second.connect()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-active-runs" in (info.value.details() or "")
        seq = first.next_seq()
        first.send(finish={"seq": seq, "status": common_pb2.FINISH_STATUS_COMPLETED})
        first.wait_ack(seq)
        third = AttachClient(daemon.address, "third")
        assert third.connect().generation == 1
        for client in (first, second, third):
            client.close()


def test_records_per_batch_limit_and_finished_run_retention(tmp_path: Path) -> None:
    """A batch over --max-records-per-batch gets RESOURCE_EXHAUSTED; finished runs beyond
    --retain-finished-runs leave memory (oldest first)."""
    with InProcessDaemon(tmp_path / "data", max_records_per_batch=8, retain_finished_runs=1) as daemon:
        client = AttachClient(daemon.address, "batchy")
        client.connect()
        client.vitals(list(range(1, 10)), [1.0] * 9)
        with pytest.raises(grpc.RpcError) as info:
            client.next("ack")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "9 records exceed the limit of 8" in (info.value.details() or "")
        client.close()
        for run_id in ("done-1", "done-2"):
            finisher = AttachClient(daemon.address, run_id)
            finisher.connect()
            seq = finisher.next_seq()
            finisher.send(finish={"seq": seq, "status": common_pb2.FINISH_STATUS_COMPLETED})
            finisher.wait_ack(seq)
            finisher.close()
        channel = grpc.insecure_channel(daemon.address)
        runs = {r.run_id for r in cgrpc.ControlServiceStub(channel).ListRuns(cpb.ListRunsRequest()).runs}
        channel.close()
        assert runs == {"batchy", "done-2"}


def issue_certificate(folder: Path, name: str, cn: str, days: int, alt_names: str = "") -> tuple[Path, Path]:
    """A fresh key and a certificate for ``cn`` (and ``alt_names``) signed by the CA of ``make_certs``:
    returns (certificate, key), written as ``name``.pem and ``name``.key."""
    openssl(
        folder,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
    )
    extension: tuple[str, ...] = ()
    if alt_names:
        (folder / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
        extension = ("-extfile", f"{name}.ext")
    openssl(
        folder,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-out", f"{name}.pem", "-days", str(days), *extension),
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


def issue_server_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A fresh key and server certificate for 127.0.0.1 from the CA of ``make_certs`` (as cert-manager renews
    one with ``rotationPolicy: Always``): returns (certificate, key)."""
    return issue_certificate(folder, name, "localhost", days=30, alt_names="IP:127.0.0.1,DNS:localhost")


def publish_secret(volume: Path, files: dict[str, Path]) -> None:
    """Write ``files`` into ``volume`` as the kubelet updates a Secret volume: a new timestamped directory,
    then an atomic swap of the ``..data`` symlink the visible names point through."""
    generation = volume / f"..{time.monotonic_ns()}"
    generation.mkdir()
    for name, source in files.items():
        (generation / name).write_bytes(source.read_bytes())
    swap = volume / "..data_tmp"
    swap.symlink_to(generation.name)
    swap.replace(volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")


def served_certificate(address: str, ca: Path, client: tuple[Path, Path]) -> bytes:
    """The DER certificate a NEW TLS connection to ``address`` is handed (Python's ssl, ALPN h2, with the
    client certificate for mTLS)."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(client[0], client[1])
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_certificates_rotate_without_a_restart(tmp_path: Path) -> None:
    """`governor serve --tls-cert/--tls-key/--tls-client-ca` on a Secret-like volume: after the kubelet-style
    swap to a renewed certificate (new key, same CA), the next new connection is handed the new certificate,
    a channel opened before the swap keeps working, and the log says so. A swap to a key that does not match
    its certificate keeps the renewed one in force, logged, instead of breaking the handshakes."""
    import ssl

    from governor_daemon.daemon_process import DaemonProcess

    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    certs = make_certs(certs_dir)
    renewed_cert, renewed_key = issue_server_certificate(certs_dir, "renewed")
    assert renewed_cert.read_bytes() != certs["server.pem"].read_bytes()
    volume = tmp_path / "tls"
    volume.mkdir()
    publish_secret(volume, {"tls.crt": certs["server.pem"], "tls.key": certs["server.key"], "ca.crt": certs["ca.pem"]})
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("ops-bot controller unused-token-0123456789\n")
    tokens_file.chmod(0o600)
    client = (certs["client.pem"], certs["client.key"])
    der = {p: ssl.PEM_cert_to_DER_cert(p.read_text()) for p in (certs["server.pem"], renewed_cert)}
    args = ["--tls-cert", str(volume / "tls.crt"), "--tls-key", str(volume / "tls.key")]
    args += ["--tls-client-ca", str(volume / "ca.crt"), "--tokens-file", str(tokens_file)]
    with DaemonProcess(tmp_path / "data", *args) as daemon:
        credentials = grpc.ssl_channel_credentials(
            certs["ca.pem"].read_bytes(), client[1].read_bytes(), client[0].read_bytes()
        )
        before = grpc.secure_channel(daemon.address, credentials)
        old_stub = cgrpc.ControlServiceStub(before)
        assert old_stub.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
        assert served_certificate(daemon.address, certs["ca.pem"], client) == der[certs["server.pem"]]

        publish_secret(volume, {"tls.crt": renewed_cert, "tls.key": renewed_key, "ca.crt": certs["ca.pem"]})
        assert served_certificate(daemon.address, certs["ca.pem"], client) == der[renewed_cert]
        assert old_stub.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == [], "an open channel keeps working"
        after = grpc.secure_channel(daemon.address, credentials)
        assert cgrpc.ControlServiceStub(after).ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
        after.close()

        # A half-done rotation (the old key beside the renewed certificate) is not served.
        publish_secret(volume, {"tls.crt": renewed_cert, "tls.key": certs["server.key"], "ca.crt": certs["ca.pem"]})
        assert served_certificate(daemon.address, certs["ca.pem"], client) == der[renewed_cert]
        assert old_stub.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
        before.close()
    log = daemon.log_path.read_text()
    assert log.count("server certificate reloaded") == 1, log
    assert log.count("TLS files changed but do not load") == 1, log


def test_a_key_of_another_certificate_is_refused_at_start(tmp_path: Path) -> None:
    """`governor serve` with a certificate and a key that do not belong together exits 2 naming both files,
    instead of serving handshakes that all fail."""
    certs = make_certs(tmp_path)
    result = governor_cli(
        [
            "serve",
            *("--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir", str(tmp_path / "data")),
            *("--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["client.key"])),
        ],
        timeout_s=60,
    )
    assert result.returncode == 2, result.stderr
    assert "do not load as a pair" in result.stderr
    assert not (tmp_path / "data").exists()
