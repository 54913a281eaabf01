"""The one settings class (CONTRACT §1): environment variables prefixed ``COLLABBUS_``."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing import Annotated, Literal


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by every command; each field is also a command-line option."""

    model_config = SettingsConfigDict(env_prefix="COLLABBUS_", extra="ignore")

    data_dir: Path = Field(Path("./.collabbus"), description="everything the embedded default writes")
    nats_url: str | None = Field(None, description="comma-separated NATS URLs; unset starts the embedded server")
    nats_listen: str = Field("127.0.0.1:4222", description="where the embedded nats-server listens")
    nats_public_url: str | None = Field(
        None, description="the NATS URL partners connect to, as the AsyncAPI document and GET /me tell them (default: "
        "the bus's own, which may be a loopback or internal address)")
    operator: str = Field("operator", pattern=r"^[a-z0-9][a-z0-9-]{1,62}$", description="id of the network's operator institution")
    operator_name: str = Field("Network operator", description="display name of the operator institution")
    operator_country: str = Field("FI", pattern=r"^[A-Z]{2}$", description="ISO 3166-1 country of the operator")
    nats_creds: Path | None = Field(None, description="credentials file or nkey seed for the bus's own connection")
    nats_account_seed: SecretStr | None = Field(
        None,
        description="the NATS account's nkey seed (SA…), or a file holding it: signs members' credentials "
        "(`institutions creds`) on an external server; the embedded server uses its own",
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL of the read models; default SQLite under the data dir")
    http: str = Field("127.0.0.1:8080", description="address of the HTTP gateway")
    http_rate_limit: float = Field(50.0, gt=0, description="events per second an institution may post over HTTP (sustained)")
    http_rate_burst: int = Field(200, ge=1, description="events an institution may post over HTTP at once (token bucket size)")
    ingress_rate_limit: float = Field(
        500.0, gt=0, description="offers per second an institution may make over NATS, per gatekeeper process (sustained)")
    ingress_rate_burst: int = Field(
        2000, ge=1, description="offers an institution may make over NATS at once, per gatekeeper process (token bucket size)")
    gate_processes: int | None = Field(
        None, ge=0, le=64,
        description="gatekeeper processes `collabbus up` runs beside itself to judge NATS offers "
        "(0: it judges them itself; default 1 on a machine with two cores or more)",
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="JetStream replicas for the streams")
    max_event_bytes: int = Field(262144, ge=1024, description="largest accepted event, serialized")
    duplicate_window: float = Field(
        86400.0, gt=0, description="seconds JetStream remembers event ids for deduplication"
    )
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0],
        description="comma-separated seconds before each webhook delivery attempt (jitter ±20 % on all but the first)",
    )
    webhook_retention_days: float = Field(
        90.0, ge=0, description="days a settled webhook delivery (delivered, given up or cancelled) and its attempts "
        "are kept, counted from when it was owed (0: for ever); deliveries still owed are never removed",
    )
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs that webhook and portal targets may resolve to besides public addresses",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="how `collabbus up` and its gatekeepers write their log to standard error: json (a JSON "
        "object per line), text (a readable line), or auto (text on a terminal, else json)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="the least severe log lines written")
    portal_url: str | None = Field(None, description="the portal's base URL; the portal connector runs when it is set")
    portal_token: str | None = Field(None, description="the Bearer token the portal connector sends")
    portal_interval: float = Field(300.0, gt=0, description="seconds between the portal connector's syncs")
    portal_traced_entries: int = Field(
        100, ge=0, description="changed portal entries per sync pass that get a trace of their own when tracing is on "
        "(the rest are counted on the pass's span, not traced: a first sync of thousands would fill the span store)",
    )

    _split_lists = field_validator("webhook_retry_schedule", "webhook_allow_networks", mode="before")(
        lambda cls, v: _split(v)
    )

    @field_validator("http", "nats_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        host, colon, port = value.rpartition(":")
        if not colon or not port.isdigit() or not 0 <= int(port) <= 65535 or " " in host:
            raise ValueError("not an address host:port with a port from 0 to 65535 (such as 127.0.0.1:8080)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        scheme = value.partition("://")[0].lower() if value is not None and "://" in value else None
        if scheme is not None and scheme not in ("sqlite", "postgresql", "postgresql+psycopg"):
            raise ValueError(f"{scheme} is not a database the read models use: SQLite (sqlite:///path/to/file.db) "
                             "or PostgreSQL (postgresql+psycopg://user:password@host/database)")
        return value

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @property
    def nats_servers(self) -> list[str]:
        """The URLs to connect to: the configured cluster, or the embedded server."""
        if self.nats_url:
            return [u.strip() for u in self.nats_url.split(",") if u.strip()]
        return [f"nats://{self.nats_listen}"]

    @property
    def nats_address(self) -> str:
        """Where partners connect, as ``host:port`` (no scheme, no credentials): ``nats_public_url``,
        else the first server the bus connects to."""
        return (self.nats_public_url or self.nats_servers[0]).split("://", 1)[-1].rsplit("@", 1)[-1].rstrip("/")

    @property
    def nats_public(self) -> str:
        """Where partners connect, as a URL (``nats://host:port`` unless ``nats_public_url`` names a scheme)."""
        given = self.nats_public_url
        return given.rstrip("/") if given and "://" in given else f"nats://{self.nats_address}"

    @property
    def embedded(self) -> bool:
        """True when the bus runs its own nats-server."""
        return not self.nats_url

    @property
    def db_url(self) -> str:
        """The read models' database URL."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'collabbus.db').resolve()}"

    @property
    def http_host_port(self) -> tuple[str, int]:
        """Where the HTTP gateway listens."""
        host, _, port = self.http.rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.nats_listen.rpartition(":")
        return host or "127.0.0.1", int(port)
