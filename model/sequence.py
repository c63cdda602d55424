"""Builds the teacher-forcing sequence: interleaved clean + noisy copies of whole episodes, packed into rows.

Per episode with F latent frames and chunk size K (chunk 0 = the first frame, chunk c >= 1 = frames
1+(c-1)K .. cK and the tau*K actions leading to them):
  * CLEAN video (all frames; each chunk replaced by (1-s)eps + s z with prob. p, s ~ U[s_min, 1], Eq. 10 — the
    token's timestep tells the model its noise level) and CLEAN actions (s = 1);
  * NOISY video of chunks >= 1 (target for L_dyn) and NOISY actions (target for L_inv), one flow time per chunk;
  * with fdm_loss_weight > 0: FDM_ACT (clean copy of the actions, blind to their own video chunk) and FDM_VID
    (another noisy video copy that sees them: target for L_fdm, Eq. 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.masks import CLEAN, FDM_ACT, FDM_VID, NOISY, PAD, TokenMeta
from model.tokens import Tokens, s_to_wan_t


@dataclass
class TrainingSequence:
    video: Tokens
    action: Tokens
    context: torch.Tensor  # (B, T_row, d_v) projected text of the episodes in each row
    context_mask: torch.Tensor | None  # (B, Lv, T_row) video token -> own episode's text
    video_target: torch.Tensor  # (B, Lv, patch_dim) eps - z in patch space
    dyn_weight: torch.Tensor  # (B, Lv) 1 on NOISY video tokens
    fdm_weight: torch.Tensor  # (B, Lv) 1 on FDM_VID tokens
    action_target: torch.Tensor  # (B, La, A)
    action_channel_mask: torch.Tensor  # (B, La, A) 1 on NOISY action tokens' valid channels


def _shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift sigma' = shift*sigma / (1 + (shift-1)*sigma) applied to the noise level sigma = 1 - s."""
    return shift * u / (1 + (shift - 1) * u)


def validate_batch(batch: dict, config) -> None:
    """Raise ValueError naming the first problem with a training batch."""
    for key in ("video", "actions", "action_mask", "text"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}")
    video, actions, amask, text = batch["video"], batch["actions"], batch["action_mask"], batch["text"]
    for key, t in (("video", video), ("actions", actions), ("text", text)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"batch[{key!r}] must be a floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    if video.ndim != 5:
        raise ValueError(f"batch['video'] must be (B, F, C, H, W), got shape {tuple(video.shape)}")
    B, Fr, C, H, W = video.shape
    _, ph, pw = config.patch_size
    if config.latent_channels != C:
        raise ValueError(f"batch['video'] has {C} latent channels, the model expects {config.latent_channels}")
    if H % ph or W % pw:
        raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    if Fr < 2:
        raise ValueError(f"episodes need at least 2 latent frames, got {Fr}")
    if actions.shape != (B, (Fr - 1) * config.tau, config.action_channels):
        raise ValueError(f"batch['actions'] must be (B, (F-1)*tau, A) = {(B, (Fr - 1) * config.tau, config.action_channels)}, "
                         f"got {tuple(actions.shape)}")
    if not isinstance(amask, torch.Tensor) or amask.shape != (B, config.action_channels):
        raise ValueError(f"batch['action_mask'] must be (B, {config.action_channels}), got "
                         f"{tuple(getattr(amask, 'shape', ()))}")
    if text.ndim != 3 or text.shape[0] != B or text.shape[2] != config.text_dim:
        raise ValueError(f"batch['text'] must be (B, T, {config.text_dim}), got {tuple(text.shape)}")
    if "num_frames" in batch:
        n = torch.as_tensor(batch["num_frames"])
        if n.shape != (B,) or n.min() < 2 or n.max() > Fr:
            raise ValueError(f"batch['num_frames'] must be (B,) ints in [2, {Fr}], got {n.tolist()}")
    for key, t in batch.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"batch[{key!r}] contains NaN or inf")


def build_training_sequence(model, batch: dict, generator: torch.Generator | None = None) -> TrainingSequence:
    c = model.config
    validate_batch(batch, c)
    video, actions = batch["video"], batch["actions"]
    amask = batch["action_mask"].bool()
    text = batch["text"]
    B, Fr, _C, H, W = video.shape
    dev = video.device
    num_frames = torch.as_tensor(batch.get("num_frames", [Fr] * B)).tolist()
    rows = torch.as_tensor(batch.get("row", list(range(B)))).tolist()

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(dev)

    if "chunk_size" in batch:
        K = int(batch["chunk_size"])
    else:
        sizes = c.train_chunk_sizes
        K = sizes[int(torch.randint(len(sizes), (1,), generator=generator))]
    if K < 1:
        raise ValueError(f"chunk_size must be >= 1, got {K}")
    reactive = c.objective == "reactive"
    fdm = c.fdm_loss_weight > 0 and not reactive
    tokens_per_frame = (H // c.patch_size[1]) * (W // c.patch_size[2])

    # text dropout (CFG): the dropped instruction becomes the all-zero embedding the sampler uses as "null"
    keep_text = (rand(B) >= c.text_dropout).to(text.dtype) if model.training else torch.ones(B, device=dev)
    ctx_all = model.embed_text(text * keep_text[:, None, None])  # (B, T, d_v)

    per_row: dict[int, dict[str, list]] = {}
    for b in range(B):
        n_f = num_frames[b]
        z = video[b, :n_f].float()
        a = actions[b, : (n_f - 1) * c.tau].float()
        chunk_of_frame = torch.tensor([0] + [(f - 1) // K + 1 for f in range(1, n_f)], device=dev)
        n_chunks = int(chunk_of_frame[-1])
        act_chunk = chunk_of_frame[1:].repeat_interleave(c.tau)

        # clean video with per-chunk noisy-history augmentation (Eq. 10)
        aug = rand(n_chunks + 1) < c.noisy_history_prob
        s_aug = torch.where(aug, c.noisy_history_min + (1 - c.noisy_history_min) * rand(n_chunks + 1),
                            torch.ones(n_chunks + 1, device=dev))
        s_clean = s_aug[chunk_of_frame]
        z_clean = (1 - s_clean)[:, None, None, None] * randn_like(z) + s_clean[:, None, None, None] * z

        # noisy copies: one flow time per chunk and modality
        s_v = 1 - _shifted(rand(n_chunks + 1), c.video_shift)
        s_a = 1 - _shifted(rand(n_chunks + 1), c.action_shift)
        eps_v = randn_like(z[1:])
        sv = s_v[chunk_of_frame[1:]][:, None, None, None]
        z_noisy = (1 - sv) * eps_v + sv * z[1:]
        eps_a = randn_like(a)
        sa = s_a[act_chunk][:, None]
        a_noisy = (1 - sa) * eps_a + sa * a

        f_pos = torch.arange(n_f, device=dev)
        vpos_all = model.video_positions(f_pos, H, W)
        vpos_next = vpos_all[tokens_per_frame:]
        apos = model.action_positions(0, a.shape[0], H, W, device=dev)
        rep = tokens_per_frame

        v_parts = [  # (frames, per-frame s, chunk id per frame, kind, positions, target or None, weight name)
            (z_clean, s_clean, 2 * chunk_of_frame, CLEAN, vpos_all, None, None),
            (z_noisy, sv.flatten(), 2 * chunk_of_frame[1:], NOISY, vpos_next, eps_v - z[1:], "dyn"),
        ]
        a_parts = [
            (a, torch.ones(a.shape[0], device=dev), 2 * act_chunk + 1, CLEAN, apos, None),
            # reactive: the noisy actions of chunk c see only the clean history before video chunk c (the FDM_ACT
            # rule), i.e. the observations available when the chunk starts; no video is predicted
            (a_noisy, sa.flatten(), 2 * act_chunk + 1, FDM_ACT if reactive else NOISY, apos, eps_a - a),
        ]
        if reactive:
            v_parts = v_parts[:1]
        if fdm:
            s_f = 1 - _shifted(rand(n_chunks + 1), c.video_shift)
            eps_f = randn_like(z[1:])
            sf = s_f[chunk_of_frame[1:]][:, None, None, None]
            v_parts.append(((1 - sf) * eps_f + sf * z[1:], sf.flatten(), 2 * chunk_of_frame[1:], FDM_VID, vpos_next,
                            eps_f - z[1:], "fdm"))
            a_parts.append((a, torch.ones(a.shape[0], device=dev), 2 * act_chunk + 1, FDM_ACT, apos, None))

        r = per_row.setdefault(rows[b], {k: [] for k in ("vx", "vt", "vpos", "vc", "vk", "vs", "vtgt", "dyn", "fdm",
                                                          "ax", "axm", "at", "apos", "ac", "ak", "as", "atgt", "am", "ctx")})
        seg = len(r["ctx"])
        r["ctx"].append(ctx_all[b])
        for frames, s, chunk, kind, pos, target, wname in v_parts:
            n = frames.shape[0] * rep
            r["vx"].append(frames)  # embedded below in one call for the whole batch
            r["vt"].append(s_to_wan_t(s).repeat_interleave(rep))
            r["vpos"].append(pos)
            r["vc"].append(chunk.repeat_interleave(rep))
            r["vk"].append(torch.full((n,), kind, device=dev))
            r["vs"].append(torch.full((n,), seg, device=dev))
            tgt = torch.zeros(n, c.patch_dim, device=dev) if target is None else model.patchify(target[None])[0]
            r["vtgt"].append(tgt)
            r["dyn"].append(torch.full((n,), float(wname == "dyn"), device=dev))
            r["fdm"].append(torch.full((n,), float(wname == "fdm"), device=dev))
        m = amask[b].float()
        for acts, s, chunk, kind, pos, target in a_parts:
            n = acts.shape[0]
            r["ax"].append(acts)
            r["axm"].append(amask[b].expand(n, -1))
            r["at"].append(s_to_wan_t(s))
            r["apos"].append(pos)
            r["ac"].append(chunk)
            r["ak"].append(torch.full((n,), kind, device=dev))
            r["as"].append(torch.full((n,), seg, device=dev))
            r["atgt"].append(torch.zeros(n, c.action_channels, device=dev) if target is None else target)
            r["am"].append(m.expand(n, -1) * float(target is not None))

    # One embedding call per modality for the whole batch: the number of module calls must not depend on the data
    # (ZeRO-3 gathers a module's parameters collectively on every call, so ranks must make the same calls).
    order = sorted(per_row)
    frames = torch.cat([f for k in order for f in per_row[k]["vx"]])
    emb_v = model.embed_video(frames[None])[0].split([f.shape[0] * tokens_per_frame for k in order
                                                       for f in per_row[k]["vx"]])
    acts = torch.cat([a for k in order for a in per_row[k]["ax"]])
    masks = torch.cat([m for k in order for m in per_row[k]["axm"]])
    emb_a = model.embed_actions(acts[None], masks[None])[0].split([a.shape[0] for k in order for a in per_row[k]["ax"]])
    iv, ia = iter(emb_v), iter(emb_a)
    for k in order:
        per_row[k]["vx"] = [next(iv) for _ in per_row[k]["vx"]]
        per_row[k]["ax"] = [next(ia) for _ in per_row[k]["ax"]]

    def stack(key: str, pad_value: float, length: int | None = None) -> torch.Tensor:
        seqs = [torch.cat(per_row[k][key]) for k in sorted(per_row)]
        n = length or max(s.shape[0] for s in seqs)
        out = []
        for s in seqs:
            pad = torch.full((n - s.shape[0], *s.shape[1:]), pad_value, dtype=s.dtype, device=s.device)
            out.append(torch.cat([s, pad]))
        return torch.stack(out)

    vk, ak = stack("vk", PAD), stack("ak", PAD)
    vseg, aseg = stack("vs", -1), stack("as", -1)
    video_tokens = Tokens(stack("vx", 0.0), stack("vt", 0.0), stack("vpos", 0.0),
                          TokenMeta(stack("vc", 0), vk, vseg))
    action_tokens = Tokens(stack("ax", 0.0), stack("at", 0.0), stack("apos", 0.0),
                           TokenMeta(stack("ac", 0), ak, aseg))
    # text of every episode in the row, concatenated; a video token may read only its own episode's text
    ctx_rows = [torch.cat(per_row[k]["ctx"]) for k in sorted(per_row)]
    T = text.shape[1]
    Tmax = max(x.shape[0] for x in ctx_rows)
    context = torch.stack([torch.cat([x, x.new_zeros(Tmax - x.shape[0], x.shape[1])]) for x in ctx_rows])
    packed = any(len(per_row[k]["ctx"]) > 1 for k in per_row)
    context_mask = None
    if packed:
        text_seg = torch.arange(Tmax, device=dev) // T
        context_mask = (vseg[:, :, None] == text_seg[None, None, :]) | (vseg[:, :, None] < 0)
    return TrainingSequence(
        video=video_tokens, action=action_tokens, context=context, context_mask=context_mask,
        video_target=stack("vtgt", 0.0), dyn_weight=stack("dyn", 0.0), fdm_weight=stack("fdm", 0.0),
        action_target=stack("atgt", 0.0), action_channel_mask=stack("am", 0.0),
    )
