"""TLS on the proxy listener (`[proxy.tls]`): the settings, and the server context
built from them. The files are loaded when the config is validated, so a bad
certificate or key is refused like any other invalid option, naming the field."""

from __future__ import annotations

import ssl

from pydantic import Field, model_validator

from zdproxy.config.section import Section


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


class TlsSettings(Section):
    """TLS on the proxy listener; off unless both files are given."""

    cert_file: str = Field(
        default="",
        description="PEM certificate chain (leaf first). Reloaded when it changes on disk.",
    )
    key_file: str = Field(default="", description="PEM private key of the certificate.")

    @model_validator(mode="after")
    def _usable(self) -> TlsSettings:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise ValueError(f"{missing}: give both cert_file and key_file, or neither")
        if self.enabled:
            try:
                server_context(self.cert_file, self.key_file)
            except ValueError as exc:
                raise ValueError(f"cert_file: {exc}") from None
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)
