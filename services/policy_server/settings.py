"""Settings of the policy server, read from the environment (``LINGBOT_SERVE_...``, then the root's
``LINGBOT_DATA_DIR`` / ``LINGBOT_TRACKING_URI``) and ``.env``.

kserve's standard flags (ports, workers, gRPC message sizes ...) stay kserve's (``kserve.model_server.parser``);
these are the policy server's own. Command-line flags of ``lingbot serve`` override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from pipelines.settings import PlatformSettings, settings_config
from services.protocol import DEFAULT_MODEL_NAME


class ServeSettings(PlatformSettings):
    """What ``lingbot serve`` loads, where it listens and how it batches, bounds and updates its sessions."""

    model_config = settings_config("LINGBOT_SERVE_")

    model: str | None = Field(None, description="models:/<name>@<alias>, models:/<name>/<version> or a model "
                                                "directory; an alias is followed as it moves (hot swap)")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="V2 model name on the endpoint path")
    host: str = Field("127.0.0.1", description="interface REST and gRPC bind to; 0.0.0.0 only behind auth/a mesh")
    token: SecretStr | None = Field(None, description="bearer token required on inference calls (None: no auth); "
                                                      "from the environment or token_file, never the command line")
    token_file: Path | None = Field(None, description="file holding the bearer token (its content, stripped); "
                                                      "overrides token")
    device: str = Field("cpu", description="torch device of the model")
    seed: int = Field(0, description="base seed of the sessions' flow samplers (mixed with the session id)")

    batching: bool = Field(True, description="run concurrent sessions' model passes as one batch")
    max_batch_size: int = Field(8, ge=1, description="most requests one batch serves")
    max_wait_ms: float = Field(5.0, ge=0.0, description="how long a batch waits for more requests after the first")
    active_session_s: float = Field(1.0, ge=0.0, description="a session that sent a request this recently may join "
                                                            "a batch; the batching window closes once the batch "
                                                            "holds all of them (0: always wait max_wait_ms)")

    max_sessions: int = Field(64, ge=1, description="sessions kept; the least recently used one is evicted beyond")
    session_ttl_s: float = Field(600.0, gt=0.0, description="a session idle this long is evicted")
    max_session_memory_mb: float = Field(0.0, ge=0.0, description="cap on the sessions' KV-cache + VAE-cache memory; "
                                                                  "least recently used sessions are evicted beyond "
                                                                  "(0: no cap)")
    max_request_mb: float = Field(64.0, gt=0.0, description="largest request body / gRPC message accepted")

    poll_interval_s: float = Field(30.0, ge=0.0, description="how often a registry alias is checked for a new "
                                                             "version (0: never)")
    old_sessions: Literal["finish", "reset"] = Field("finish", description="on a model switch, sessions begun on "
                                                                            "the old version finish on it or are "
                                                                            "told to reset")
    max_live_models: int = Field(2, ge=1, description="model versions kept in memory at once; sessions on an older "
                                                      "one are told to reset")

    @model_validator(mode="after")
    def _read_token_file(self) -> ServeSettings:
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as err:
                raise ValueError(f"token_file {self.token_file}: {err.strerror}") from None
            if not token:
                raise ValueError(f"token_file {self.token_file} is empty")
            self.token = SecretStr(token)
        return self

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_session_memory_bytes(self) -> int:
        return int(self.max_session_memory_mb * 2**20)
