"""Configuration for every SpecMesh process, read from `SPECMESH_*` environment variables.

Nested fields use `__`: `SPECMESH_NATS__PORT=14222`, `SPECMESH_WORKER__THREADS=1`.
The README's configuration table is generated from these classes (`specmesh config`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROLES = ("drafter", "verifier", "target")
SERVICES = ("gateway", "router", "state", "drafter", "verifier", "target")


class NatsSettings(BaseModel):
    """The NATS server (JetStream enabled) that carries every message between services."""

    host: str = Field("127.0.0.1", description="Address NATS listens on (loopback by default).")
    port: int = Field(14222, ge=1, le=65535, description="NATS client port (not 4222, so an existing server is never touched).")
    monitor_port: int = Field(18222, ge=1, le=65535, description="NATS HTTP monitoring port.")
    url: str | None = Field(None, description="Connect to this URL instead of host:port (e.g. an external cluster).")
    auth: bool = Field(True, description="One NATS user per service, allowed only its own subjects (a drafter cannot publish commits); off for a server with its own users (credentials then go in `url`).")
    secret: SecretStr | None = Field(None, description="Secret the NATS users' passwords derive from; unset: generated into `<run_dir>/nats/secret` (mode 0600) when NATS first starts.")
    user: str = Field("admin", description="NATS user of the CLI, benchmarks and tests (services connect as themselves).")

    @property
    def client_url(self) -> str:
        return self.url or f"nats://{self.host}:{self.port}"


class DatabaseSettings(BaseModel):
    """The PostgreSQL server holding profiles, pair statistics and decisions."""

    host: str = Field("127.0.0.1", description="Address PostgreSQL listens on.")
    port: int = Field(15432, ge=1, le=65535, description="PostgreSQL port (not 5432).")
    user: str = Field("specmesh", description="Role that owns the database and runs migrations.")
    password: SecretStr = Field(SecretStr("specmesh"), description="Password of that role (never printed).")
    app_user: str = Field("specmesh_app", description="Least-privilege role the router writes with (SELECT and INSERT only).")
    app_password: SecretStr = Field(SecretStr("specmesh_app"), description="Password of that role (never printed).")
    name: str = Field("specmesh", description="Database name.")
    os_user: str = Field("nobody", description="Unprivileged OS user that runs the server when started as root.")
    url: str | None = Field(None, description="SQLAlchemy URL to use instead of the local server.")

    @property
    def sqlalchemy_url(self) -> str:
        """The owner's URL: migrations."""
        return self.url or f"postgresql+asyncpg://{self.user}:{self.password.get_secret_value()}@{self.host}:{self.port}/{self.name}"

    @property
    def app_url(self) -> str:
        """The least-privilege role's URL: what the services use (`url`, when set, serves both)."""
        return self.url or (f"postgresql+asyncpg://{self.app_user}:{self.app_password.get_secret_value()}"
                            f"@{self.host}:{self.port}/{self.name}")


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP API and the gRPC API."""

    host: str = Field("127.0.0.1", description="HTTP and gRPC listen address.")
    port: int = Field(18000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    grpc_port: int = Field(18001, ge=1, le=65535, description="gRPC port.")
    request_timeout_s: float = Field(120.0, gt=0, description="Longest a single generation may take.")
    reasoning_parser: Literal["none", "think"] = Field("none", description="\"think\": a reasoning checkpoint's <think>...</think> comes back apart from the answer (message.reasoning_content; a Responses reasoning item), as vLLM's --reasoning-parser for DeepSeek-R1 and Qwen3.")
    max_concurrent_requests: int = Field(1024, ge=1, description="Generations one gateway runs at once (each choice counts); beyond, a 429 with Retry-After (TGI's max_concurrent_requests): a burst past what the targets can queue gets a clear answer, not a timeout.")
    api_keys: list[SecretStr] = Field(default_factory=list, description='Accepted API keys, a JSON list (`["sk-..."]`); clients send `Authorization: Bearer <key>`.')
    dev_mode: bool = Field(False, description="Accept requests without an API key (development only; `make up` turns it on and says so).")
    served_model_names: list[str] = Field(["specmesh"], min_length=1, description='Names the API serves the model under, a JSON list (vLLM\'s --served-model-name): requests may name any of them, answers and /v1/models give the first.')
    chat_template: Path | None = Field(None, description="A Jinja chat template file used instead of the checkpoint's own (vLLM's --chat-template); unset: the checkpoint's, or the family's `Role: content` lines.")
    generation_config: str = Field("auto", min_length=1, description='Sampling defaults for fields a request leaves out (vLLM\'s --generation-config): "auto" takes temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) from the target\'s generation_config.json; "none" keeps OpenAI\'s (temperature 1, top_p 1); else a folder holding a generation_config.json.')
    log_requests: bool = Field(False, description="Log a line per request when it arrives (prompt tokens, max_tokens, chain, sampling) and when it ends (status, tokens, finish reason, TTFT, TPOT, acceptance), as vLLM's --enable-log-requests.")
    max_log_len: int = Field(0, ge=0, description="With log_requests: the first this many characters of each prompt in its line (vLLM's --max-log-len); 0: no prompt text (it may hold what users would not want in logs).")
    cors_allow_origins: list[str] = Field(default_factory=list, description='Origins a browser may call the HTTP API from (CORS), a JSON list: `["https://app.example"]`, or `["*"]` for any (vLLM\'s --allowed-origins); empty (the default): no cross-origin calls.')
    ssl_certfile: Path | None = Field(None, description="PEM certificate (chain): the HTTP and gRPC APIs serve TLS (https, and gRPC's secure port) with ssl_keyfile (vLLM's --ssl-certfile).")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile.")
    responses_store: bool = Field(True, description="Keep Responses API answers (`store`, default true as in OpenAI's API) in a JetStream key-value bucket, for `previous_response_id` and GET/DELETE /v1/responses/{id}; false: none is kept.")
    responses_ttl_s: float = Field(30 * 86400.0, gt=0, description="Seconds a stored response is kept (OpenAI keeps 30 days).")
    responses_max_bytes: int = Field(1 << 30, ge=1 << 20, description="Most bytes the stored responses take; past it a response is answered but not kept (store: false).")

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("gateway.ssl_certfile and gateway.ssl_keyfile go together: give both, or neither")
        return self

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


class ModelSettings(BaseModel):
    """Where the model family comes from: a trained profile, or explicit checkpoint folders."""

    profile: Literal["tiny", "small", "bench"] = Field("tiny", description="Trained family to use when no folders are given.")
    cache_dir: Path = Field(Path.home() / ".cache" / "specmesh" / "models", description="Content-addressed cache of trained families.")
    target: Path | None = Field(None, description="HF checkpoint folder of the target (overrides the profile).")
    verifier: Path | None = Field(None, description="HF checkpoint folder of the verifier.")
    drafter_code: Path | None = Field(None, description="HF checkpoint folder of the code drafter.")
    drafter_prose: Path | None = Field(None, description="HF checkpoint folder of the prose drafter.")
    drafters: list[Literal["drafter-code", "drafter-prose"]] = Field(
        ["drafter-code", "drafter-prose"], min_length=1,
        description="Drafters `make up` serves, one drafter process each (times its replicas): the router picks the specialist per request class and can fuse the two.")


class EngineSettings(BaseModel):
    """How a model runs inside one process."""

    device: str = Field("cpu", description="torch device for the model (cpu, cuda, cuda:1, ...).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight and activation dtype.")
    threads: int = Field(1, ge=1, description="torch threads per model process (report it with every number).")
    max_batch: int = Field(16, ge=1, description="Most requests one model holds KV cache for at once.")
    max_len: int = Field(512, ge=16, description="Longest sequence (prompt + output) a request may reach.")
    runner: Literal["lean", "hf"] = Field("lean", description="Model code: the lean runner (Llama, Qwen2, Qwen3, Mistral, Phi-3, SmolLM3, Gemma 2 and 3, OLMo 2; others fall back to transformers) or transformers.")
    prefix_caching: bool = Field(True, description="Start a prompt on the head of it the KV cache still holds from an "
                                 "earlier or live request (of the same cache_salt): only the rest is prefilled.")
    prefill_chunk: int = Field(512, ge=0, description="Chunked prefill on the target (vLLM's): a prompt longer than this is written into the prefix cache this many tokens a round, between the decode rounds, so running requests keep their pace while it is read; 0: every prompt in one forward. Needs prefix_caching.")
    model: str | None = Field(None, description="Family member a worker hosts (default by role: drafter-code, verifier, target).")
    log_stats_interval_s: float = Field(10.0, ge=0, description="Seconds between the target's throughput lines in its log (prompt and generation tok/s, running, waiting, slots, prefix cache hits, acceptance per level), as vLLM's engine logs; 0: none.")


class SpeculationSettings(BaseModel):
    """Defaults for speculation when neither the request nor the router says otherwise."""

    chain: str = Field("drafter,target", description="Default chain, bottom level first.")
    k: int = Field(4, ge=0, le=16, description="Default tokens proposed per verification at each level.")
    confidence_threshold: float = Field(0.0, ge=0.0, le=1.0, description="Stop drafting below this confidence.")
    lenient: float = Field(1.0, ge=1.0, description="Middle-level leniency (1 = exact).")
    lookahead: bool = Field(False, description="Remote proposers draft the next round while the level above verifies (pays when each level has its own device).")
    adaptive_depth: bool = Field(False, description="Per round, the requests whose k the client did not pin verify only as many drafts as the goodput model says pay at that round's batch (SpecServe's per-step k; never more than their k); the target's verification is profiled over batch x width when the worker starts. Off by default: the router reads a round the policy cut short as one of the full k and took 3-level chains for 3x faster than they ran (bench adaptive on the bench family, 2026-12-03: 0.79x ngram,target).")
    adaptive_depth_margin: float = Field(0.1, ge=0.0, lt=1.0, description="A round goes shallower than its requests' k only when the model predicts this much more tokens per second (its own error; within it, k stands).")
    parallel_chains: bool = Field(True, description="In a round with requests on several chains, chains that share no lower level propose at once (their levels are other processes), so the round waits for the slowest proposal rather than their sum.")


class RouterSettings(BaseModel):
    """How the router estimates, decides, explores and records history."""

    publish_interval_s: float = Field(1.0, gt=0, description="Seconds between two publications of the assignment table.")
    explore_rate: float = Field(0.05, ge=0.0, le=1.0, description="Chance per class and interval to assign a random candidate (reason `explore`).")
    explore_depth_rate: float = Field(0.05, ge=0.0, le=1.0, description="Chance per class and interval to assign the winning chain with k one step up or down on one level, at any load (reason `explore`), while that k has few or stale outcomes there.")
    explore_max_batch: float = Field(2.0, ge=1.0, description="Explore only while the mean batch per target is at most this: under load a costly chain on trial slows every request.")
    explore_until: int = Field(10, ge=0, description="Explore a chain while it has fewer outcomes than this at the current load ...")
    explore_stale_s: float = Field(600.0, gt=0, description="... or none for this many seconds.")
    shared_chain_batch: float = Field(1.5, ge=1.0, description="From this mean batch per target on, every class gets one chain (reason `shared`): a round waits for every chain's proposal (the slowest, where they propose at once), so mixing chains slows every request.")
    class_switch_margin: float = Field(0.03, ge=0.0, lt=1.0, description="A class keeps the chain and k it was last given at a load unless another is cheaper by this fraction: the estimates move by a few percent with each request's luck, and without it a class wandered between near-equal k (0: off).")
    shared_switch_margin: float = Field(0.05, ge=0.0, lt=1.0, description="Under load, another chain replaces the one shared at that load only when it is cheaper by this fraction (over the classes, weighted by their share of requests), and another k the one every class took on it: a switch leaves every request in flight on the old chain for its life, and a round with both waits for both proposals (with two k, pads every chunk to the longer).")
    shared_k_switch_margin: float | None = Field(None, ge=0.0, lt=1.0, description="Under load, another k replaces the one every class took on the shared chain only when it is cheaper by this fraction (unset: shared_switch_margin). A k switch costs one round of padding, not a split of the requests in flight: on the bench family at 16 in flight `ngram,target` k = 3 ran 3.3% faster than k = 4 (bench/results/2026-12-02-bench/ksweep.md), less than the chain's 5%.")
    load_hold_s: float = Field(10.0, ge=0.0, description="For this many seconds after the mean batch reached shared_chain_batch, keep the under-load rules (one chain for every class, no chain trials) though the load fell, so a burst in a lull is not split over per-class chains and trials (0: off).")
    half_life_tokens: float = Field(2000.0, gt=0, description="Drafted tokens after which an acceptance observation weighs half (EWMA).")
    profile_window: int = Field(120, ge=4, description="Recent step-time samples per model the least-squares fit uses.")
    k_max: int = Field(6, ge=1, le=16, description="Largest k per level among the candidates (k = 1..k_max).")
    hop_ms: float = Field(0.4, ge=0.0, description="NATS round trip added per call to a remote level (ms).")
    margin: float = Field(0.02, ge=0.0, lt=1.0, description="Speculation must beat the target alone by this fraction to be chosen.")
    slo_tpot_ms: float = Field(0.0, ge=0.0, description="TPOT objective per request class (ms per token; 0 = none).")
    flush_interval_s: float = Field(1.0, gt=0, description="Seconds between two batched writes of history to PostgreSQL.")
    buffer_rows: int = Field(100000, ge=100, description="Rows held in memory while PostgreSQL is down; beyond, rows are dropped and counted.")
    history_rows: int = Field(5000, ge=0, description="Recent rows per table loaded at start to resume the estimates.")


class TracingSettings(BaseModel):
    """OpenTelemetry spans: a JSON-lines file per service, and OTLP when an endpoint is configured."""

    file: bool = Field(True, description="Write spans as JSON lines to `<run_dir>/traces/<service>.jsonl` (`specmesh trace show`).")
    otlp_endpoint: str | None = Field(None, description="OTLP collector to export spans to (else `OTEL_EXPORTER_OTLP_ENDPOINT`; none: no OTLP).")
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests traced (parent-based: a request is traced everywhere or nowhere).")


class MetricsSettings(BaseModel):
    """Prometheus `/metrics`: the gateway serves it on its HTTP port, every other service on its own port."""

    enabled: bool = Field(True, description="Serve Prometheus metrics (the gateway's `/metrics` is always on).")
    host: str = Field("127.0.0.1", description="Address the services' metrics servers listen on.")
    state_port: int = Field(19101, ge=0, le=65535, description="Metrics port of the state service (taken: a free one, in its NATS `micro` metadata).")
    router_port: int = Field(19102, ge=0, le=65535, description="Metrics port of the router.")
    drafter_port: int = Field(19103, ge=0, le=65535, description="Metrics port of a drafter worker.")
    verifier_port: int = Field(19104, ge=0, le=65535, description="Metrics port of a verifier worker.")
    target_port: int = Field(19105, ge=0, le=65535, description="Metrics port of a target worker.")

    def port(self, service: str) -> int | None:
        """The configured metrics port of `service` (None for the gateway, which uses its HTTP port)."""
        return getattr(self, f"{service}_port", None)


class Settings(BaseSettings):
    """Everything one SpecMesh process needs to know."""

    model_config = SettingsConfigDict(env_prefix="SPECMESH_", env_nested_delimiter="__", extra="ignore")

    run_dir: Path = Field(Path(".run"), description="Pid files, logs, server data and `.run/env`.")
    replicas: dict[str, int] = Field(default_factory=dict, description="Processes per service under `make up`, e.g. `SPECMESH_REPLICAS__TARGET=2` (default 1 each).")
    cpus: dict[str, str] = Field(default_factory=dict, description="CPU cores each service's processes are pinned to, e.g. `SPECMESH_CPUS__TARGET=1`, `SPECMESH_CPUS__DRAFTER=0` (lists like `0-3,6`); unset: no pinning.")
    log_level: str = Field("INFO", description="Python logging level.")
    nats: NatsSettings = NatsSettings()
    database: DatabaseSettings = DatabaseSettings()
    gateway: GatewaySettings = GatewaySettings()
    models: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    speculation: SpeculationSettings = SpeculationSettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    router: RouterSettings = RouterSettings()

    @field_validator("replicas", "cpus")
    @classmethod
    def _known_services(cls, value: dict, info) -> dict:
        unknown = sorted(set(value) - set(SERVICES))
        if unknown:
            raise ValueError(f"{info.field_name} of unknown service(s) {unknown}; services: {', '.join(SERVICES)}")
        if info.field_name == "replicas" and any(n < 1 for n in value.values()):
            raise ValueError("replicas must be >= 1")
        if info.field_name == "cpus":
            for spec in value.values():
                parse_cpus(spec)  # raises with the reason
        return value

    @field_validator("run_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


def parse_cpus(spec: str) -> set[int]:
    """`"0-2,5"` -> {0, 1, 2, 5}; a ValueError that says what is wrong otherwise."""
    cores: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"bad CPU list {spec!r}: expected cores like '0', '0-3' or '0,2-3'")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
