"""The sampler: Euler integration of the flow with classifier-free guidance, for one session or many at once.

A policy server holds one session (``model.session.Session``) per robot. Every pass here runs the sessions' model
evaluations together: each session contributes its own rows (instruction and, under CFG, the null instruction) to
one batch, so a denoising step is one model pass for all robots; a session's own ``predict_chunk`` / ``imagine`` is
the one-session case. The sessions share the model and the sampler settings (their callers check); each draws its
noise from its own generator, session by session in list order, video before actions.

The network predicts u = eps - x (Wan), so along the flow time s (1 = data) the velocity is d x / d s = -u.

Shape legend: K latent frames per chunk, C latent channels, H/W latent height/width, N = K * tau actions, A actions.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from model.masks import CLEAN, FDM_ACT, FDM_VID, NOISY, TokenMeta
from model.tokens import KVCache, Tokens


def cfg_rows(scale: float) -> int:
    """Rows a session evaluates under guidance ``scale``: the instruction, and the null instruction unless 1."""
    return 2 if scale != 1.0 else 1


class Batch:
    """The first ``rows`` rows of each session's context stacked on the batch dim: session i owns rows i*rows ..
    i*rows+rows-1.

    With KV caches, keys/values are padded to the longest cache with PAD tokens (segment -1); the attention rule lets
    no real query see a key of another segment, so padding changes nothing for real tokens. Instructions of different
    lengths are zero-padded and masked out of the text cross-attention the same way. Without a cache (one session
    only) every pass recomputes the session's whole history, kept as tokens.
    """

    def __init__(self, sessions: list, rows: int):
        first = sessions[0]
        self.sessions, self.model, self.window, self.rows = sessions, first.model, first.window, rows
        ctx = [s.context[:rows] for s in sessions]  # (rows, T_i, d_v) each
        T = max(x.shape[1] for x in ctx)
        self.context_BTd = torch.cat([F.pad(x, (0, 0, 0, T - x.shape[1])) for x in ctx])
        self.text_mask_BT = None  # None when no instruction is padded: the one-session call runs unmasked too
        if any(x.shape[1] != T for x in ctx):
            arange = torch.arange(T, device=first.device)
            self.text_mask_BT = torch.cat([(arange < x.shape[1]).expand(rows, T) for x in ctx])
        self.cache: KVCache | None = None
        self.history: tuple[Tokens | None, Tokens | None] = (None, None)  # (video, action) without a cache
        if first.use_cache:
            self.cache = KVCache.stack([s.cache if rows == s.rows else s.cache.rows(list(range(rows)))
                                        for s in sessions])
        else:
            assert len(sessions) == 1, "only a single session recomputes its history"
            take = list(range(rows))
            self.history = (Tokens.cat([e.video.rows(take) for e in first.history]),
                            Tokens.cat([e.action.rows(take) for e in first.history if e.action is not None]))

    def run(self, video: Tokens | None, action: Tokens | None,
            return_kv: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
        """One model pass of the stacked new tokens against the sessions' contexts (``LingBotVA.run``'s outputs)."""
        if self.cache is None:  # one session, so no padded text: its whole history again, then the new tokens
            hv, ha = self.history
            out_v, out_a, _ = self.model.run(Tokens.cat([hv, video]), Tokens.cat([ha, action]), self.context_BTd,
                                             window_chunks=self.window)
            lv, la = (0 if h is None else h.length for h in (hv, ha))
            return None if video is None else out_v[:, lv:], None if action is None else out_a[:, la:], []
        ctx_mask = None
        if self.text_mask_BT is not None and video is not None:  # only the video stream cross-attends to text
            ctx_mask = self.text_mask_BT[:, None, :].expand(-1, video.length, -1)
        return self.model.run(video, action, self.context_BTd, ctx_mask, cache=self.cache, return_kv=return_kv,
                              window_chunks=self.window)

    def extended(self, video: Tokens | None, action: Tokens | None) -> Batch:
        """This batch with temporary clean tokens appended to every session's context (the sessions keep theirs)."""
        ext = copy.copy(self)
        if self.cache is None:
            ext.history = (Tokens.cat([self.history[0], video]), Tokens.cat([self.history[1], action]))
        else:
            _, _, kv = self.run(video, action, return_kv=True)
            ext.cache = self.cache.extended(kv, TokenMeta.cat([t.meta for t in (video, action) if t is not None]))
        return ext

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-session rows of a batched output."""
        return out.split(self.rows)


def _noise(session, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=session.generator, device="cpu").to(session.device)


def _action_noise(session, n: int) -> torch.Tensor:
    """An action chunk's initial noise (n, A), scaled by the temperature (drawn even at 0: same stream)."""
    return _noise(session, n, session.config.action_channels) * session.action_temperature


def _guided(out: torch.Tensor, scale: float) -> torch.Tensor:
    """Row 0 of one session's output, pushed away from its null-instruction row 1 by ``scale`` (CFG)."""
    return out[:1] if out.shape[0] == 1 else out[1:2] + scale * (out[:1] - out[1:2])


def denoise_video(batch: Batch, xs: list[torch.Tensor], kind: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Euler-integrate each session's video chunk from its noise (K, C, H, W) at s = 0 to s_end, as ``kind`` tokens.

    Returns, per session, x at s_end and the clean estimate of the last step.
    """
    first = batch.sessions[0]
    K, (H, W) = xs[0].shape[0], first.size
    grid = torch.linspace(0.0, first.video_s_end, first.video_steps + 1).tolist()
    estimates = list(xs)
    for s0, s1 in itertools.pairwise(grid):
        tok = Tokens.stack([s.video_tokens(x, s0, kind, batch.rows) for s, x in zip(batch.sessions, xs, strict=True)])
        out_v, _, _ = batch.run(tok, None)
        u = first.model.unpatchify(out_v.float(), K, H, W)
        velocities = [-_guided(u_s, first.video_cfg)[0] for u_s in batch.split(u)]
        estimates = [x + (1.0 - s0) * v for x, v in zip(xs, velocities, strict=True)]
        xs = [x + (s1 - s0) * v for x, v in zip(xs, velocities, strict=True)]
    return xs, estimates


def denoise_actions(batch: Batch, actions: list[torch.Tensor], kind: int) -> list[torch.Tensor]:
    """Euler-integrate each session's action chunk from its noise (N, A) at s = 0 to s = 1, as ``kind`` tokens."""
    first = batch.sessions[0]
    grid = torch.linspace(0.0, 1.0, first.action_steps + 1).tolist()
    for s0, s1 in itertools.pairwise(grid):
        tok = Tokens.stack([s.action_tokens(a, s0, kind, batch.rows)
                            for s, a in zip(batch.sessions, actions, strict=True)])
        _, out_a, _ = batch.run(None, tok)
        actions = [a + (s1 - s0) * -_guided(o.float(), first.action_cfg)[0]
                   for a, o in zip(actions, batch.split(out_a), strict=True)]
    return actions


def sample_chunks(sessions: list, K: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each session's next chunk: video (K, C, H, W) and actions (N, A), masked to the session's action channels.

    World model (Alg. 1): the video is integrated only to s_end (partial denoising; returned as its clean estimate);
    the actions are integrated to s = 1 conditioned on that partially denoised video, which enters the context as
    clean-type tokens at noise level s_end. Reactive: the actions from the observed history alone, no video (0 frames).
    """
    first = sessions[0]
    c = first.config
    H, W = first.size
    if c.objective == "reactive":
        actions = [_action_noise(s, K * c.tau) for s in sessions]
        actions = denoise_actions(Batch(sessions, cfg_rows(first.action_cfg)), actions, FDM_ACT)
        videos = [torch.zeros(0, c.latent_channels, H, W, device=s.device) for s in sessions]
    else:
        # all noise up front, session by session (video, then actions): the order holds even if a generator is shared
        noise = [(_noise(s, K, c.latent_channels, H, W), _action_noise(s, K * c.tau)) for s in sessions]
        rows_a = cfg_rows(first.action_cfg)
        batch = Batch(sessions, cfg_rows(first.video_cfg))
        xs, videos = denoise_video(batch, [z for z, _ in noise], NOISY)
        if rows_a != batch.rows:
            batch = Batch(sessions, rows_a)  # replaces (frees) the stacked cache of the video rows
        partial = Tokens.stack([s.video_tokens(x, first.video_s_end, CLEAN, rows_a)
                                for s, x in zip(sessions, xs, strict=True)])
        actions = denoise_actions(batch.extended(partial, None), [a for _, a in noise], NOISY)
    return [(v, a * s.action_mask.to(a.dtype)) for s, v, a in zip(sessions, videos, actions, strict=True)]


def imagine_chunks(batch: Batch, actions: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward dynamics (Alg. 2): each session's video chunk (K, C, H, W) that executing its actions (N, A) yields.

    The actions enter the context as FDM_ACT tokens, which the FDM_VID video sees; the video is integrated to s_end.
    Returns, per session, x at s_end and its clean estimate.
    """
    first = batch.sessions[0]
    c = first.config
    K, (H, W) = actions[0].shape[0] // c.tau, first.size
    noise = [_noise(s, K, c.latent_channels, H, W) for s in batch.sessions]
    executed = Tokens.stack([s.action_tokens(a, 1.0, FDM_ACT, batch.rows)
                             for s, a in zip(batch.sessions, actions, strict=True)])
    return denoise_video(batch.extended(None, executed), noise, FDM_VID)
