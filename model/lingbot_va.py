"""LingBot-VA: an autoregressive video-action world model on a Mixture-of-Transformers (paper §3).

Public API (the only thing pipelines and services call):
  * ``LingBotVA(config)`` / ``LingBotVA.from_pretrained(dir)`` / ``model.save_pretrained(dir)`` (the network alone; a
    policy with its normalisation, encoders and action space is a ``model.bundle.PolicyBundle``)
  * ``model.compute_loss(batch) -> {"loss", "dyn", "inv", "fdm"}`` — teacher forcing in one forward pass
  * ``model.session(text, action_mask, ...) -> Session`` — KV-cache inference (Alg. 1) with an FDM pass (Alg. 2)

Conventions. Flow time s in [0, 1]: s = 0 is noise, s = 1 data, x_s = (1 - s) * eps + s * x (paper §2.1). The
network keeps Wan's parameterisation so Wan2.2 weights keep their meaning: it is fed the timestep
t = 1000 * (1 - s) and predicts u = eps - x, i.e. the velocity along s is -u.

Shape legend: B rows, F latent frames, C latent channels, H/W latent height/width, L tokens, N actions, A = 30.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import LingBotConfig
from model.init import init_action_block_from_video, init_action_conditioning_from_video, resample
from model.layers import (
    DIFFUSERS_NAMES,
    MLP,
    ActionBlock,
    MoTBlock,
    OutputHead,
    RotaryEmbedding3D,
    TimeConditioning,
    VideoBlock,
    apply_rope,
    gelu_tanh,
)
from model.masks import CLEAN, TokenMeta, allowed, mask_mod
from model.sequence import build_training_sequence
from model.session import Session
from model.tokens import KVCache, Tokens

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def attention_mask(q_meta: TokenMeta, k_meta: TokenMeta, window: int | None, device, backend: str = "auto"):
    """The chunk-causal rule for one model pass, built once and shared by every layer.

    backend "auto": a block-sparse flex-attention ``BlockMask`` on GPU for long sequences, a dense boolean mask
    (B, 1, Lq, Lk) for SDPA otherwise; "sdpa" / "flex" force one (eager flex runs on CPU too, which is how its
    equivalence is tested).
    """
    Lq, Lk = q_meta.length, k_meta.length
    use_flex = backend == "flex" or (backend == "auto" and torch.device(device).type == "cuda" and Lq >= 128)
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod(q_meta, k_meta, window), q_meta.chunk.shape[0], None, Lq, Lk, device=device)
    return allowed(q_meta, k_meta, window)[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Joint self-attention (B, L, H, D) under ``mask`` (from ``attention_mask``)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        out = (_compiled_flex() if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)
    return out.transpose(1, 2)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX


def _layer(blk: MoTBlock, xv, xa, proj_v, proj_a, cos, sin, past, mask, ctx, ctx_mask):
    """One MoT layer: each stream's own projections, one joint attention, each stream's own output and FFN."""
    qkv = []
    if xv is not None:
        qkv_v, mod_v = blk.video.pre_attention(xv, proj_v)
        qkv.append(qkv_v)
    if xa is not None:
        qkv_a, mod_a = blk.action.pre_attention(xa, proj_a)
        qkv.append(qkv_a)
    q, k, v = (torch.cat(t, dim=1) if len(t) > 1 else t[0] for t in zip(*qkv, strict=True))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1))
    o = _attend(q, k_all, v_all, mask).flatten(2)
    lv = 0 if xv is None else xv.shape[1]
    if xv is not None:
        xv = blk.video.post_attention(xv, o[:, :lv], mod_v, ctx, ctx_mask)
    if xa is not None:
        xa = blk.action.post_attention(xa, o[:, lv:], mod_a)
    return xv, xa, k, v


class LingBotVA(nn.Module):
    """Video stream (Wan2.2 layout) + action stream of the same depth, joined by attention in every layer."""

    def __init__(self, config: LingBotConfig):
        super().__init__()
        c = self.config = config
        # video stream (names follow diffusers' WanTransformer3DModel where they exist)
        self.patch_embedding = nn.Conv3d(c.latent_channels, c.video_dim, c.patch_size, stride=c.patch_size)
        self.video_time = TimeConditioning(c.freq_dim, c.video_dim)
        self.text_embedder = MLP(c.text_dim, c.video_dim, c.video_dim, gelu_tanh, DIFFUSERS_NAMES)
        self.video_out = OutputHead(c.video_dim, nn.Linear(c.video_dim, c.patch_dim), c.eps)
        # action stream
        self.action_in = MLP(2 * c.action_channels, c.action_mlp_hidden, c.action_dim)
        self.action_time = TimeConditioning(c.freq_dim, c.action_dim)
        self.action_out = OutputHead(
            c.action_dim, MLP(c.action_dim, c.action_mlp_hidden, c.action_channels), c.eps
        )
        self.blocks = nn.ModuleList(
            MoTBlock(
                VideoBlock(c.video_dim, c.video_ffn_dim, c.num_heads, c.eps),
                ActionBlock(c.action_dim, c.video_dim, c.action_ffn_dim, c.num_heads, c.eps),
            )
            for _ in range(c.num_layers)
        )
        self.rope = RotaryEmbedding3D(c.head_dim, c.rope_theta)
        self.activation_checkpointing = False  # set by the training wrapper (pipelines/train/parallelize.py)
        self._compiled_layer = None  # set by compile_layers()
        if c.action_init == "interpolate" and not _on_meta(self):
            self.init_action_stream_from_video()

    # ------------------------------------------------------------------------------------------- parameters
    def init_action_stream_from_video(self) -> None:
        """Paper §3.3: interpolate the video weights to d_a and scale by sqrt(d_v / d_a)."""
        for blk in self.blocks:
            init_action_block_from_video(blk.action, blk.video)
        init_action_conditioning_from_video(self.action_time, self.video_time)
        with torch.no_grad():
            head = self.action_out.scale_shift_table
            head.copy_(resample(self.video_out.scale_shift_table, tuple(head.shape)))

    def compile_layers(self, **compile_kwargs) -> None:
        """Compile the per-layer function with ``torch.compile`` (fuses modulation, norms, RoPE and attention on GPU).

        Every layer shares one compiled graph; shapes vary from step to step, so it is compiled with dynamic shapes.
        """
        compile_kwargs.setdefault("dynamic", True)
        self._compiled_layer = torch.compile(_layer, **compile_kwargs)

    def stream_parameters(self) -> dict[str, int]:
        """Parameter counts: {'video_stream', 'action_stream', 'total'}."""
        video = action = 0
        for name, p in self.named_parameters():
            if name.startswith("action_") or ".action." in name:
                action += p.numel()
            else:
                video += p.numel()
        return {"video_stream": video, "action_stream": action, "total": video + action}

    # ------------------------------------------------------------------------------------------- embedding
    def patchify(self, z_BFCHW: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) -> (B, F*h*w, ph*pw*C) in the order proj_out produces (Wan's unpatchify order)."""
        B, Fr, C, H, W = z_BFCHW.shape
        _, ph, pw = self.config.patch_size
        x = z_BFCHW.reshape(B, Fr, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 4, 6, 2)
        return x.reshape(B, Fr * (H // ph) * (W // pw), ph * pw * C)

    def unpatchify(self, x_BLP: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        B = x_BLP.shape[0]
        _, ph, pw = self.config.patch_size
        h, w = height // ph, width // pw
        x = x_BLP.reshape(B, frames, h, w, ph, pw, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, frames, -1, height, width)

    def embed_video(self, z_BFCHW: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(z_BFCHW.transpose(1, 2).to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def embed_actions(self, a_BNA: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Actions (B, N, A) with their channel mask (B, A) or per token (B, N, A) -> (B, N, d_a)."""
        m = (mask[:, None, :] if mask.ndim == 2 else mask).to(a_BNA.dtype).expand_as(a_BNA)
        return self.action_in(torch.cat([a_BNA * m, m], dim=-1).to(self.action_in.fc1.weight.dtype))

    def embed_text(self, text_BTD: torch.Tensor) -> torch.Tensor:
        return self.text_embedder(text_BTD.to(self.text_embedder.linear_1.weight.dtype))

    def video_positions(self, frame_pos_F: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """RoPE positions (F*h*w, 3) of the tokens of frames at (float) times frame_pos_F."""
        _, ph, pw = self.config.patch_size
        h, w = height // ph, width // pw
        f = frame_pos_F.double()[:, None, None].expand(-1, h, w)
        hh = torch.arange(h, dtype=torch.float64, device=f.device)[None, :, None].expand_as(f)
        ww = torch.arange(w, dtype=torch.float64, device=f.device)[None, None, :].expand_as(f)
        return torch.stack([f, hh, ww], dim=-1).reshape(-1, 3)

    def action_positions(self, first_interval: int, n: int, height: int, width: int, device=None) -> torch.Tensor:
        """Action j of interval f (frames f -> f+1) sits at time f + (j+1)/(tau+1), spatially at the grid centre."""
        tau = self.config.tau
        j = torch.arange(n, dtype=torch.float64, device=device)
        t = first_interval + torch.div(j, tau, rounding_mode="floor") + (j % tau + 1) / (tau + 1)
        _, ph, pw = self.config.patch_size
        hc, wc = (height // ph - 1) / 2, (width // pw - 1) / 2
        return torch.stack([t, torch.full_like(t, hc), torch.full_like(t, wc)], dim=-1)

    # ------------------------------------------------------------------------------------------- core pass
    def run(
        self,
        video: Tokens | None,
        action: Tokens | None,
        context_BTd: torch.Tensor,
        context_mask_BLT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_kv: bool = False,
        window_chunks: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
        """One pass of the MoT over new tokens (attending to ``cache`` if given).

        ``window_chunks`` overrides config.attn_window_chunks (a session bounding its cache must mask the same way).

        Returns the streams' outputs (video (B, Lv, patch_dim), action (B, La, A)) and, if ``return_kv``, the
        per-layer (k, v) of the new tokens for caching.
        """
        dtype = next(self.parameters()).dtype
        parts = [p for p in (video, action) if p is not None]
        q_meta = TokenMeta.cat([p.meta for p in parts])
        k_meta = q_meta if cache is None or cache.meta is None else TokenMeta.cat([cache.meta, q_meta])
        cos, sin = self.rope(torch.cat([p.pos for p in parts], dim=1))
        xv = xa = temb_v = proj_v = temb_a = proj_a = None
        if video is not None:
            temb_v, proj_v = self.video_time(video.t, dtype)
            xv = video.x.to(dtype)
        if action is not None:
            temb_a, proj_a = self.action_time(action.t, dtype)
            xa = action.x.to(dtype)
        window = self.config.attn_window_chunks if window_chunks is None else window_chunks
        mask = attention_mask(q_meta, k_meta, window, cos.device)
        layer = self._compiled_layer or _layer
        new_kv = []
        for i, blk in enumerate(self.blocks):
            past = None if cache is None or cache.meta is None else (cache.k[i], cache.v[i])
            args = (blk, xv, xa, proj_v, proj_a, cos, sin, past, mask, context_BTd, context_mask_BLT)
            if self.activation_checkpointing and torch.is_grad_enabled():
                xv, xa, k, v = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                xv, xa, k, v = layer(*args)
            if return_kv:
                new_kv.append((k, v))
        out_v = None if xv is None else self.video_out(xv, temb_v)
        out_a = None if xa is None else self.action_out(xa, temb_a)
        return out_v, out_a, new_kv

    def forward_wan(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """The video stream alone, with diffusers ``WanTransformer3DModel.forward``'s signature and output.

        hidden_states (B, C, F, H, W), timestep (B,) or (B, F*h*w) in Wan units, text (B, T, text_dim). All tokens
        attend to each other (one chunk), exactly like Wan. Used by the parity test and for video-only use.
        """
        B, _, Fr, H, W = hidden_states.shape
        z = hidden_states.transpose(1, 2)
        x = self.embed_video(z)
        L = x.shape[1]
        t = timestep.float().reshape(B, -1).expand(B, L) if timestep.ndim == 1 else timestep.float()
        pos = self.video_positions(torch.arange(Fr, device=x.device), H, W)[None].expand(B, -1, -1)
        tokens = Tokens(x, t, pos, TokenMeta.full(B, L, 0, CLEAN, device=x.device))
        out, _, _ = self.run(tokens, None, self.embed_text(encoder_hidden_states))
        return self.unpatchify(out, Fr, H, W).transpose(1, 2)

    # ------------------------------------------------------------------------------------------- training
    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced flow-matching losses over whole episodes in one forward pass.

        batch:
          video       (B, F, C, H, W) float  normalised VAE latents, F >= 2
          actions     (B, (F-1)*tau, A) float normalised actions (tau actions between consecutive latent frames)
          action_mask (B, A) bool            channels that exist for the sample's embodiment
          text        (B, T, text_dim) float instruction embeddings (zero padded)
          num_frames  (B,) int, optional     valid frames per episode when episodes are padded to F
          row         (B,) int, optional     packed row of each episode (several episodes share one sequence)
          chunk_size  int, optional          K for this step; sampled from config.train_chunk_sizes otherwise
        Returns {"loss", "dyn", "inv", "fdm"}; "fdm" is 0 unless config.fdm_loss_weight > 0.
        """
        seq = build_training_sequence(self, batch, generator)
        out_v, out_a, _ = self.run(seq.video, seq.action, seq.context, seq.context_mask)
        err_v = (out_v.float() - seq.video_target).pow(2).mean(-1)  # (B, Lv)
        dyn = (err_v * seq.dyn_weight).sum() / seq.dyn_weight.sum().clamp_min(1)
        fdm = (err_v * seq.fdm_weight).sum() / seq.fdm_weight.sum().clamp_min(1)
        err_a = (out_a.float() - seq.action_target).pow(2) * seq.action_channel_mask  # (B, La, A)
        inv = err_a.sum() / seq.action_channel_mask.sum().clamp_min(1)
        c = self.config
        loss = dyn + c.inv_loss_weight * inv + (c.fdm_loss_weight * fdm if c.fdm_loss_weight > 0 else 0.0)
        return {"loss": loss, "dyn": dyn.detach(), "inv": inv.detach(), "fdm": fdm.detach()}

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``compute_loss``: the training forward, so wrappers that call the module (DeepSpeed, DDP) work."""
        return self.compute_loss(batch, generator)

    # ------------------------------------------------------------------------------------------- inference
    def session(self, text: torch.Tensor, action_mask: torch.Tensor, **kwargs) -> Session:
        """A per-episode KV-cache inference session (see ``model.session.Session``)."""
        return Session(self, text, action_mask, **kwargs)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | os.PathLike, *,
                        write_files: Callable[[Path], None] | None = None) -> Path:
        """The network alone, atomically (a crash never leaves a half-written directory): model.safetensors +
        config.json (``format_version`` and the model config), what ``from_pretrained`` (and post-training's
        ``--init-from``) reads.

        ``write_files(tmp)`` may add to the directory before it is moved into place: ``model.bundle.PolicyBundle.save``
        adds what serving needs (normalisation, action space, VAE, instruction embeddings) this way.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {"format_version": FORMAT_VERSION, "model": self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if write_files is not None:
                write_files(tmp)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> LingBotVA:
        """The network of a directory written by ``save_pretrained`` (or of a policy bundle, which holds one)."""
        config = LingBotConfig.from_dict(read_checkpoint_meta(directory)["model"])
        model = cls(config.replace(action_init="random"))  # weights are loaded next; skip the init work
        model.config = config
        state = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(map_location)


def read_checkpoint_meta(directory: str | os.PathLike) -> dict:
    """config.json of a model directory, validated."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{directory} is not a LingBot-VA model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {meta.get('format_version')!r}; this code reads bundle "
                         f"version {FORMAT_VERSION}")
    if "model" not in meta:
        raise ValueError(f"{cfg_path} (bundle version {FORMAT_VERSION}) has no model config")
    return meta


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())



__all__ = ["LingBotVA", "read_checkpoint_meta"]
