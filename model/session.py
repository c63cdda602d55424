"""Per-episode inference with a KV cache (Algorithm 1) and a forward-dynamics pass (Algorithm 2).

    s = model.session(text_emb, action_mask)
    s.observe(z0)                                   # first latent frame, no actions yet
    video, actions = s.predict_chunk()              # video to s_end (partial denoising), actions to s = 1
    s.observe(z_real, executed_actions)             # append the real outcome of the executed chunk
    # asynchronous robots (Alg. 2): while chunk a_t executes
    s.imagine(a_t)                                  # FDM: imagined outcome of a_t, cached provisionally
    video, next_actions = s.predict_chunk()         # the chunk after a_t, grounded on the latest real frame
    s.observe(z_real, a_t)                          # provisional entries are replaced by the real ones

A policy server serving many robots batches their sessions' model passes (same model and sampler settings; the
integrator is ``model.sampler``'s, and a session's own call is its one-session case):

    results = predict_chunks([s1, s2, s3])          # == [s.predict_chunk() for s in (s1, s2, s3)]
    imagined = imagine_many([s1, s2], [a1, a2])     # == [s1.imagine(a1), s2.imagine(a2)]

The cache holds keys/values of clean history only; a prediction's noisy tokens are never cached. With
``use_cache=False`` every model evaluation recomputes the whole history instead (the baseline the KV-cache test
and benchmark compare against); both paths evaluate the same attention rule, so they agree to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.masks import CLEAN, TokenMeta
from model.sampler import Batch, cfg_rows, imagine_chunks, sample_chunks
from model.tokens import KVCache, Tokens, s_to_wan_t


@dataclass
class _Entry:
    """One committed or provisional history step, kept as tokens for the no-cache recompute."""

    video: Tokens
    action: Tokens | None


class Session:
    """KV-cache inference state of one robot episode."""

    def __init__(
        self,
        model: nn.Module,
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
    def video_tokens(self, z_FCHW: torch.Tensor, s: float, kind: int, rows: int) -> Tokens:
        """Frames (F, C, H, W) at flow time ``s`` as ``kind`` tokens of the next chunk, on ``rows`` identical rows."""
        m = self.model
        H, W = self.size
        x = m.embed_video(z_FCHW[None].to(self.device)).expand(rows, -1, -1)
        L = x.shape[1]
        frames = torch.arange(self.next_frame, self.next_frame + z_FCHW.shape[0], device=self.device)
        pos = m.video_positions(frames, H, W)[None].expand(rows, -1, -1)
        t = s_to_wan_t(torch.full((rows, L), float(s), device=self.device))
        return Tokens(x, t, pos, TokenMeta.full(rows, L, 2 * self.num_chunks, kind, device=self.device))

    def action_tokens(self, a_NA: torch.Tensor, s: float, kind: int, rows: int) -> Tokens:
        """Actions (N, A) at flow time ``s`` as ``kind`` tokens of the next chunk (the actions leading to its frames)."""
        m = self.model
        H, W = self.size
        x = m.embed_actions(a_NA[None].to(self.device), self.action_mask[None]).expand(rows, -1, -1)
        N = x.shape[1]
        pos = m.action_positions(self.next_frame - 1, N, H, W, device=self.device)[None].expand(rows, -1, -1)
        t = s_to_wan_t(torch.full((rows, N), float(s), device=self.device))
        return Tokens(x, t, pos, TokenMeta.full(rows, N, 2 * self.num_chunks + 1, kind, device=self.device))

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
        _observe([self], [latents], [actions], noise_level, provisional)

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
        video = self.video_tokens(latents, noise_level, CLEAN, self.rows)
        action = None if first else self.action_tokens(actions, 1.0, CLEAN, self.rows)
        return video, action, F_

    def _append(self, video: Tokens, action: Tokens | None, kv: list | None, frames: int, provisional: bool) -> None:
        """Add an observation to the context (its keys/values ``kv`` in cache mode) and advance the counters."""
        if self.use_cache:
            self.cache.append(kv, TokenMeta.cat([t.meta for t in (video, action) if t is not None]))
        else:
            self.history.append(_Entry(video, action))
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
        return sample_chunks([self], chunk_size or self.chunk_size)[0]

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
        return _imagine([self], [actions], commit)[0]

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
# A policy server holds one session per robot; these functions check that the sessions can share one batch and run
# them through the sampler together (see model.sampler).

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
    return sample_chunks(sessions, chunk_size or first.chunk_size)


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
    c = _check_batchable(sessions, "imagine_many", same_chunk_size=False).config
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
    return _imagine(sessions, actions, commit)


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


def _imagine(sessions: list[Session], actions: list[torch.Tensor], commit: bool) -> list[torch.Tensor]:
    """The FDM pass of checked sessions on checked action chunks; with ``commit`` its outcome enters them
    provisionally (as ``observe(x, actions, noise_level=s_end, provisional=True)``)."""
    first = sessions[0]
    batch = Batch(sessions, cfg_rows(first.video_cfg))
    xs, estimates = imagine_chunks(batch, actions)
    if commit:
        _observe(sessions, xs, actions, first.video_s_end, True, batch)
    return estimates


def _observe(sessions: list[Session], latents: list[torch.Tensor], actions: list[torch.Tensor | None],
             noise_level: float, provisional: bool, batch: Batch | None = None) -> None:
    """``s.observe(z, a, noise_level=noise_level, provisional=provisional)`` for every session (provisional entries
    already dropped where due), with one model pass; ``batch`` is reused if it holds the sessions' full rows."""
    obs = [s._observation(z, a, noise_level) for s, z, a in zip(sessions, latents, actions, strict=True)]
    kvs: list[list | None] = [None] * len(sessions)
    first = sessions[0]
    if first.use_cache:
        if batch is None or batch.rows != first.rows:
            batch = Batch(sessions, first.rows)
        action = None if obs[0][1] is None else Tokens.stack([a for _, a, _ in obs])
        _, _, kv = batch.run(Tokens.stack([v for v, _, _ in obs]), action, return_kv=True)
        R = batch.rows
        kvs = [[(k[i * R:(i + 1) * R], v[i * R:(i + 1) * R]) for k, v in kv] for i in range(len(sessions))]
    for s, (video, action, frames), kv in zip(sessions, obs, kvs, strict=True):
        s._append(video, action, kv, frames, provisional)
