"""GatewaySettings: flags and `COINSERVE_*` environment variables feed one object, built in cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.secrets import resolve_secret


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COINSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="the address HTTP and gRPC listen on; 0.0.0.0: every interface")
    port: int = Field(8000, ge=0, le=65535, description="the HTTP port: V2 API, /v1/requests, console, metrics")
    group: str | None = Field(
        None, description="the model group's name in /v2/models/{group} (default: the bundle manifest's name)"
    )
    bundle: Path = Field(Path("bundles/default"), description="bundle whose manifest names members and codes")
    replicas: dict[str, str] = Field(
        default_factory=dict,
        description="model name → tcp://HOST:PORT, its replica's channel address (the variable: a JSON "
        "object; the flag: --replica NAME=tcp://HOST:PORT, repeated)",
    )
    coded_method: str | None = Field(
        None,
        description="which coded models of the bundle protect the members (default: the method the bundle has "
        "coded models of; 'none': no coding)",
    )
    decode_policy: Literal["patient", "eager"] = Field(
        "patient",
        description="patient: decode a member only once it is late (its patience ran out) or at the deadline; "
        "eager: as soon as any k of k + 1 answers are in (the comparison baseline)",
    )
    patience_quantile: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="a member is late once its call runs past this quantile of its recent calls (chosen on "
        "validation: docs/serving.md)",
    )
    patience_margin_ms: float = Field(5.0, ge=0, description="added to that quantile")
    patience_initial_ms: float = Field(
        50.0,
        gt=0,
        description="the patience before a replica has any history, or 10 times the batch-1 step its "
        "worker measured while warming up when that is longer",
    )
    hedge_replica: str | None = Field(
        None, description="tcp://HOST:PORT of a replica hosting every member: enables hedged requests"
    )
    hedge_quantile: float = Field(
        0.95, gt=0, lt=1, description="hedge a call still missing after this latency quantile"
    )
    max_batch: int = Field(64, ge=1, description="most images in one request")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="largest accepted request body")
    max_concurrent_requests: int = Field(512, ge=1, description="requests in flight before 429 + Retry-After")
    max_open_streams: int = Field(256, ge=1, description="open event streams before 429 + Retry-After")
    max_deadline_ms: float = Field(60_000, gt=0, description="largest deadline_ms a client may ask for")
    overload_lag_ms: float = Field(
        5.0,
        gt=0,
        description="refuse a request with a deadline (503 + Retry-After) while the event loop is this far "
        "behind, or overload_lag_fraction of its deadline if that is more",
    )
    overload_lag_fraction: float = Field(
        1 / 60, ge=0, description="the loop lag tolerated per unit of deadline (5 ms at 300 ms: docs/serving.md)"
    )
    overload_min_inflight: int = Field(
        32,
        ge=0,
        description="the lag guard refuses only while at least this many requests are in flight: a loop behind "
        "with fewer is slowed by something else (another process on its cores), and refusing cures nothing",
    )
    upstream_timeout_s: float = Field(30.0, gt=0, description="bound on a request with no deadline_ms")
    connect_timeout_s: float = Field(1.0, gt=0, description="connecting to a worker and its WELCOME")
    keepalive_s: float = Field(15.0, gt=0, description="SSE keep-alive comment interval")
    retention_s: float = Field(300.0, gt=0, description="how long finished /v1/requests streams stay resumable")
    retention_max: int = Field(1000, ge=1, description="most retained /v1/requests streams")
    stream_store: str = Field(
        "memory",
        description="where /v1/requests event logs live: 'memory' (this process) or redis://HOST:PORT/DB "
        "(shared by every gateway: a stream followed or resumed on any of them)",
    )
    stream_lease_s: float = Field(
        3.0,
        ge=0.1,
        description="with a redis stream store: a request whose gateway has not renewed its lease for this "
        "long is ended with one error ('gateway lost') by the first gateway that notices",
    )
    stream_store_timeout_s: float = Field(0.5, gt=0, description="a Redis command slower than this has failed")
    health_interval_s: float = Field(2.0, gt=0, description="replica readiness re-check interval")
    health_backoff_max_s: float = Field(10.0, gt=0, description="longest wait between checks of a down replica")
    health_timeout_s: float = Field(1.0, gt=0, description="a health check slower than this is missed")
    health_failure_threshold: int = Field(
        3, ge=1, description="missed checks in a row that take a ready replica out (a refusal takes it at once)"
    )
    auth_token: SecretStr | None = Field(None, description="if set, clients must send Authorization: Bearer <token>")
    auth_token_file: Path | None = Field(None, description="read auth_token from this file (a mounted secret)")
    worker_secret: SecretStr | None = Field(None, description="shared secret sent to workers in each channel's HELLO")
    worker_secret_file: Path | None = Field(None, description="read worker_secret from this file")
    graceful_s: float = Field(65.0, gt=0, description="drain time on SIGTERM, larger than max_deadline_ms")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="port of the OIP v2 gRPC endpoint (GRPCInferenceService); 0: off"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins whose pages may call the gateway (CORS); empty: none"
    )

    @model_validator(mode="after")
    def _check_stream_store(self) -> GatewaySettings:
        if self.stream_store != "memory" and not self.stream_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"stream_store must be 'memory' or a redis:// URL, got {self.stream_store!r}")
        return self

    @model_validator(mode="after")
    def _read_secret_files(self) -> GatewaySettings:
        self.auth_token = resolve_secret("auth_token", self.auth_token, self.auth_token_file)
        self.worker_secret = resolve_secret("worker_secret", self.worker_secret, self.worker_secret_file)
        return self
