"""Settings from the environment (prefix GRALORA_); every default works on a laptop."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(value: object) -> object:
    """Accept a comma- or os.pathsep-separated string for list settings."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",")]
        return [p for p in parts if p]
    return value


class Settings(BaseSettings):
    """All configuration of the service. See README "Configuration" for each setting."""

    model_config = SettingsConfigDict(env_prefix="GRALORA_", env_file=None, extra="ignore")

    # Where the embedded defaults keep their files (SQLite database, broker, artifacts...).
    data_dir: Path = Path("gralora-data")
    # Empty means embedded: SQLite under data_dir. Production: postgresql+psycopg://...
    database_url: str = ""
    # Empty means embedded: a SQLite-backed kombu transport under data_dir. Production: redis://...
    broker_url: str = ""
    queue: str = "gralora"

    artifacts_dir: Path | None = None  # default: data_dir/artifacts
    artifacts_s3_bucket: str | None = None  # when set, artifacts go to this bucket
    artifacts_s3_prefix: str = "artifacts"
    s3_endpoint_url: str | None = None  # for S3-compatible stores (MinIO, moto...)
    checkpoints_dir: Path | None = None  # default: data_dir/checkpoints
    cache_dir: Path | None = None  # default: data_dir/cache (downloaded datasets)

    # Folders a file:// dataset / a local base model may come from.
    dataset_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Hub model ids allowed as base_model (fnmatch patterns).
    hub_model_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # Allow http(s) datasets on private/loopback addresses (tests and air-gapped setups only).
    allow_private_urls: bool = False
    max_dataset_bytes: int = 1 << 30
    max_dataset_rows: int = 1_000_000
    # Train with gralora.fast_forward (same parameters and outputs as peft, faster).
    fast_forward: bool = True
    # Buckets an s3:// dataset may come from (on s3_endpoint_url); empty: s3 datasets refused.
    dataset_s3_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Leases: a worker owns a running job while it renews its lease.
    lease_seconds: int = 120
    max_attempts: int = 3
    reaper_interval_seconds: int = 30
    # Minimum seconds between progress writes to the database.
    progress_interval_seconds: float = 2.0

    api_host: str = "127.0.0.1"
    api_port: int = 8000

    @field_validator("dataset_roots", "model_roots", "hub_model_allowlist", "dataset_s3_buckets",
                     mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, embedded SQLite when unset."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'gralora.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, an embedded SQLite transport when unset."""
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        """Local artifact folder."""
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_checkpoints_dir(self) -> Path:
        """Per-job checkpoint folders live under this."""
        return (self.checkpoints_dir or self.data_dir / "checkpoints").resolve()

    @property
    def resolved_cache_dir(self) -> Path:
        """Downloaded datasets are cached here."""
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def resolved_dataset_roots(self) -> list[Path]:
        """Dataset roots; default: data_dir/datasets and ./examples."""
        roots = self.dataset_roots or [self.data_dir / "datasets", Path("examples")]
        return [r.resolve() for r in roots]

    @property
    def resolved_model_roots(self) -> list[Path]:
        """Model roots; default: data_dir/models."""
        roots = self.model_roots or [self.data_dir / "models"]
        return [r.resolve() for r in roots]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache after changing the environment)."""
    return Settings()
