"""Authentication and authorization: the tokens file, roles, and the server interceptor.

A tokens file holds ``name role token [runs=PREFIX[,PREFIX...]]`` per line (``#`` starts a comment).
The name is the identity journaled with every request; with mTLS a client certificate's common name
is the identity, and its role (and scope) come from a tokens-file line of that name. Roles: Attach
needs ``trainer``; GetPanicState, ListRuns, WatchEvents and GetPolicy need ``viewer`` or
``controller``; RequestRollback, Halt, Resume and UpdatePolicy need ``controller``. Health and
reflection need nothing.

``runs=`` scopes an identity to the runs whose id starts with one of the prefixes (a tenant): it may
attach to, see and command only those; ListRuns and WatchEvents show it only those, and never the
daemon-wide entries (checkpoints hold every run's state). Without ``runs=`` an identity reaches every
run. The scope of the call in progress is ``caller_scope()``.
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from governor_daemon.errors import GovernorError, PermissionDeniedError
from governor_daemon.text import RUN_ID_RE

ROLES = ("trainer", "viewer", "controller")
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("governor_caller", default="")

_TRAINER = "/tolaria.governor.v1.TrainerService/"
_CONTROL = "/tolaria.governor.v1.ControlService/"
REQUIRED_ROLES: dict[str, frozenset[str]] = {
    _TRAINER + "Attach": frozenset({"trainer"}),
    **{
        _CONTROL + m: frozenset({"viewer", "controller"})
        for m in ("GetPanicState", "ListRuns", "WatchEvents", "GetPolicy")
    },
    **{
        _CONTROL + m: frozenset({"controller"})
        for m in ("RequestRollback", "Halt", "Resume", "UpdatePolicy", "ForgetRun")
    },
}
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokensFileError(GovernorError):
    """The tokens file is unusable; names the line."""


@dataclass(frozen=True)
class Scope:
    """The runs an identity may reach: those whose id starts with one of ``prefixes``; every run if none."""

    prefixes: tuple[str, ...] = ()

    def allows(self, run_id: str) -> bool:
        """Whether ``run_id`` is in scope (daemon-wide entries, run "", are not, for a scoped identity)."""
        return not self.prefixes or (bool(run_id) and run_id.startswith(self.prefixes))

    def check(self, run_id: str) -> None:
        """Raise PermissionDeniedError unless ``run_id`` is in scope."""
        if not self.allows(run_id):
            raise PermissionDeniedError(
                f"run {run_id!r} is outside this identity's scope (runs starting with {', '.join(self.prefixes)})"
            )


ALL_RUNS = Scope()
_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("governor_scope", default=None)


def caller_scope() -> Scope:
    """The scope of the identity whose call is in progress (every run without authentication)."""
    return _SCOPE.get() or ALL_RUNS


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: str
    scope: Scope = ALL_RUNS


class Tokens:
    """The parsed tokens file."""

    def __init__(self, entries: list[tuple[str, str, bytes, Scope]]) -> None:
        self._entries = entries
        self._by_name = {name: Principal(name, role, scope) for name, role, _, scope in entries}

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Parse ``path``; raises TokensFileError naming the line for anything malformed."""
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None
        entries: list[tuple[str, str, bytes, Scope]] = []
        seen_tokens: set[str] = set()
        seen_names: set[str] = set()
        for number, raw in enumerate(lines, start=1):
            parts = raw.split()
            comment = next((i for i, part in enumerate(parts) if part.startswith("#")), len(parts))
            parts = parts[:comment]  # a field that starts with '#' starts a comment
            if not parts:
                continue
            if any("#" in part for part in parts):
                raise TokensFileError(
                    f"{path}:{number}: '#' inside a field; a comment starts with '#' after whitespace "
                    "(tokens may not contain '#')"
                )
            if len(parts) not in (3, 4):
                raise TokensFileError(
                    f"{path}:{number}: expected 'name role token [runs=PREFIX,...]', got {len(parts)} fields"
                )
            name, role, token = parts[:3]
            scope = _scope(path, number, parts[3]) if len(parts) == 4 else Scope()
            if role not in ROLES:
                raise TokensFileError(f"{path}:{number}: unknown role {role!r}; roles: {', '.join(ROLES)}")
            if len(token) < 16:
                raise TokensFileError(f"{path}:{number}: token of {name!r} is shorter than 16 characters")
            if name in seen_names:
                raise TokensFileError(f"{path}:{number}: name {name!r} is used twice (a name is one identity)")
            if token in seen_tokens:
                raise TokensFileError(f"{path}:{number}: token of {name!r} is used twice")
            seen_tokens.add(token)
            seen_names.add(name)
            entries.append((name, role, token.encode(), scope))
        if not entries:
            raise TokensFileError(f"{path}: no tokens")
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, comparing against every entry in constant time per entry."""
        presented = token.encode()
        found: Principal | None = None
        for name, role, expected, scope in self._entries:
            if hmac.compare_digest(presented, expected) and found is None:
                found = Principal(name, role, scope)
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def principal_of(self, name: str) -> Principal | None:
        """The role and scope of an identity (for mTLS subjects), or None when it has no line."""
        return self._by_name.get(name)


def _scope(path: Path, number: int, field: str) -> Scope:
    if not field.startswith("runs="):
        raise TokensFileError(f"{path}:{number}: the fourth field must be runs=PREFIX[,PREFIX...], got {field!r}")
    prefixes = tuple(field.removeprefix("runs=").split(","))
    for prefix in prefixes:
        if not RUN_ID_RE.fullmatch(prefix):  # a prefix is a run id's beginning
            raise TokensFileError(f"{path}:{number}: run prefix {prefix!r} must match {RUN_ID_RE.pattern}")
    return Scope(prefixes)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


AuthFailure = Callable[[str, str, str, grpc.StatusCode], None]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks every call's credentials and role; exempts health and reflection.

    With ``tokens`` None and ``mtls`` False, every caller is allowed (loopback-only deployments) and
    named ``anonymous@<peer>``.
    """

    def __init__(self, tokens: Tokens | None, mtls: bool, on_failure: AuthFailure) -> None:
        self.tokens = tokens
        self.mtls = mtls
        self.on_failure = on_failure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        required = REQUIRED_ROLES.get(method, frozenset({"controller"}))
        return _wrap(handler, lambda context: self._check(method, metadata, required, context))

    def _check(
        self, method: str, metadata: dict[str, Any], required: frozenset[str], context: Any
    ) -> tuple[grpc.StatusCode, str] | Principal:
        peer = context.peer()
        principal: Principal | None = None
        if self.mtls:
            subject = _common_name(context)
            if subject:
                principal = self.tokens.principal_of(subject) if self.tokens else None
                if principal is None:
                    why = f"certificate subject {subject!r} has no role in the tokens file"
                    self.on_failure(method, peer, why, grpc.StatusCode.PERMISSION_DENIED)
                    return grpc.StatusCode.PERMISSION_DENIED, why
        if principal is None and self.tokens is not None:
            header = str(metadata.get("authorization", ""))
            token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            principal = self.tokens.authenticate(token) if token else None
            if principal is None:
                why = "missing bearer token" if not token else "unknown token"
                self.on_failure(method, peer, why, grpc.StatusCode.UNAUTHENTICATED)
                return (
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{why}: send 'authorization: Bearer <token>' from the tokens file",
                )
        if principal is None:
            if self.tokens is None and not self.mtls:
                return Principal(f"anonymous@{peer}", "")
            self.on_failure(method, peer, "no client certificate", grpc.StatusCode.UNAUTHENTICATED)
            return grpc.StatusCode.UNAUTHENTICATED, "no client certificate identity"
        if principal.role not in required and not (principal.role == "controller" and "viewer" in required):
            self.on_failure(
                method, peer, f"{principal.name} has role {principal.role}", grpc.StatusCode.PERMISSION_DENIED
            )
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{principal.name} has role {principal.role}; "
                f"{method.rsplit('/', 1)[-1]} needs {' or '.join(sorted(required))}"
            )
        return principal


def _common_name(context: Any) -> str:
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else ""


Check = Callable[[Any], "tuple[grpc.StatusCode, str] | Principal"]


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], check: Check) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with the check (and the caller contextvar) around its behaviour."""

    async def guard(context: Any) -> None:
        outcome = check(context)
        if not isinstance(outcome, Principal):
            await context.abort(*outcome)
            return
        CALLER.set(outcome.name)
        _SCOPE.set(outcome.scope)

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await guard(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await guard(context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        inner_ss: Any = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> Any:
            await guard(context)
            async for item in inner_ss(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler


# ------------------------------------------------------------------------------------ certificate reload


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material lives on disk: read again when it changes (cert-manager renews it)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent read of the files: the certificate chain, its key, and the client CA bundle."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _signature(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    """(inode, size, mtime) of each file, symlinks followed: a Secret volume's atomic swap changes it."""
    paths = [files.cert, files.key, *([files.client_ca] if files.client_ca is not None else [])]
    out = []
    for path in paths:
        st = path.stat()
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_tls(files: TlsFiles) -> TlsMaterial:
    """Read the files and check that the key belongs to the certificate (Python's ssl loads the pair).

    Raises OSError or ssl.SSLError (a missing file, a half-written pair, a key of another certificate).
    """
    return server_context(files)[1]


def server_context(files: TlsFiles) -> tuple[ssl.SSLContext, TlsMaterial]:
    """A TLS 1.2+ server context of the files (the client CA verified, not required) and what it loaded,
    read twice to be sure no rotation was under way. Raises as ``read_tls``."""
    material = TlsMaterial(
        files.cert.read_bytes(),
        files.key.read_bytes(),
        files.client_ca.read_bytes() if files.client_ca is not None else None,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
    again = TlsMaterial(
        files.cert.read_bytes(),
        files.key.read_bytes(),
        files.client_ca.read_bytes() if files.client_ca is not None else None,
    )
    if again != material:
        raise ssl.SSLError("the files changed while they were read; the next handshake tries again")
    return context, material


class CertificateReloader:
    """The certificate-configuration fetcher of ``grpc.dynamic_ssl_server_credentials`` (``fetch``), and the
    metrics server's source of TLS contexts (``check``).

    gRPC calls ``fetch`` at every new TLS handshake, the metrics server ``check`` at every new connection.
    It compares the files' (inode, size, mtime) with those of the last read, so an unchanged set costs a few
    ``stat`` calls; after a change it reads them again and, when they load as a pair (and differ from what
    is served), hands over the new configuration (gRPC's, or an SSL context). New connections
    then get the new certificate (and client CA); connections already open keep theirs. Files that do not
    load (half written, a key of another certificate, removed) keep the current ones in force, logged once
    per change, and are tried again at the next handshake after a further change.
    """

    def __init__(
        self,
        files: TlsFiles,
        initial: TlsMaterial,
        on_reload: Callable[[TlsMaterial], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.files = files
        self.current = initial
        self.reloads = 0
        self._on_reload, self._on_error = on_reload, on_error
        self._lock = threading.Lock()
        try:
            self._seen: tuple[tuple[int, int, int], ...] = _signature(files)
        except OSError:
            self._seen = ()

    def configuration(self, material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        """The gRPC configuration serving ``material``."""
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the current material and reload it as described above."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(self.current),
            # gRPC documents None as "no change"; its type stub omits it.
            cast("Callable[[], grpc.ServerCertificateConfiguration]", self.fetch),
            require_client_authentication=self.files.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None (keep serving what is loaded) unless the files changed and load as a pair."""
        loaded = self.check()
        return None if loaded is None else self.configuration(loaded[1])

    def check(self) -> tuple[ssl.SSLContext, TlsMaterial] | None:
        """None (keep serving what is loaded) unless the files changed and load as a pair: then a server
        context of the new material, and the material (now ``current``). Any thread (gRPC handshakes run
        in several): one reload, logged once, whoever sees the change first."""
        with self._lock:
            return self._check()

    def _check(self) -> tuple[ssl.SSLContext, TlsMaterial] | None:
        try:
            signature = _signature(self.files)
        except OSError as exc:
            self._failed((), f"cannot stat the TLS files: {exc.strerror or exc}")
            return None
        if signature == self._seen:
            return None
        try:
            context, material = server_context(self.files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._failed(signature, str(exc))
            return None
        self._seen = signature
        if material == self.current:
            return None
        self.current = material
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(material)
        return context, material

    def _failed(self, signature: tuple[tuple[int, int, int], ...], why: str) -> None:
        """Keep the current material; report once per state of the files (not at every handshake)."""
        if signature != self._seen:
            self._seen = signature
            if self._on_error is not None:
                self._on_error(why)
