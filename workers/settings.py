"""WorkerSettings: command-line flags and `COINSERVE_WORKER_*` environment variables, one object."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FaultSettings(BaseSettings):
    """Fault injection for tests and benchmarks; everything is off unless configured."""

    model_config = SettingsConfigDict(env_prefix="COINSERVE_WORKER_FAULT_", extra="forbid")

    delay: str | None = Field(
        None, description="added delay per request: const:MS, exp:MEAN_MS or pareto:SCALE_MS:ALPHA"
    )
    delay_probability: float = Field(1.0, ge=0, le=1, description="fraction of requests that get the delay")
    step_delay_ms: float = Field(
        0.0, ge=0, description="a slow model: extra compute time before every resolution after the first"
    )
    slow_resolution: str | None = Field(
        None,
        pattern=r"^\d+:\d+(\.\d+)?(,\d+:\d+(\.\d+)?)*$",
        description="a slow kernel: RESOLUTION:MS[,...] adds MS to every pass of that resolution, timed like any "
        "pass (so the worker's resolution costs see it)",
    )
    pause_every_s: float = Field(0.0, ge=0, description="start a pause window this often (0: never)")
    pause_s: float = Field(0.0, ge=0, description="length of each pause window: replies are held")
    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of requests answered with HTTP 500")
    garbage_rate: float = Field(0.0, ge=0, le=1, description="fraction answered with a malformed reply")
    garbage_kind: str = Field("nan", description="nan, shape, truncated or close")
    seed: int = Field(0, description="seed of the random draws (which requests are delayed, failed or garbled)")

    @property
    def enabled(self) -> bool:
        return bool(self.delay or self.step_delay_ms or self.pause_every_s or self.error_rate or self.garbage_rate)

    def pass_delay_s(self) -> dict[int, float]:
        """`slow_resolution` as {resolution: seconds added to each of its passes}."""
        pairs = (item.split(":") for item in (self.slow_resolution or "").split(",") if item)
        return {int(index): float(ms) / 1000 for index, ms in pairs}


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COINSERVE_WORKER_", extra="forbid")

    bundle: Path = Field(Path("bundles/default"), description="the bundle folder the model is read from")
    model: str = Field("member-0", description="the bundle model this replica serves")
    host: str = Field("127.0.0.1", description="the address HTTP and the channel listen on")
    port: int = Field(8101, description="HTTP: health, metadata and metrics")
    channel_port: int | None = Field(
        None, ge=0, le=65535, description="the gateway channel (inference); default: the HTTP port + 1"
    )
    max_batch: int = Field(64, ge=1, description="most rows in one forward pass")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="how long the first request of a batch waits for company; 0: none, the calls that arrive "
        "while a step runs make the next batch (measured: no throughput gained by waiting, p50 lower without)",
    )
    max_request_batch: int = Field(64, ge=1, description="most rows one request may carry")
    threads: int = Field(1, ge=1, description="torch threads: one per replica, replicas share the cores")
    int8_engine: str = Field(
        "auto",
        pattern="^(auto|x86|onednn|fbgemm)$",
        description="PyTorch int8 engine of the integer coarse resolutions: auto (the fastest of those that "
        "reproduce the integer reference, measured at start and logged), x86, onednn or fbgemm",
    )
    coarse: str = Field(
        "measured",
        pattern="^(measured|always)$",
        description="which coarse resolutions are served: measured (only those whose measured cost is below the "
        "float32 pass's by more than the timing noise; the others are skipped unless a request asks for coarse "
        "answers: docs/refinement.md) or always (every one, whatever it costs)",
    )
    probe_idle_ms: float = Field(
        50.0, gt=0, description="idle time before a timing pass while the resolution costs are still being measured"
    )
    probe_every_s: float = Field(
        2.0, ge=0, description="once measured, time one pass this often while idle (0: never re-time)"
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness added at start: where replicas share cores with the gateway (coinserve up), "
        "the gateway, which keeps every deadline, must never wait behind forward passes; replicas still use "
        "every idle cycle. 0 leaves the priority alone (a pod of its own).",
    )
    shared_secret: SecretStr | None = Field(None, description="if set, a gateway's HELLO must carry it")
    shared_secret_file: Path | None = Field(None, description="read shared_secret from this file (a mounted secret)")
    graceful_s: float = Field(30.0, gt=0, description="on SIGTERM, the longest wait for calls in flight")
    faults: FaultSettings = Field(default_factory=FaultSettings)

    @property
    def channel(self) -> int:
        return self.port + 1 if self.channel_port is None else self.channel_port

    @model_validator(mode="after")
    def _read_secret_file(self) -> WorkerSettings:
        from protocol.secrets import resolve_secret

        self.shared_secret = resolve_secret("shared_secret", self.shared_secret, self.shared_secret_file)
        return self
