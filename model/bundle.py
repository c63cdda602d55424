"""The policy bundle: a model directory as one typed, versioned object, the contract between training, the gate, the
policy server and the registry.

    bundle = PolicyBundle.load("data/runs/posttrain-reach-v3/model")   # ValueError naming what is wrong
    bundle.model, bundle.vae, bundle.text["reach-v3"]                   # network, VAE (+ latent stats), instruction
    bundle.normalization["metaworld-sawyer"].normalizer                 # action normaliser of an embodiment
    bundle.action_space.cameras, bundle.image_size                      # what the robot sends
    bundle.save(out)                                                    # atomically; load(save(b)) == b

On disk, bundle version 1 (``config.json``'s ``format_version``; every directory training has written so far):

    config.json                  {"format_version": 1,
                                  "model": LingBotConfig.to_dict(),
                                  "normalization": a feature snapshot (format "lingbot.features/v1") of the one
                                                   embodiment, or {"embodiments": {name: snapshot}} for several,
                                  "action_space": {"embodiments": [...], "tasks": [...], "tau": int,
                                                   "instructions": {task: text}, "observation": {"cameras": [...],
                                                   "latent_hw": [h, w]}},
                                  "extra": {...}}  provenance (stage, settings, data version, encoders); not read back
    model.safetensors            the network's weights
    vae/                         the video VAE the training latents came from, their standardisation in its config
    text_embeddings.safetensors  one instruction embedding (T, text_dim) per task

A directory of another shape (no ``vae/`` or instruction embeddings, normalisation as a bare ``ActionNormalizer`` dict
or under ``"action"``, an action space without cameras) is refused with a ``ValueError`` that names the bundle
version and what was found. ``LingBotVA.save_pretrained`` writes the network part alone (what ``--init-from`` needs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import LingBotConfig
from model.encoders import VideoVAE
from model.lingbot_va import CONFIG_NAME, FORMAT_VERSION, LingBotVA, read_checkpoint_meta
from model.normalization import SNAPSHOT_FORMAT, EmbodimentNorm

BUNDLE_VERSION = FORMAT_VERSION
"""The bundle version a directory carries as ``config.json``'s ``format_version`` (the network-only directories of
``LingBotVA.save_pretrained`` carry the same number and lack the policy parts)."""
VAE_DIR = "vae"
TEXT_FILE = "text_embeddings.safetensors"


@dataclass(frozen=True)
class ActionSpace:
    """What a bundle acts on and sees: ``config.json``'s ``action_space``."""

    embodiments: tuple[str, ...]
    tasks: tuple[str, ...]
    tau: int
    """Actions per latent frame."""
    instructions: Mapping[str, str | None]
    """Task -> the instruction text it was trained with."""
    cameras: tuple[str, ...]
    """Camera names in the order the views sit side by side in a latent frame (and in a request's images)."""
    latent_hw: tuple[int, int]
    """(h, w) of a latent frame of all views."""

    def __post_init__(self) -> None:
        if not self.embodiments:
            raise ValueError(f"bundle version {BUNDLE_VERSION}: the action space names no embodiment")
        if not self.cameras:
            raise ValueError(f"bundle version {BUNDLE_VERSION}: the action space names no camera")
        if len(self.latent_hw) != 2:
            raise ValueError(f"bundle version {BUNDLE_VERSION}: latent_hw must be (h, w), got {self.latent_hw}")

    @classmethod
    def from_dict(cls, space: Any, where: str = "action_space") -> ActionSpace:
        """The on-disk ``action_space`` entry; ``where`` names it in errors."""
        if not isinstance(space, Mapping):
            raise ValueError(f"{where} must be a dict, found {type(space).__name__}")
        observation = space.get("observation")
        missing = [k for k in ("embodiments", "tasks", "tau", "instructions", "observation") if space.get(k) is None]
        if isinstance(observation, Mapping):
            missing += [f"observation.{k}" for k in ("cameras", "latent_hw") if observation.get(k) is None]
        if missing:
            raise ValueError(f"{where} lacks {missing} (found keys {sorted(space)})")
        try:
            return cls(tuple(space["embodiments"]), tuple(space["tasks"]), int(space["tau"]),
                       dict(space["instructions"]), tuple(observation["cameras"]),
                       tuple(int(x) for x in observation["latent_hw"]))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"embodiments": list(self.embodiments), "tasks": list(self.tasks), "tau": self.tau,
                "instructions": dict(self.instructions),
                "observation": {"cameras": list(self.cameras), "latent_hw": list(self.latent_hw)}}


@dataclass(frozen=True, eq=False)
class PolicyBundle:
    """A trained policy: the network (and its config), the VAE with its latent statistics, the instruction embeddings,
    one action normaliser per embodiment and the action space. ``save`` / ``load`` are its only reader and writer."""

    model: LingBotVA
    vae: VideoVAE
    text: Mapping[str, torch.Tensor]
    """Task -> instruction embedding (T, text_dim), on the CPU."""
    normalization: Mapping[str, EmbodimentNorm]
    """Embodiment -> its action normaliser and channel mask; one per ``action_space.embodiments``."""
    action_space: ActionSpace
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Provenance written by training (stage, settings, data version, encoders); carried, never interpreted."""

    def __post_init__(self) -> None:
        if set(self.normalization) != set(self.action_space.embodiments):
            raise ValueError(f"bundle version {BUNDLE_VERSION}: the normalisation covers embodiments "
                             f"{sorted(self.normalization)}, the action space {list(self.action_space.embodiments)}")

    @property
    def config(self) -> LingBotConfig:
        return self.model.config

    @property
    def embodiment(self) -> str:
        """The one embodiment a policy of this bundle drives; ValueError when it covers several."""
        if len(self.action_space.embodiments) != 1:
            raise ValueError(f"the bundle covers embodiments {list(self.action_space.embodiments)}; a closed-loop "
                             "policy needs exactly one")
        return self.action_space.embodiments[0]

    @property
    def tasks(self) -> list[str]:
        """The tasks it has an instruction embedding for (what a robot may ask of it)."""
        return sorted(self.text)

    @property
    def image_size(self) -> int:
        """Side of the square camera views it was trained on, in pixels (the views sit side by side in a latent)."""
        return self.action_space.latent_hw[0] * self.vae.spatial_compression

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write bundle version ``BUNDLE_VERSION`` to ``directory``, atomically (it replaces what was there)."""
        return self.model.save_pretrained(directory, write_files=self._write_policy)

    def _write_policy(self, tmp: Path) -> None:
        norms = [self.normalization[name] for name in self.action_space.embodiments]
        normalization = (norms[0].snapshot if len(norms) == 1
                         else {"embodiments": {n.embodiment: n.snapshot for n in norms}})
        meta = {"format_version": BUNDLE_VERSION, "model": self.config.to_dict(), "normalization": normalization,
                "action_space": self.action_space.to_dict(), "extra": dict(self.extra)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        save_file({task: emb.contiguous() for task, emb in self.text.items()}, str(tmp / TEXT_FILE))
        self.vae.save_pretrained(tmp / VAE_DIR)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> PolicyBundle:
        """The bundle in ``directory`` with the network and the VAE on ``device``; ValueError for anything that is
        not bundle version ``BUNDLE_VERSION``, naming what was found."""
        directory = Path(directory)
        meta = read_checkpoint_meta(directory)  # config.json + weights present, format_version known
        missing = [p for p, present in ((f"{VAE_DIR}/", (directory / VAE_DIR).is_dir()),
                                        (TEXT_FILE, (directory / TEXT_FILE).is_file())) if not present]
        if missing:
            raise ValueError(f"{directory} is not a policy bundle (version {BUNDLE_VERSION}): it has no "
                             f"{' or '.join(missing)}; it was written by an older trainer or holds the network alone "
                             "(LingBotVA.save_pretrained): retrain or post-train it to get a self-contained directory")
        where = f"{directory / CONFIG_NAME} (bundle version {BUNDLE_VERSION})"
        space = ActionSpace.from_dict(meta.get("action_space"), f"{where}: action_space")
        normalization = read_normalization(meta.get("normalization"), where)
        model = LingBotVA.from_pretrained(directory, map_location=device)
        vae = VideoVAE.from_pretrained(directory / VAE_DIR).to(device)
        try:
            return cls(model=model, vae=vae, text=load_file(str(directory / TEXT_FILE)), normalization=normalization,
                       action_space=space, extra=meta.get("extra") or {})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def read_normalization(norm: Any, where: str = "normalization") -> dict[str, EmbodimentNorm]:
    """Embodiment -> normaliser of a bundle's ``normalization`` entry: one feature snapshot, or
    ``{"embodiments": {name: snapshot}}``. The shapes older code also took (an ``ActionNormalizer`` dict, bare or
    under ``"action"``) are refused."""
    if isinstance(norm, Mapping) and norm.get("format") == SNAPSHOT_FORMAT:
        one = EmbodimentNorm.from_snapshot(norm, f"{where}: normalization")
        return {one.embodiment: one}
    if isinstance(norm, Mapping) and set(norm) == {"embodiments"} and isinstance(norm["embodiments"], Mapping):
        out = {name: EmbodimentNorm.from_snapshot(snap, f"{where}: normalization.embodiments[{name!r}]")
               for name, snap in norm["embodiments"].items()}
        wrong = {name: n.embodiment for name, n in out.items() if n.embodiment != name}
        if wrong:
            raise ValueError(f"{where}: normalization.embodiments keys do not name their snapshots' embodiments: {wrong}")
        return out
    found = f"keys {sorted(norm)}" if isinstance(norm, Mapping) else repr(norm)
    raise ValueError(f"{where}: normalization must be a feature snapshot (format {SNAPSHOT_FORMAT!r}) or "
                     f"{{'embodiments': {{name: snapshot}}}}, found {found}; older shapes (an ActionNormalizer dict, "
                     "bare or under 'action') are no longer read: retrain or post-train the model")


__all__ = ["BUNDLE_VERSION", "TEXT_FILE", "VAE_DIR", "ActionSpace", "PolicyBundle", "read_normalization"]
