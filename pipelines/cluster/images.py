"""The platform's container images: which Dockerfile builds which image, and the roles each one serves."""

from __future__ import annotations

from pathlib import Path

CPU_IMAGE = "lingbot-va"
"""Data steps (DVC, encoding), the simulation gate (MuJoCo + OSMesa), the robot client and the fleet simulator."""
GPU_IMAGE = "lingbot-va-cuda"
"""Pre/post-training (torchrun + DeepSpeed over NCCL) and the policy server on edge GPU nodes."""

IMAGES: dict[str, Path] = {
    CPU_IMAGE: Path("infra/docker/Dockerfile"),
    GPU_IMAGE: Path("infra/docker/Dockerfile.cuda"),
}
"""Image name -> its Dockerfile (relative to the repository root, which is the build context)."""
