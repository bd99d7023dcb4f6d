"""TLS contexts built from files: the proxy listener's (a certificate and key) and fleet
mode's client context to etcd. Apart from the config and the planes, which use them:
the config validates the files, and a data-plane worker builds its own context from
their names (an SSLContext cannot cross a process boundary) without importing the
settings machinery."""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for HTTP/1.1: TLS 1.2 or newer, the system's default ciphers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load_chain(context, cert_file, key_file)
    return context


def load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """(Re)load the certificate chain: new handshakes use it, open connections keep theirs.
    ValueError says why a pair cannot be used."""
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        raise ValueError(f"not a usable certificate and key: {exc.reason or exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the certificate or key: {exc.strerror or exc}") from None


def client_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS to etcd: its certificate verified with the CA bundle `ca_file` (the system's
    CAs without one), and its name or IP checked; the client certificate `cert_file`
    with its key `key_file` when given (etcd's --client-cert-auth)."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except OSError as exc:  # unreadable, or ssl.SSLError (an OSError): not PEM certificates
        raise ValueError(f"ca_file: {ca_file} is not a usable CA bundle: {exc}") from None
    if cert_file:
        try:
            load_chain(context, cert_file, key_file)
        except ValueError as exc:
            raise ValueError(f"cert_file: {exc}") from None
    return context
