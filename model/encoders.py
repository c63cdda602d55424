"""Frozen encoders that turn robot observations and instructions into world-model inputs.

LingBot-VA reuses two pretrained, frozen components of Wan2.2-TI2V-5B; nothing here is trained:

* :class:`VideoVAE` wraps diffusers' ``AutoencoderKLWan`` (the Wan2.2 causal video VAE: 4x temporal, 16x spatial
  compression, 48 latent channels). Robot camera frames go in as uint8 ``(B, T, V, H, W, 3)``, exactly as LeRobot
  datasets and robot drivers deliver them; the V camera views are concatenated along the width before encoding (the
  paper: "the encoded views are concatenated along the width dimension"), so one latent grid carries every view.
  Latents come out normalised with the VAE config's ``latents_mean`` / ``latents_std`` as the Wan pipelines do, which
  is the space the transformer is trained in.
* :class:`TextEncoder` wraps a T5-family encoder (umT5-XXL for the real checkpoint) and its tokenizer. Instructions
  become fixed-length ``(B, L, D)`` embeddings plus a boolean mask, with padded positions zeroed like Wan does.

Both can be loaded from a local checkpoint directory (never from the Hub) or built as tiny, seeded, randomly
initialised models with the same structure, so that tests and CPU smoke runs need no weights and no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from transformers import (
    AutoConfig,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    UMT5EncoderModel,
)

from model.frame_vae import FrameVAE

__all__ = ["TextEncoder", "VideoVAE"]


def _resolve_component_dir(path: str | Path, subfolder: str, kind: str) -> Path:
    """Return the directory holding ``config.json`` for a component.

    Accepts either a diffusers pipeline root (``<root>/<subfolder>/config.json``) or the component folder itself, so
    callers can point at whatever checkpoint layout they downloaded.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"{kind} checkpoint directory does not exist: {str(root)!r}")
    for candidate in (root / subfolder, root):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(
        f"{kind} checkpoint directory {str(root)!r} has no config.json (looked in {str(root / subfolder)!r} and "
        f"{str(root)!r})"
    )


class VideoVAE(torch.nn.Module):
    """Frozen Wan2.2 video VAE: uint8 multi-view robot clips <-> normalised latents.

    Layouts:
        frames:  uint8 ``(B, T, V, H, W, 3)`` with ``T = 1 + 4k`` and ``H, W`` divisible by the spatial compression.
        latents: float32 ``(B, F, C, h, w)`` with ``F = 1 + (T - 1) / 4``, ``h = H / 16``, ``w = V * W / 16``.
    """

    def __init__(self, vae: AutoencoderKLWan | FrameVAE) -> None:
        super().__init__()
        self.vae = vae
        cfg = vae.config
        if isinstance(vae, FrameVAE):
            self._temporal, self._spatial = int(cfg.temporal_compression), 16
        else:
            # Derive the compression from the architecture rather than trusting scale_factor_* alone: older Wan2.1
            # configs leave them unset or inconsistent, while the block layout is what the model actually does.
            self._temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
            self._spatial = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        mean = torch.tensor(cfg.latents_mean or [0.0] * cfg.z_dim, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std or [1.0] * cfg.z_dim, dtype=torch.float32)
        if mean.numel() != cfg.z_dim or std.numel() != cfg.z_dim:
            raise ValueError(
                f"VAE config latents_mean/latents_std have {mean.numel()}/{std.numel()} values but z_dim is {cfg.z_dim}"
            )
        # Shaped for the (B, F, C, h, w) latent layout; not persistent because they belong to the VAE config.
        self.register_buffer("latents_mean", mean.view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, 1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> VideoVAE:
        """Load real VAE weights from a local directory (a pipeline root with ``vae/`` or the vae folder itself)."""
        vae_dir = _resolve_component_dir(path, "vae", "VAE")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        class_name = json.loads((vae_dir / "config.json").read_text()).get("_class_name")
        vae_cls = FrameVAE if class_name == FrameVAE.__name__ else AutoencoderKLWan
        return cls(vae_cls.from_pretrained(vae_dir, **kwargs))

    @classmethod
    def frame(cls, latent_channels: int = 48, dims: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> VideoVAE:
        """A randomly initialised :class:`~model.frame_vae.FrameVAE` (the embedded default's trainable encoder)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(FrameVAE(z_dim=latent_channels, dims=tuple(dims)))

    def with_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> VideoVAE:
        """Use per-channel latent standardisation ``(mu - mean) / std`` from now on, and store it in the VAE config
        (``latents_mean`` / ``latents_std``, as Wan's pipelines read them) so a saved copy applies the same numbers."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32).flatten(), torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels or not bool((std > 0).all()):
            raise ValueError(f"latent stats need {self.latent_channels} means and positive stds, got "
                             f"{mean.numel()} / {std.numel()}")
        self.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        self.latents_mean = mean.view(1, 1, -1, 1, 1).to(self.latents_mean.device)
        self.latents_std = std.view(1, 1, -1, 1, 1).to(self.latents_std.device)
        return self

    @torch.no_grad()
    def raw_latents(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Posterior means ``(B, F, C, h, w)`` before standardisation (what latent statistics are fitted on)."""
        return self.encode(frames) * self.latents_std + self.latents_mean

    @classmethod
    def small(
        cls,
        latent_channels: int = 48,
        base_dim: int = 16,
        num_res_blocks: int = 2,
        seed: int = 0,
    ) -> VideoVAE:
        """Tiny randomly initialised Wan2.2-structured VAE (4x temporal, 16x spatial) for tests and CPU smoke runs.

        Same block layout as Wan2.2-TI2V-5B (residual blocks, patch size 2, three spatial and two temporal
        downsamples) with narrow channels. The latent statistics are identity (mean 0, std 1) because a random
        network has no meaningful ones.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(
                base_dim=base_dim,
                decoder_base_dim=base_dim,
                z_dim=latent_channels,
                dim_mult=[1, 2, 4, 4],
                num_res_blocks=num_res_blocks,
                temperal_downsample=[False, True, True],
                is_residual=True,
                # patch_size=2 folds 2x2 pixels into channels, hence 3 * 2 * 2 = 12 in/out channels
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_temporal=4,
                scale_factor_spatial=16,
                latents_mean=[0.0] * latent_channels,
                latents_std=[1.0] * latent_channels,
            )
        return cls(vae)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the wrapped diffusers VAE (config + safetensors) so :meth:`from_pretrained` can reload it."""
        self.vae.save_pretrained(Path(path))

    # ------------------------------------------------------------------ properties

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def temporal_compression(self) -> int:
        return self._temporal

    @property
    def spatial_compression(self) -> int:
        return self._spatial

    @property
    def device(self) -> torch.device:
        return self.latents_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> VideoVAE:
        # Frozen encoder: a parent module's .train() must not flip it out of eval mode.
        return super().train(False)

    # ------------------------------------------------------------------ encode / decode

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (B, T, V, H, W, 3) in [0, 255], got dtype {frames.dtype}")
        if frames.ndim != 6:
            raise ValueError(
                f"frames must have 6 dims (B, T, V, H, W, 3), got ndim={frames.ndim} with shape {tuple(frames.shape)}"
            )
        _, t, v, h, w, c = frames.shape
        if c != 3:
            raise ValueError(f"frames must have 3 (RGB) channels last, got {c} in shape {tuple(frames.shape)}")
        if v < 1:
            raise ValueError(f"frames must have at least one camera view, got V={v}")
        tc, sc = self.temporal_compression, self.spatial_compression
        if t < 1 or (t - 1) % tc != 0:
            raise ValueError(f"number of frames T must be 1 + {tc}k for the causal VAE, got T={t}")
        if h % sc != 0 or w % sc != 0:
            raise ValueError(f"frame height and width must be divisible by {sc}, got H={h}, W={w}")

    @torch.no_grad()
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Encode uint8 frames ``(B, T, V, H, W, 3)`` into normalised latents ``(B, F, C, H/16, V*W/16)``.

        Uses the posterior mode (not a sample) so the same clip always maps to the same latents.
        """
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}")
        self._check_frames(frames)
        b, t, v, h, w, _ = frames.shape
        # (B, T, V, H, W, 3) -> (B, 3, T, H, V, W) -> (B, 3, T, H, V*W): views side by side, view 0 leftmost.
        x = frames.to(self.device).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, t, h, v * w)
        x = x.to(self.dtype) / 127.5 - 1.0
        mu = self.vae.encode(x).latent_dist.mode()  # (B, C, F, h, w)
        mu = mu.float().permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)
        return (mu - self.latents_mean) / self.latents_std

    def stream(self) -> LatentStream:
        """An incremental encoder for one episode (closed-loop control): see :class:`LatentStream`."""
        return LatentStream(self)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_views: int = 1) -> torch.Tensor:
        """Decode normalised latents ``(B, F, C, h, w)`` into uint8 frames ``(B, T, V, H, W, 3)``.

        ``num_views`` splits the decoded width back into the camera views that :meth:`encode` concatenated.
        """
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got dtype {latents.dtype}")
        if latents.ndim != 5:
            raise ValueError(
                f"latents must have 5 dims (B, F, C, h, w), got ndim={latents.ndim} with shape {tuple(latents.shape)}"
            )
        if latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"latents must have {self.latent_channels} channels at dim 2, got shape {tuple(latents.shape)}"
            )
        if num_views < 1 or latents.shape[-1] % num_views != 0:
            raise ValueError(f"latent width {latents.shape[-1]} is not divisible by num_views={num_views}")
        z = latents.to(self.device, torch.float32) * self.latents_std + self.latents_mean
        z = z.permute(0, 2, 1, 3, 4).to(self.dtype)  # (B, C, F, h, w)
        x = self.vae.decode(z).sample.float()  # (B, 3, T, H, V*W) in [-1, 1]
        b, _, t, h, vw = x.shape
        x = x.reshape(b, 3, t, h, num_views, vw // num_views).permute(0, 2, 4, 3, 5, 1)
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class LatentStream:
    """Causal, incremental VAE encoding of one episode's frames as they arrive.

    The Wan VAE encoder is causal: ``encode`` runs the first frame alone, then groups of 4 frames, carrying a cache of
    each causal convolution's last inputs. This class keeps that cache between calls, so pushing an episode's frames
    in any split (1 frame, then 16, then 3 + 1 ...) yields exactly the latents ``VideoVAE.encode`` gives for the whole
    clip, at the cost of encoding each frame once. Frames that do not yet complete a group wait for the next push.
    """

    def __init__(self, vae: VideoVAE) -> None:
        self.vae = vae
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        # FrameVAE has no temporal convolutions: a latent frame depends on its own group of frames only
        convs = 0 if isinstance(vae.vae, FrameVAE) else sum(isinstance(m, WanCausalConv3d) for m in vae.vae.encoder.modules())
        self._cache: list = [None] * convs
        self._pending: list[torch.Tensor] = []  # (V, H, W, 3) uint8 frames not yet encoded
        self._shape: tuple | None = None  # (V, H, W, 3) of this episode's frames
        self.frames_encoded = 0
        self.latents_emitted = 0

    @torch.no_grad()
    def push(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Append uint8 frames ``(T, V, H, W, 3)``; returns the latents ``(F, C, h, w)`` completed by them (F may be 0)."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if frames.ndim != 5:
            raise ValueError(f"frames must be (T, V, H, W, 3) uint8, got shape {tuple(frames.shape)}")
        self.vae._check_frames(frames[None, :1])  # dtype, channels, sizes
        if self._shape is not None and tuple(frames.shape[1:]) != self._shape:
            raise ValueError(f"frame shape {tuple(frames.shape[1:])} differs from this episode's {self._shape}")
        self._shape = tuple(frames.shape[1:])
        self._pending.extend(frames.unbind(0))
        out = []
        tc = self.vae.temporal_compression
        while self._pending:
            need = 1 if self.frames_encoded == 0 else tc
            if len(self._pending) < need:
                break
            group, self._pending = torch.stack(self._pending[:need]), self._pending[need:]
            out.append(self._encode_group(group))
            self.frames_encoded += need
        if not out:
            v, h, w, _ = self._shape
            sc = self.vae.spatial_compression
            return torch.zeros(0, self.vae.latent_channels, h // sc, v * w // sc)
        latents = torch.cat(out)
        self.latents_emitted += latents.shape[0]
        return latents

    def _encode_group(self, group: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        vae = self.vae.vae
        t, v, h, w, _ = group.shape
        x = group.to(self.vae.device).permute(4, 0, 2, 1, 3).reshape(1, 3, t, h, v * w)
        x = x.to(self.vae.dtype) / 127.5 - 1.0
        if isinstance(vae, FrameVAE):
            mu = vae.moments(x, first=self.frames_encoded == 0).chunk(2, dim=1)[0]
            mu = mu.float().permute(0, 2, 1, 3, 4)
            return ((mu - self.vae.latents_mean) / self.vae.latents_std)[0]
        if vae.config.patch_size is not None:
            x = patchify(x, patch_size=vae.config.patch_size)
        out = vae.encoder(x, feat_cache=self._cache, feat_idx=[0])
        mu = vae.quant_conv(out).chunk(2, dim=1)[0]  # the posterior mode, as in encode()
        mu = mu.float().permute(0, 2, 1, 3, 4)  # (1, F, C, h, w)
        return ((mu - self.vae.latents_mean) / self.vae.latents_std)[0]


class TextEncoder(torch.nn.Module):
    """Frozen T5-family text encoder: instructions -> ``(B, L, D)`` float32 embeddings and ``(B, L)`` bool mask."""

    def __init__(
        self,
        model: T5EncoderModel | UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 512,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_length: int = 512, torch_dtype: torch.dtype | None = None
    ) -> TextEncoder:
        """Load tokenizer + encoder from a local directory.

        ``path`` is either a diffusers pipeline root (``text_encoder/`` and ``tokenizer/`` subfolders) or one folder
        holding both. umT5 configs (Wan's text encoder) load as ``UMT5EncoderModel``, anything else as T5.
        """
        model_dir = _resolve_component_dir(path, "text_encoder", "Text encoder")
        root = Path(path).expanduser()
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = UMT5EncoderModel if config.model_type == "umt5" else T5EncoderModel
        kwargs: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = model_cls.from_pretrained(model_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, max_length=max_length)

    @classmethod
    def small(
        cls, width: int = 64, layers: int = 2, heads: int = 4, max_length: int = 32, seed: int = 0
    ) -> TextEncoder:
        """Tiny randomly initialised T5 encoder with a byte-level tokenizer (needs no vocab file, so no download)."""
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        tokenizer = ByT5Tokenizer()
        config = T5Config(
            # len() rather than vocab_size: ByT5's 125 extra sentinel ids sit above its 256 byte ids.
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // heads,
            d_ff=2 * width,
            num_layers=layers,
            num_heads=heads,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(self, path: str | Path) -> None:
        """Write model and tokenizer into one folder so :meth:`from_pretrained` can reload both."""
        self.model.save_pretrained(Path(path))
        self.tokenizer.save_pretrained(Path(path))

    # ------------------------------------------------------------------ properties

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen encoder: a parent module's .train() must not flip it out of eval mode (T5 has dropout).
        return super().train(False)

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode instructions to ``(emb (B, L, D) float32, mask (B, L) bool)`` with ``L = max_length``.

        Padded positions are zeroed (as in Wan) so downstream cross-attention sees exact zeros even if it ignores the
        mask. The empty string is valid and is what classifier-free guidance uses as the unconditional prompt.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        if len(texts) == 0:
            raise ValueError("texts must contain at least one string")
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)  # (B, L)
        mask = tokens["attention_mask"].to(self.device).bool()  # (B, L)
        emb = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, L, D)
        emb = emb * mask.unsqueeze(-1)
        return emb, mask
