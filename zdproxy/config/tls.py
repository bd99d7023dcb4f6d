"""TLS on the proxy listener (`[proxy.tls]`): the settings, and the server context
built from them (zdproxy/tls.py). The files are loaded when the config is validated, so a bad
certificate or key is refused like any other invalid option, naming the field."""

from __future__ import annotations

from pydantic import Field, model_validator

from zdproxy.config.section import Section
from zdproxy.tls import server_context


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
