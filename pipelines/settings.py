"""Runtime settings of the lifecycle steps, read from the environment (``LINGBOT_...``) and ``.env``.

Model shape lives in ``model.config`` presets; everything here is about where data lives and how a step runs.
Command-line flags override these; what ran is logged with every run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.data.embodiments import METAWORLD_CAMERAS

REPO_ROOT = Path(__file__).resolve().parent.parent


class DataSettings(BaseSettings):
    """Data steps: collect -> prepare -> encode -> loader."""

    model_config = SettingsConfigDict(env_prefix="LINGBOT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(REPO_ROOT / "data", description="root of every generated artefact (ignored by git)")
    suite: str = Field("metaworld", description="simulator suite to collect from")
    tasks: str = Field("MT10", description="MT10, MT50 or comma-separated task names")
    episodes: int = Field(50, ge=1, description="successful demonstrations per task")
    image_size: int = Field(96, ge=16, description="rendered camera image size (pixels, square)")
    cameras: str = Field(",".join(METAWORLD_CAMERAS),
                         description="comma-separated views to render: scene cameras or derived views (corner4_zoom)")
    seed: int = Field(0, description="seed of collection, splits and sampling")
    workers: int = Field(2, ge=1, description="parallel processes for collection")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation share of each dataset's episodes")
    preset: str = Field("small", description="model preset whose latent/text widths the encoders must produce")
    vae_path: Path | None = Field(None, description="local Wan2.2 VAE directory; None = small random VAE (CPU)")
    text_encoder_path: Path | None = Field(None, description="local T5/umT5 directory; None = small random encoder")
    shard_episodes: int = Field(32, ge=1, description="episodes per latent shard file")
    min_latent_frames: int = Field(2, ge=2, description="episodes with fewer latent frames are quarantined")

    @property
    def episodes_dir(self) -> Path:
        return self.data_dir / "episodes"

    @property
    def prepared_dir(self) -> Path:
        return self.data_dir / "prepared"

    @property
    def latents_dir(self) -> Path:
        return self.data_dir / "latents"

    @property
    def feast_dir(self) -> Path:
        return self.data_dir / "feast"
