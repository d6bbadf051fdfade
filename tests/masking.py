"""Helpers for reference computations that *mask* what a plan removes in the original HF model.

Pruning a channel must equal masking it: the tests patch the original model's norms so their
statistic runs over the kept channels only, zero the removed units' output weights, and compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def randomized(model, output_scale: float | None = None):
    """Random norm weights, biases and SSM scalars, so no slice can hide behind a constant.

    ``output_scale``: also redraw output projections with this std (depth tests need every block to matter).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("conv1d.bias", ".D", "dt_bias")):
                p.normal_(0, 0.5)
            elif name.endswith("A_log"):
                p.uniform_(-1, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif output_scale and name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
                p.normal_(0, output_scale)
    return model.eval()


def masked_rmsnorm(norm, mask):
    """A forward for an RMSNorm module whose statistic runs over the channels where ``mask`` is 1."""

    def forward(x):
        x32 = x.float()
        var = (x32.pow(2) * mask).sum(-1, keepdim=True) / mask.sum()
        return norm.weight * (x32 * torch.rsqrt(var + norm.variance_epsilon)).to(x.dtype)

    return forward


def masked_gated_norm(norm, mask, groups: int):
    """A forward for a Mamba-2 gated RMSNorm (per B/C group) restricted to the channels in ``mask``.

    Gate before the norm (NemotronH, Bamba, Granite) or after it (FalconH1 ``norm_before_gate``).
    """
    before_gate = getattr(norm, "norm_before_gate", False)

    def forward(x, gate=None):
        h = x.float()
        if not before_gate:
            h = h * F.silu(gate.float())
        h = h * mask
        shape = h.shape
        hg = h.view(*shape[:-1], groups, shape[-1] // groups)
        kept = mask.view(groups, -1).sum(-1, keepdim=True).clamp(min=1)
        var = hg.pow(2).sum(-1, keepdim=True) / kept
        h = (norm.weight.view(groups, -1) * (hg * torch.rsqrt(var + norm.variance_epsilon))).view(shape) * mask
        if before_gate:
            h = h * F.silu(gate.float())
        return h.to(x.dtype)

    return forward


def skip_block(module, args, kwargs, output):
    """Forward hook (``with_kwargs=True``): a dropped block passes the residual stream through."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def zero_removed_bc(mixer, lp, sizes: dict):
    """Zero the B/C rows of in_proj and their conv channels for removed (group, state) pairs."""
    H, P, G, N = sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["mamba_groups"], sizes["ssm_state"]
    inner = H * P
    bc = sorted({g * N + n for g in range(G) for n in range(N) if g not in lp.groups or n not in lp.state})
    with torch.no_grad():
        mixer.in_proj.weight[[2 * inner + i for i in bc] + [2 * inner + G * N + i for i in bc]] = 0
        conv = [inner + i for i in bc] + [inner + G * N + i for i in bc]
        mixer.conv1d.weight[conv] = 0
        mixer.conv1d.bias[conv] = 0


def inner_mask(lp, sizes: dict) -> torch.Tensor:
    """1 on the kept (head, channel) pairs of a Mamba layer."""
    P = sizes["mamba_head_dim"]
    mask = torch.zeros(sizes["mamba_heads"] * P)
    mask[[h * P + p for h in lp.heads for p in lp.head_dim]] = 1
    return mask


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_plan(model, rng, hidden=None, heads_per_group=None, keep_groups=None, head_dim=None, state=None,
                ffn=None, attn_per_kv=None, experts=None, expert_ffn=None, shared_ffn=None, inner=None, drop=()):
    """A random valid plan for any family; ``None`` keeps an axis whole. Each layer's fields say which
    parts it holds (Mamba: ``groups``; attention: ``kv_heads``; MLP: ``ffn``; MoE: ``experts``).
    ``experts`` is the total kept, taken evenly from every router group; each kept expert draws its own
    ``expert_ffn`` neurons. ``inner`` is the count of Mamba-1 channels kept (Jamba)."""
    from hyprune.arch import family_for_config
    from hyprune.arch.family import expert_groups
    from hyprune.plan import identity_plan

    family = family_for_config(model.config)
    plan = identity_plan(family, model.config)
    s = family.sizes(model.config)
    if hidden:
        plan.hidden = sorted(rng.sample(range(s["hidden"]), hidden))
    for lp in plan.layers:
        if ffn and lp.ffn is not None:
            lp.ffn = sorted(rng.sample(range(s["ffn"]), ffn))
        if lp.groups is not None:
            per = s["mamba_heads"] // s["mamba_groups"]
            if keep_groups:
                lp.groups = sorted(rng.sample(range(s["mamba_groups"]), keep_groups))
            k = heads_per_group or per
            lp.heads = [g * per + i for g in lp.groups for i in sorted(rng.sample(range(per), k))]
            if head_dim:
                lp.head_dim = sorted(rng.sample(range(s["mamba_head_dim"]), head_dim))
            if state:
                lp.state = sorted(rng.sample(range(s["ssm_state"]), state))
        if lp.inner is not None:
            if inner:
                lp.inner = sorted(rng.sample(lp.inner, inner))
            if state:
                lp.state = sorted(rng.sample(range(s["ssm_state"]), state))
        if attn_per_kv and lp.kv_heads is not None:
            per_kv = s["attention_heads"] // s["kv_heads"]
            lp.query_heads = [g * per_kv + i for g in lp.kv_heads for i in sorted(rng.sample(range(per_kv), attn_per_kv))]
        if lp.experts is not None:
            groups = expert_groups(model.config)
            per = s["experts"] // groups
            if experts:
                lp.experts = [g * per + i for g in range(groups)
                              for i in sorted(rng.sample(range(per), experts // groups))]
            width = expert_ffn or s["expert_ffn"]
            lp.expert_ffn = [sorted(rng.sample(range(s["expert_ffn"]), width)) for _ in lp.experts]
            if shared_ffn and lp.shared_ffn is not None:
                lp.shared_ffn = sorted(rng.sample(range(s["shared_expert_ffn"]), shared_ffn))
    plan.drop_blocks = list(drop)
    return plan


def zero_removed_query_heads(attn, kept, num_heads: int, head_dim: int):
    """Zero the o_proj columns of the query heads not in ``kept``."""
    with torch.no_grad():
        for h in range(num_heads):
            if h not in kept:
                attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0


def mask_moe(moe, lp, sizes: dict, gone: torch.Tensor):
    """Mask what a plan removes from an MoE block of the original model.

    Removed experts never get chosen: NemotronH's sigmoid router takes each expert's own score (plus
    ``e_score_correction_bias``) for the choice, so a -inf bias keeps it out of every group ranking and
    top-k while the kept experts' weights stay the same. Granite's router softmaxes the top-k *logits* and
    Jamba's softmaxes all logits before its top-k, so their removed experts get a -inf logit (the routers'
    forwards, restated from the HF code).
    Removed expert neurons and removed hidden channels are zeroed in the output projections.
    """
    removed = [e for e in range(sizes["experts"]) if e not in lp.experts]
    with torch.no_grad():
        if hasattr(moe, "gate"):
            moe.gate.e_score_correction_bias[removed] = float("-inf")
        else:
            router = moe.router
            softmax_first = type(router).__name__.startswith("Jamba")

            def route(hidden_states):
                logits = F.linear(hidden_states, router.weight).float()
                logits[:, removed] = float("-inf")
                if softmax_first:  # Jamba: top-k of the softmax over every expert, not renormalised
                    weights, top_index = torch.softmax(logits, dim=-1).topk(router.top_k, dim=-1)
                    return logits, weights.to(hidden_states.dtype), top_index
                top_logits, top_index = logits.topk(router.top_k, dim=-1)  # Granite: softmax of the top-k logits
                return logits, torch.softmax(top_logits, dim=-1).type_as(hidden_states), top_index

            router.forward = route
        down = moe.experts.down_proj  # [experts, hidden (or latent), ffn]
        for e, kept in zip(lp.experts, lp.expert_ffn):
            down[e][:, [f for f in range(sizes["expert_ffn"]) if f not in kept]] = 0
        if getattr(moe, "fc2_latent_proj", None) is not None and hasattr(moe.fc2_latent_proj, "weight"):
            moe.fc2_latent_proj.weight[gone] = 0
        else:
            down[:, gone] = 0
        if lp.shared_ffn is not None:
            shared = moe.shared_experts.down_proj.weight
            shared[:, [f for f in range(sizes["shared_expert_ffn"]) if f not in lp.shared_ffn]] = 0
            shared[gone] = 0


def save_reload(model, folder):
    """``save_pretrained`` then ``from_pretrained``, with no missing, unexpected or mismatched keys."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded


def assert_roundtrip_generates(pruned, folder, vocab: int = 64, new_tokens: int = 6):
    """The reloaded checkpoint equals ``pruned`` on a prompt, and greedy generation with the cache
    equals generation without it. Returns the reloaded model."""
    loaded = save_reload(pruned, folder)
    prompt = torch.randint(1, vocab, (1, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded(prompt, use_cache=False).logits, pruned(prompt, use_cache=False).logits)
    a = loaded.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    b = loaded.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape[1] == prompt.shape[1] + new_tokens and torch.equal(a, b)
    return loaded
