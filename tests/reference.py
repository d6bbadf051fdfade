"""An independent reference forward pass for NemotronH / Mamba2, with channel masks.

Written from the equations, not from the transformers code: a sequential SSM recurrence instead of
the chunked scan, explicit causal attention, and every RMSNorm taking its statistic over the *kept*
channels only. It runs in float64 on the original (unpruned) weights. Pruning a channel must equal
masking it here; that is the exactness contract of `hyprune.apply`.

Masks are 0/1 float tensors over the source sizes:
    hidden               [hidden]
    layers[i]["inner"]   [heads * head_dim]   Mamba (head, channel) pairs kept
    layers[i]["state"]   [ssm_state]           SSM states kept (B and C entries)
    layers[i]["heads"]   [num_attention_heads] attention query heads kept
    layers[i]["ffn"]     [intermediate_size]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_rmsnorm(x, weight, mask, eps):
    # x: [..., C]; the mean of squares runs over kept channels only
    var = (x.pow(2) * mask).sum(-1, keepdim=True) / mask.sum()
    return x * torch.rsqrt(var + eps) * weight * mask


def _causal_depthwise_conv(x, weight, bias):
    # x: [b, s, C]; weight: [C, 1, K]; out[t] = sum_k w[k] * x[t - (K-1) + k] + bias
    K = weight.shape[-1]
    padded = F.pad(x, (0, 0, K - 1, 0))  # pad the time axis on the left
    out = sum(weight[:, 0, k] * padded[:, k : k + x.shape[1]] for k in range(K))
    return out + bias if bias is not None else out


def mamba_reference(u, mixer, inner_mask, state_mask, group_of_head=None):
    """One Mamba-2 mixer on u [b, s, hidden] (float64), with (head, channel) pairs and states masked.

    ``group_of_head`` [H] says which B/C group (and gated-norm group) each head uses; the default is the
    model's own consecutive grouping. A group-blind plan hands kept heads to other groups.
    """
    H, P, G, N = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    I = H * P
    w = lambda t: None if t is None else t.detach().double()  # noqa: E731
    proj = u @ w(mixer.in_proj.weight).T
    if mixer.in_proj.bias is not None:
        proj = proj + w(mixer.in_proj.bias)
    z, xbc, dt = proj.split([I, I + 2 * G * N, H], dim=-1)
    xbc = F.silu(_causal_depthwise_conv(xbc, w(mixer.conv1d.weight), w(mixer.conv1d.bias)))
    x, B, C = xbc.split([I, G * N, G * N], dim=-1)
    b, s, _ = u.shape
    x = x.view(b, s, H, P)
    B = B.view(b, s, G, N) * state_mask  # a removed state contributes nothing to C . h
    C = C.view(b, s, G, N) * state_mask
    low, high = mixer.time_step_limit
    dt = F.softplus(dt + w(mixer.dt_bias)).clamp(min=low, max=high)  # [b, s, H]
    A = -torch.exp(w(mixer.A_log))  # [H]
    if group_of_head is None:
        group_of_head = torch.arange(H) // (H // G)
    state = torch.zeros(b, H, P, N, dtype=torch.float64)
    ys = []
    for t in range(s):
        Bt = B[:, t, group_of_head]  # [b, H, N]
        Ct = C[:, t, group_of_head]
        decay = torch.exp(dt[:, t] * A)  # [b, H]
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append((state * Ct[:, :, None, :]).sum(-1) + w(mixer.D)[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, s, I)
    gated = y * F.silu(z) * inner_mask
    # gated RMSNorm per B/C group (the channels of the heads in it), statistic over kept channels
    member = F.one_hot(group_of_head, G).double()  # [H, G]
    sum_sq = gated.view(b, s, H, P).pow(2).sum(-1) @ member  # [b, s, G]
    count = inner_mask.view(H, P).sum(-1) @ member  # [G]
    var = (sum_sq / count.clamp(min=1))[..., group_of_head]  # [b, s, H]
    normed = (gated.view(b, s, H, P) * torch.rsqrt(var + mixer.norm.variance_epsilon)[..., None]).view(b, s, I)
    normed = normed * w(mixer.norm.weight) * inner_mask
    out = normed @ w(mixer.out_proj.weight).T
    if mixer.out_proj.bias is not None:
        out = out + w(mixer.out_proj.bias)
    return out


def attention_reference(u, attn, head_mask, num_heads, num_kv, head_dim):
    """Causal multi-head attention (no RoPE, as in NemotronH) with query heads masked."""
    b, s, _ = u.shape
    w = lambda t: t.detach().double()  # noqa: E731
    q = (u @ w(attn.q_proj.weight).T).view(b, s, num_heads, head_dim).transpose(1, 2)
    k = (u @ w(attn.k_proj.weight).T).view(b, s, num_kv, head_dim).transpose(1, 2)
    v = (u @ w(attn.v_proj.weight).T).view(b, s, num_kv, head_dim).transpose(1, 2)
    kv_of_head = torch.arange(num_heads) // (num_heads // num_kv)
    k, v = k[:, kv_of_head], v[:, kv_of_head]
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    o = scores.softmax(-1) @ v  # [b, heads, s, d]
    o = o * head_mask[None, :, None, None]
    return o.transpose(1, 2).reshape(b, s, num_heads * head_dim) @ w(attn.o_proj.weight).T


def mlp_reference(u, mlp, ffn_mask):
    w = lambda t: t.detach().double()  # noqa: E731
    hidden = torch.relu(u @ w(mlp.up_proj.weight).T).pow(2) * ffn_mask  # relu2
    return hidden @ w(mlp.down_proj.weight).T


def reference_logits(model, input_ids, masks, family):
    """Logits of ``model`` (original weights) with ``masks`` applied, in float64."""
    config = model.config
    backbone = getattr(model, family.base)
    mh = masks["hidden"].double()
    h = backbone.embeddings.weight.detach().double()[input_ids] * mh
    for i, (block, kind) in enumerate(zip(backbone.layers, family.block_kinds(config))):
        if i in masks.get("dropped", ()):
            continue
        u = _masked_rmsnorm(h, block.norm.weight.detach().double(), mh, block.norm.variance_epsilon)
        lm = masks["layers"][i]
        if kind == "mamba":
            y = mamba_reference(u, block.mixer, lm["inner"].double(), lm["state"].double(), lm["group_of_head"])
        elif kind == "attention":
            y = attention_reference(u, block.mixer, lm["heads"].double(), config.num_attention_heads,
                                    config.num_key_value_heads, config.head_dim)
        else:
            y = mlp_reference(u, block.mixer, lm["ffn"].double())
        h = h + y * mh
    h = _masked_rmsnorm(h, backbone.norm_f.weight.detach().double(), mh, backbone.norm_f.variance_epsilon)
    return h @ model.lm_head.weight.detach().double().T


def masks_from_plan(plan, sizes):
    """The masks a plan implies, over the source sizes."""

    def mask(n, keep):
        m = torch.zeros(n)
        m[list(keep)] = 1
        return m

    layers = []
    for lp in plan.layers:
        if lp.kind == "mamba":
            P = sizes["mamba_head_dim"]
            inner = [h * P + p for h in lp.heads for p in lp.head_dim]
            # kept head j reads kept group j // (kept heads per group); for a group-aware plan that is
            # its own group, for a group-blind one it may be another
            per_group = len(lp.heads) // len(lp.groups)
            group_of_head = torch.arange(sizes["mamba_heads"]) // (sizes["mamba_heads"] // sizes["mamba_groups"])
            group_of_head[lp.heads] = torch.tensor([lp.groups[j // per_group] for j in range(len(lp.heads))])
            layers.append({"inner": mask(sizes["mamba_heads"] * P, inner),
                           "state": mask(sizes["ssm_state"], lp.state), "group_of_head": group_of_head})
        elif lp.kind == "attention":
            layers.append({"heads": mask(sizes["attention_heads"], lp.query_heads)})
        else:
            layers.append({"ffn": mask(sizes["ffn"], lp.ffn)})
    return {"hidden": mask(sizes["hidden"], plan.hidden), "layers": layers, "dropped": set(plan.drop_blocks)}
