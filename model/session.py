"""Per-episode inference with a KV cache (Algorithm 1) and a forward-dynamics pass (Algorithm 2).

    s = model.session(text_emb, action_mask)
    s.observe(z0)                                   # first latent frame, no actions yet
    video, actions = s.predict_chunk()              # video to s_end (partial denoising), actions to s = 1
    s.observe(z_real, executed_actions)             # append the real outcome of the executed chunk
    # asynchronous robots (Alg. 2): while chunk a_t executes
    s.imagine(a_t)                                  # FDM: imagined outcome of a_t, cached provisionally
    video, next_actions = s.predict_chunk()         # the chunk after a_t, grounded on the latest real frame
    s.observe(z_real, a_t)                          # provisional entries are replaced by the real ones

A policy server serving many robots batches their sessions' model passes (same model and sampler settings):

    results = predict_chunks([s1, s2, s3])          # == [s.predict_chunk() for s in (s1, s2, s3)]
    imagined = imagine_many([s1, s2], [a1, a2])     # == [s1.imagine(a1), s2.imagine(a2)]

The cache holds keys/values of clean history only; a prediction's noisy tokens are never cached. With
``use_cache=False`` every model evaluation recomputes the whole history instead (the baseline the KV-cache test
and benchmark compare against); both paths evaluate the same attention rule, so they agree to float precision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.lingbot_va import KVCache, LingBotVA, Tokens, s_to_wan_t
from model.masks import CLEAN, FDM_ACT, FDM_VID, NOISY, PAD, TokenMeta


@dataclass
class _Entry:
    """One committed or provisional history step, kept as tokens for the no-cache recompute."""

    video: Tokens | None
    action: Tokens | None
    chunk: int


def _cat_tokens(items: list[Tokens | None]) -> Tokens | None:
    items = [t for t in items if t is not None]
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    return Tokens(
        torch.cat([t.x for t in items], 1), torch.cat([t.t for t in items], 1), torch.cat([t.pos for t in items], 1),
        TokenMeta.cat([t.meta for t in items]),
    )


def _rows(t: Tokens | None, rows: list[int]) -> Tokens | None:
    return None if t is None else Tokens(t.x[rows], t.t[rows], t.pos[rows], t.meta[rows])


class Session:
    """KV-cache inference state of one robot episode."""

    def __init__(
        self,
        model: LingBotVA,
        text: torch.Tensor,
        action_mask: torch.Tensor,
        *,
        chunk_size: int | None = None,
        video_steps: int | None = None,
        video_s_end: float | None = None,
        video_cfg: float | None = None,
        action_steps: int | None = None,
        action_cfg: float | None = None,
        action_temperature: float | None = None,
        window_chunks: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ):
        c = model.config
        self.model, self.config = model, c
        self.chunk_size = chunk_size or c.chunk_size
        self.video_steps = video_steps or c.video_steps
        self.video_s_end = c.video_s_end if video_s_end is None else video_s_end
        self.video_cfg = c.video_cfg if video_cfg is None else video_cfg
        self.action_steps = action_steps or c.action_steps
        self.action_cfg = c.action_cfg if action_cfg is None else action_cfg
        self.action_temperature = c.action_temperature if action_temperature is None else action_temperature
        self.window = window_chunks if window_chunks is not None else c.attn_window_chunks
        self.use_cache = use_cache
        self.generator = generator
        if self.chunk_size < 1 or self.video_steps < 1 or self.action_steps < 1:
            raise ValueError("chunk_size, video_steps and action_steps must be >= 1")
        if not 0.0 < self.video_s_end <= 1.0:
            raise ValueError(f"video_s_end must be in (0, 1], got {self.video_s_end}")
        if not 0.0 <= self.action_temperature <= 1.0:
            raise ValueError(f"action_temperature must be in [0, 1], got {self.action_temperature}")
        if text.ndim == 3 and text.shape[0] == 1:
            text = text[0]
        if text.ndim != 2 or text.shape[1] != c.text_dim or not text.is_floating_point():
            raise ValueError(f"text must be a float (T, {c.text_dim}) embedding, got {tuple(text.shape)} {text.dtype}")
        action_mask = torch.as_tensor(action_mask)
        if action_mask.shape != (c.action_channels,):
            raise ValueError(f"action_mask must have shape ({c.action_channels},), got {tuple(action_mask.shape)}")
        self.device = next(model.parameters()).device
        self.action_mask = action_mask.to(self.device).bool()
        # row 0: the instruction; row 1: the null (all-zero) instruction for classifier-free guidance
        self.rows = 2 if (self.video_cfg != 1.0 or self.action_cfg != 1.0) else 1
        text = text.to(self.device, torch.float32)
        with torch.no_grad():
            self.context = model.embed_text(torch.stack([text, torch.zeros_like(text)][: self.rows]))
        self.cache = KVCache(c.num_layers)
        self.history: list[_Entry] = []
        self.next_frame = 0  # latent frames observed
        self.num_chunks = 0  # chunks observed (chunk 0 = the first frame)
        self.size: tuple[int, int] | None = None  # latent (H, W), fixed by the first observation
        self._committed = (0, 0, 0, 0)  # (cache length, history length, next_frame, num_chunks) before provisional

    # ------------------------------------------------------------------------------------------- tokens
    def _video(self, z_FCHW: torch.Tensor, s: float, chunk: int, kind: int, first_frame: int, rows: int) -> Tokens:
        m = self.model
        H, W = self.size
        x = m.embed_video(z_FCHW[None].to(self.device)).expand(rows, -1, -1)
        L = x.shape[1]
        frames = torch.arange(first_frame, first_frame + z_FCHW.shape[0], device=self.device)
        pos = m.video_positions(frames, H, W)[None].expand(rows, -1, -1)
        t = s_to_wan_t(torch.full((rows, L), float(s), device=self.device))
        return Tokens(x, t, pos, TokenMeta.full(rows, L, chunk, kind, device=self.device))

    def _action(self, a_NA: torch.Tensor, s: float, chunk: int, kind: int, first_interval: int, rows: int) -> Tokens:
        m = self.model
        H, W = self.size
        x = m.embed_actions(a_NA[None].to(self.device), self.action_mask[None]).expand(rows, -1, -1)
        N = x.shape[1]
        pos = m.action_positions(first_interval, N, H, W, device=self.device)[None].expand(rows, -1, -1)
        t = s_to_wan_t(torch.full((rows, N), float(s), device=self.device))
        return Tokens(x, t, pos, TokenMeta.full(rows, N, chunk, kind, device=self.device))

    # ------------------------------------------------------------------------------------------- model calls
    def _eval(self, video: Tokens | None, action: Tokens | None, rows: int, extra: list[_Entry] = (),
              extra_kv: KVCache | None = None, return_kv: bool = False):
        """Run new tokens against the history (+ ``extra`` temporary clean entries)."""
        m, ctx = self.model, self.context[:rows]
        if self.use_cache:
            cache = extra_kv if extra_kv is not None else self._cache_rows(rows)
            return m.run(video, action, ctx, cache=cache, return_kv=return_kv, window_chunks=self.window)
        hist = self.history + list(extra)
        hv = _cat_tokens([_rows(e.video, list(range(rows))) for e in hist])
        ha = _cat_tokens([_rows(e.action, list(range(rows))) for e in hist])
        lv = 0 if hv is None else hv.length
        la = 0 if ha is None else ha.length
        out_v, out_a, _ = m.run(_cat_tokens([hv, video]), _cat_tokens([ha, action]), ctx, window_chunks=self.window)
        return (None if video is None else out_v[:, lv:], None if action is None else out_a[:, la:], [])

    def _cache_rows(self, rows: int) -> KVCache:
        return self.cache if rows == self.rows else self.cache.rows(list(range(rows)))

    def _extend(self, entry: _Entry, rows: int) -> KVCache | None:
        """KV cache with a temporary clean entry appended (cache mode), without touching the session cache."""
        if not self.use_cache:
            return None
        _, _, kv = self._eval(entry.video, entry.action, rows, return_kv=True)
        ext = self._cache_rows(rows).copy()
        ext.append(kv, TokenMeta.cat([t.meta for t in (entry.video, entry.action) if t is not None]))
        return ext

    def _guided(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        return out[:1] if out.shape[0] == 1 else out[1:2] + scale * (out[:1] - out[1:2])

    def _noise(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device="cpu").to(self.device)

    def _action_noise(self, steps: int) -> torch.Tensor:
        """The action chunk's initial noise (steps, A), scaled by the temperature (drawn even at 0: same stream)."""
        return self._noise(steps, self.config.action_channels) * self.action_temperature

    def _denoise_video(self, K: int, kind: int, extra: list[_Entry], extra_kv: KVCache | None):
        """Euler-integrate the video chunk from s = 0 to s_end; returns (x at s_end, clean estimate)."""
        c, m = self.config, self.model
        H, W = self.size
        rows = 2 if self.video_cfg != 1.0 else 1
        if extra_kv is not None and extra_kv.meta.chunk.shape[0] != rows:
            extra_kv = extra_kv.rows(list(range(rows)))
        x = self._noise(K, c.latent_channels, H, W)
        grid = torch.linspace(0.0, self.video_s_end, self.video_steps + 1).tolist()
        estimate = x
        for s0, s1 in itertools.pairwise(grid):
            tok = self._video(x, s0, 2 * self.num_chunks, kind, self.next_frame, rows)
            out_v, _, _ = self._eval(tok, None, rows, extra, extra_kv)
            u = self._guided(m.unpatchify(out_v.float(), K, H, W), self.video_cfg)[0]
            velocity = -u  # the network predicts eps - x (Wan); d x / d s = x - eps
            estimate = x + (1.0 - s0) * velocity
            x = x + (s1 - s0) * velocity
        return x, estimate

    # ------------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def observe(self, latents: torch.Tensor, actions: torch.Tensor | None = None, *, noise_level: float = 1.0,
                provisional: bool = False) -> None:
        """Append real latent frames (F, C, H, W) and the executed actions that led to them (F*tau, A).

        The first call takes the initial observation (usually one frame) and no actions. ``noise_level`` < 1 marks
        partially denoised (imagined) frames; ``provisional`` entries are dropped by the next ``observe``.
        """
        if not provisional:
            self._drop_provisional()
        video, action, frames = self._observation(latents, actions, noise_level)
        kv = self._eval(video, action, self.rows, return_kv=True)[2] if self.use_cache else None
        self._append(video, action, kv, frames, provisional)

    def _observation(self, latents: torch.Tensor, actions: torch.Tensor | None,
                     noise_level: float) -> tuple[Tokens, Tokens | None, int]:
        """Validated clean tokens of one observation (the first one is video only) and its number of frames."""
        latents = self._check_latents(latents)
        F_ = latents.shape[0]
        first = self.num_chunks == 0
        if first and (actions is not None or F_ != 1):
            raise ValueError("the first observation is one latent frame with no executed actions (actions=None)")
        if not first:
            if actions is None:
                raise ValueError("observe() after the first frame needs the executed actions")
            actions = self._check_actions(actions, F_)
        chunk = self.num_chunks
        video = self._video(latents, noise_level, 2 * chunk, CLEAN, self.next_frame, self.rows)
        action = None if first else self._action(actions, 1.0, 2 * chunk + 1, CLEAN, self.next_frame - 1, self.rows)
        return video, action, F_

    def _append(self, video: Tokens, action: Tokens | None, kv: list | None, frames: int, provisional: bool) -> None:
        """Add an observation to the context (its keys/values ``kv`` in cache mode) and advance the counters."""
        chunk = self.num_chunks
        if self.use_cache:
            self.cache.append(kv, TokenMeta.cat([t.meta for t in (video, action) if t is not None]))
        else:
            self.history.append(_Entry(video, action, chunk))
        self.next_frame += frames
        self.num_chunks += 1
        if self.window is not None and self.cache.meta is not None:
            # the next query chunk is num_chunks; it may see chunks > num_chunks - window (same rule as training)
            self.cache.keep(torch.div(self.cache.meta.chunk[0], 2, rounding_mode="floor") > self.num_chunks - self.window)
        if not provisional:
            self._committed = (self.cache.length, len(self.history), self.next_frame, self.num_chunks)

    @torch.no_grad()
    def predict_chunk(self, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the next chunk: video (K, C, H, W) (clean estimate from the partial denoise) and actions (K*tau, A).

        Video is integrated only to s_end (partial denoising); the action chunk is integrated to s = 1 conditioned on
        that partially denoised video, which enters the context as a clean-type token at noise level s_end.
        """
        if self.num_chunks == 0:
            raise ValueError("observe() the initial frame before predict_chunk()")
        c = self.config
        K = chunk_size or self.chunk_size
        if c.objective == "reactive":
            return self._predict_actions_reactive(K)
        x, estimate = self._denoise_video(K, NOISY, [], None)
        rows_a = 2 if self.action_cfg != 1.0 else 1
        temp = _Entry(self._video(x, self.video_s_end, 2 * self.num_chunks, CLEAN, self.next_frame, rows_a), None,
                      self.num_chunks)
        ext = self._extend(temp, rows_a)
        N = K * c.tau
        a = self._action_noise(N)
        grid = torch.linspace(0.0, 1.0, self.action_steps + 1).tolist()
        for s0, s1 in itertools.pairwise(grid):
            tok = self._action(a, s0, 2 * self.num_chunks + 1, NOISY, self.next_frame - 1, rows_a)
            _, out_a, _ = self._eval(None, tok, rows_a, [temp], ext)
            a = a + (s1 - s0) * -self._guided(out_a.float(), self.action_cfg)[0]
        return estimate, a * self.action_mask.to(a.dtype)

    def _predict_actions_reactive(self, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reactive baseline: the action chunk from the observed history alone; the video is empty (0 frames)."""
        c = self.config
        rows_a = 2 if self.action_cfg != 1.0 else 1
        a = self._action_noise(K * c.tau)
        grid = torch.linspace(0.0, 1.0, self.action_steps + 1).tolist()
        for s0, s1 in itertools.pairwise(grid):
            tok = self._action(a, s0, 2 * self.num_chunks + 1, FDM_ACT, self.next_frame - 1, rows_a)
            _, out_a, _ = self._eval(None, tok, rows_a)
            a = a + (s1 - s0) * -self._guided(out_a.float(), self.action_cfg)[0]
        H, W = self.size
        return torch.zeros(0, c.latent_channels, H, W, device=self.device), a * self.action_mask.to(a.dtype)

    @torch.no_grad()
    def imagine(self, actions: torch.Tensor, *, commit: bool = True) -> torch.Tensor:
        """Forward dynamics: the video chunk that executing ``actions`` (K*tau, A) from the current state yields.

        With ``commit`` the imagined frames (at noise level s_end) and the actions enter the context provisionally,
        so the next ``predict_chunk`` plans the chunk after them (Alg. 2); the next ``observe`` replaces them.
        """
        if self.num_chunks == 0:
            raise ValueError("observe() the initial frame before imagine()")
        if self.config.objective == "reactive":
            raise ValueError("a reactive model has no forward dynamics: imagine() (async mode) needs a world model")
        c = self.config
        if actions.ndim != 2 or actions.shape[0] % c.tau:
            raise ValueError(f"actions must be (K*tau, {c.action_channels}) with tau={c.tau}, got {tuple(actions.shape)}")
        K = actions.shape[0] // c.tau
        actions = self._check_actions(actions, K)
        rows = 2 if self.video_cfg != 1.0 else 1
        fdm_act = _Entry(None, self._action(actions, 1.0, 2 * self.num_chunks + 1, FDM_ACT, self.next_frame - 1, rows),
                         self.num_chunks)
        x, estimate = self._denoise_video(K, FDM_VID, [fdm_act], self._extend(fdm_act, rows))
        if commit:
            self.observe(x, actions, noise_level=self.video_s_end, provisional=True)
        return estimate

    def reset_provisional(self) -> None:
        """Forget entries added by ``imagine(commit=True)``."""
        self._drop_provisional()

    # ------------------------------------------------------------------------------------------- helpers
    def _drop_provisional(self) -> None:
        cache_len, hist_len, next_frame, num_chunks = self._committed
        if self.cache.length > cache_len:
            keep = torch.zeros(self.cache.length, dtype=torch.bool)
            keep[:cache_len] = True
            self.cache.keep(keep.to(self.device))
        del self.history[hist_len:]
        self.next_frame, self.num_chunks = next_frame, num_chunks

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise ValueError(f"latents must be a float tensor (F, C, H, W), got {getattr(z, 'dtype', type(z))}")
        if z.ndim != 4 or z.shape[1] != c.latent_channels:
            raise ValueError(f"latents must be (F, {c.latent_channels}, H, W), got {tuple(z.shape)}")
        H, W = z.shape[2:]
        if H % c.patch_size[1] or W % c.patch_size[2]:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {c.patch_size[1:]}")
        if self.size is None:
            self.size = (H, W)
        elif self.size != (H, W):
            raise ValueError(f"latent size {H}x{W} differs from this session's {self.size[0]}x{self.size[1]}")
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf")
        return z.float()

    def _check_actions(self, a: torch.Tensor, frames: int) -> torch.Tensor:
        c = self.config
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise ValueError(f"actions must be a float tensor, got {getattr(a, 'dtype', type(a))}")
        if a.shape != (frames * c.tau, c.action_channels):
            raise ValueError(f"actions must be ({frames * c.tau}, {c.action_channels}) for {frames} frames, "
                             f"got {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError("actions contain NaN or inf")
        return a.float()


# ----------------------------------------------------------------------------------------------- many sessions
# A policy server holds one session per robot. The functions below run the sessions' model evaluations together:
# each session contributes its own rows (instruction and, under CFG, the null instruction) to one batch, so a
# denoising step is one model pass for all robots instead of one per robot. Every per-session quantity (tokens,
# noise, guidance, the update rule) is computed by the session's own methods, exactly as its per-session call would.

_SHARED_SETTINGS = ("video_steps", "video_s_end", "video_cfg", "action_steps", "action_cfg", "window", "size")


@torch.no_grad()
def predict_chunks(sessions: list[Session], chunk_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[s.predict_chunk(chunk_size) for s in sessions]`` with one batched model pass per denoising step.

    The sessions may have histories of different lengths and be at different chunks; they must share the model and
    the sampler settings (chunk size, steps, s_end, CFG scales, window, latent size), else ``ValueError``. Each
    session draws its noise from its own generator in the order its ``predict_chunk`` would, so the results (and
    the generators' states afterwards) equal the per-session calls to float precision.
    """
    sessions = list(sessions)
    if len(sessions) <= 1:
        return [s.predict_chunk(chunk_size) for s in sessions]
    first = _check_batchable(sessions, "predict_chunks", same_chunk_size=not chunk_size)
    c = first.config
    K = chunk_size or first.chunk_size
    if c.objective == "reactive":
        return _predict_actions_reactive_many(sessions, K)
    H, W = first.size
    # all noise up front, session by session (video, then actions): the order holds even if a generator is shared
    noise = [(s._noise(K, c.latent_channels, H, W), s._action_noise(K * c.tau)) for s in sessions]
    rows_v, rows_a = (2 if scale != 1.0 else 1 for scale in (first.video_cfg, first.action_cfg))
    batch = _Batch(sessions, rows_v)
    xs, estimates = _denoise_video_many(sessions, batch, [z for z, _ in noise], K, NOISY, None)
    if rows_a != rows_v:
        batch = _Batch(sessions, rows_a)  # replaces (frees) the stacked cache of the video rows
    # the partially denoised video enters the context of the action chunk as clean-type tokens at s_end
    temp = _stack([s._video(x, s.video_s_end, 2 * s.num_chunks, CLEAN, s.next_frame, rows_a)
                   for s, x in zip(sessions, xs, strict=True)])
    ext = batch.extended(temp, None)
    actions = [a for _, a in noise]
    grid = torch.linspace(0.0, 1.0, first.action_steps + 1).tolist()
    for s0, s1 in itertools.pairwise(grid):
        tok = _stack([s._action(a, s0, 2 * s.num_chunks + 1, NOISY, s.next_frame - 1, rows_a)
                      for s, a in zip(sessions, actions, strict=True)])
        _, out_a, _ = batch.run(None, tok, ext)
        actions = [a + (s1 - s0) * -s._guided(o.float(), s.action_cfg)[0]
                   for s, a, o in zip(sessions, actions, batch.split(out_a), strict=True)]
    return [(e, a * s.action_mask.to(a.dtype)) for s, e, a in zip(sessions, estimates, actions, strict=True)]


@torch.no_grad()
def imagine_many(sessions: list[Session], actions: list[torch.Tensor], *, commit: bool = True) -> list[torch.Tensor]:
    """``[s.imagine(a, commit=commit) for s, a in zip(sessions, actions)]`` with one batched pass per model call.

    The FDM pass of Algorithm 2 for many robots: each session imagines the outcome of its own action chunk
    (K*tau, A); the chunks must have the same length. With ``commit`` every session gets the same provisional
    entries (cache, counters) its own ``imagine`` would leave. Nothing is changed if a session or chunk is invalid.
    """
    sessions, actions = list(sessions), list(actions)
    if len(actions) != len(sessions):
        raise ValueError(f"imagine_many: {len(sessions)} sessions but {len(actions)} action chunks")
    if len(sessions) <= 1:
        return [s.imagine(a, commit=commit) for s, a in zip(sessions, actions, strict=True)]
    first = _check_batchable(sessions, "imagine_many", same_chunk_size=False)
    c = first.config
    if c.objective == "reactive":
        raise ValueError("a reactive model has no forward dynamics: imagine() (async mode) needs a world model")
    for i, a in enumerate(actions):
        if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[0] % c.tau:
            raise ValueError(f"imagine_many: actions[{i}] must be (K*tau, {c.action_channels}) with tau={c.tau}, "
                             f"got {tuple(getattr(a, 'shape', ()))}")
        if a.shape[0] != actions[0].shape[0]:
            raise ValueError(f"imagine_many: action chunks differ in length ({actions[0].shape[0]} vs "
                             f"{a.shape[0]} for session {i}); batched sessions imagine chunks of one size")
    K = actions[0].shape[0] // c.tau
    actions = [s._check_actions(a, K) for s, a in zip(sessions, actions, strict=True)]
    H, W = first.size
    noise = [s._noise(K, c.latent_channels, H, W) for s in sessions]
    rows = 2 if first.video_cfg != 1.0 else 1
    batch = _Batch(sessions, rows)
    fdm = _stack([s._action(a, 1.0, 2 * s.num_chunks + 1, FDM_ACT, s.next_frame - 1, rows)
                  for s, a in zip(sessions, actions, strict=True)])
    xs, estimates = _denoise_video_many(sessions, batch, noise, K, FDM_VID, batch.extended(None, fdm))
    if commit:
        _observe_provisional_many(sessions, xs, actions, batch if batch.rows == first.rows else None)
    return estimates


class _Batch:
    """The first ``rows`` rows of each session stacked on the batch dim: session i owns rows i*rows .. i*rows+rows-1.

    Keys/values are padded to the longest cache with PAD tokens (segment -1); the attention rule lets no real query
    see a key of another segment, so padding changes nothing for real tokens. Instructions of different lengths are
    zero-padded and masked out of the text cross-attention the same way.
    """

    def __init__(self, sessions: list[Session], rows: int):
        first = sessions[0]
        self.model, self.window, self.rows = first.model, first.window, rows
        ctx = [s.context[:rows] for s in sessions]  # (rows, T_i, d_v) each
        T = max(x.shape[1] for x in ctx)
        self.context_BTd = torch.cat([F.pad(x, (0, 0, 0, T - x.shape[1])) for x in ctx])
        self.text_mask_BT = None  # None when no instruction is padded: the per-session call runs unmasked too
        if any(x.shape[1] != T for x in ctx):
            arange = torch.arange(T, device=first.device)
            self.text_mask_BT = torch.cat([(arange < x.shape[1]).expand(rows, T) for x in ctx])
        self.cache = _stack_caches([s._cache_rows(rows) for s in sessions])

    def run(self, video: Tokens | None, action: Tokens | None, cache: KVCache | None = None,
            return_kv: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
        """One model pass of the stacked new tokens against ``cache`` (default: the stacked session caches)."""
        ctx_mask = None
        if self.text_mask_BT is not None and video is not None:  # only the video stream cross-attends to text
            ctx_mask = self.text_mask_BT[:, None, :].expand(-1, video.length, -1)
        return self.model.run(video, action, self.context_BTd, ctx_mask, cache=self.cache if cache is None else cache,
                              return_kv=return_kv, window_chunks=self.window)

    def extended(self, video: Tokens | None, action: Tokens | None) -> KVCache:
        """The stacked cache with temporary clean tokens appended (``Session._extend`` for every session at once)."""
        _, _, kv = self.run(video, action, return_kv=True)
        ext = KVCache(len(kv))
        ext.k, ext.v, ext.meta = list(self.cache.k), list(self.cache.v), self.cache.meta
        ext.append(kv, TokenMeta.cat([t.meta for t in (video, action) if t is not None]))
        return ext

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-session rows of a batched output."""
        return out.split(self.rows)


def _check_batchable(sessions: list[Session], what: str, same_chunk_size: bool) -> Session:
    """The first session, after checking that all can share one batch; ``ValueError`` naming the mismatch if not."""
    first = sessions[0]
    names = _SHARED_SETTINGS + (("chunk_size",) if same_chunk_size else ())
    seen: set[int] = set()
    for i, s in enumerate(sessions):
        if not isinstance(s, Session):
            raise ValueError(f"{what}: item {i} is a {type(s).__name__}, not a Session")
        if id(s) in seen:
            raise ValueError(f"{what}: session {i} appears twice in the list")
        seen.add(id(s))
        if s.model is not first.model:
            raise ValueError(f"{what}: session {i} belongs to another model than session 0; only one model's "
                             "sessions can share a batch")
        if not s.use_cache:
            raise ValueError(f"{what}: session {i} has use_cache=False; batching needs KV-cache sessions")
        if s.num_chunks == 0:
            raise ValueError(f"{what}: session {i} has no observation yet; observe() its initial frame first")
        for name in names:
            if getattr(s, name) != getattr(first, name):
                raise ValueError(f"{what}: session {i} has {name}={getattr(s, name)!r} but session 0 has "
                                 f"{getattr(first, name)!r}; batched sessions need the same settings")
    return first


def _stack(items: list[Tokens]) -> Tokens:
    """Tokens of equal length (one per session) stacked on the batch dim."""
    meta = TokenMeta(*(torch.cat([getattr(t.meta, f) for t in items]) for f in ("chunk", "kind", "seg")))
    return Tokens(torch.cat([t.x for t in items]), torch.cat([t.t for t in items]), torch.cat([t.pos for t in items]),
                  meta)


def _stack_caches(caches: list[KVCache]) -> KVCache:
    """Caches stacked on the batch dim, each right-padded to the longest with zero keys/values and PAD metadata."""
    L = max(c.length for c in caches)
    out = KVCache(len(caches[0].k))
    for i in range(len(out.k)):
        # keys/values (B, L, H, D): pad dim 1 at its end
        out.k[i] = torch.cat([F.pad(c.k[i], (0, 0, 0, 0, 0, L - c.length)) for c in caches])
        out.v[i] = torch.cat([F.pad(c.v[i], (0, 0, 0, 0, 0, L - c.length)) for c in caches])
    out.meta = TokenMeta(*(torch.cat([F.pad(getattr(c.meta, f), (0, L - c.length), value=fill) for c in caches])
                           for f, fill in (("chunk", 0), ("kind", PAD), ("seg", -1))))
    return out


def _denoise_video_many(sessions: list[Session], batch: _Batch, xs: list[torch.Tensor], K: int, kind: int,
                        cache: KVCache | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``Session._denoise_video`` for every session, from the given noise (K, C, H, W) each."""
    first = sessions[0]
    H, W = first.size
    grid = torch.linspace(0.0, first.video_s_end, first.video_steps + 1).tolist()
    estimates = list(xs)
    for s0, s1 in itertools.pairwise(grid):
        tok = _stack([s._video(x, s0, 2 * s.num_chunks, kind, s.next_frame, batch.rows)
                      for s, x in zip(sessions, xs, strict=True)])
        out_v, _, _ = batch.run(tok, None, cache)
        u = first.model.unpatchify(out_v.float(), K, H, W)
        velocities = [-s._guided(u_s, s.video_cfg)[0] for s, u_s in zip(sessions, batch.split(u), strict=True)]
        estimates = [x + (1.0 - s0) * v for x, v in zip(xs, velocities, strict=True)]
        xs = [x + (s1 - s0) * v for x, v in zip(xs, velocities, strict=True)]
    return xs, estimates


def _predict_actions_reactive_many(sessions: list[Session], K: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``Session._predict_actions_reactive`` for every session (actions from the history alone, no video)."""
    first = sessions[0]
    c = first.config
    actions = [s._action_noise(K * c.tau) for s in sessions]
    rows = 2 if first.action_cfg != 1.0 else 1
    batch = _Batch(sessions, rows)
    grid = torch.linspace(0.0, 1.0, first.action_steps + 1).tolist()
    for s0, s1 in itertools.pairwise(grid):
        tok = _stack([s._action(a, s0, 2 * s.num_chunks + 1, FDM_ACT, s.next_frame - 1, rows)
                      for s, a in zip(sessions, actions, strict=True)])
        _, out_a, _ = batch.run(None, tok)
        actions = [a + (s1 - s0) * -s._guided(o.float(), s.action_cfg)[0]
                   for s, a, o in zip(sessions, actions, batch.split(out_a), strict=True)]
    H, W = first.size
    return [(torch.zeros(0, c.latent_channels, H, W, device=s.device), a * s.action_mask.to(a.dtype))
            for s, a in zip(sessions, actions, strict=True)]


def _observe_provisional_many(sessions: list[Session], latents: list[torch.Tensor], actions: list[torch.Tensor],
                              batch: _Batch | None) -> None:
    """``s.observe(z, a, noise_level=s_end, provisional=True)`` for every session, with one batched pass."""
    obs = [s._observation(z, a, s.video_s_end) for s, z, a in zip(sessions, latents, actions, strict=True)]
    batch = batch or _Batch(sessions, sessions[0].rows)
    _, _, kv = batch.run(_stack([v for v, _, _ in obs]), _stack([a for _, a, _ in obs]), return_kv=True)
    R = batch.rows
    for i, (s, (video, action, frames)) in enumerate(zip(sessions, obs, strict=True)):
        s._append(video, action, [(k[i * R:(i + 1) * R], v[i * R:(i + 1) * R]) for k, v in kv], frames, True)
