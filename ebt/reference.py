"""The plain way to compute EBT energies, as the paper's code does: for tests and benchmarks.

``plain_energy`` (autoregressive) and ``plain_block_energy`` (joint mode) differ only in the
sequence layout and the attention mask; both run the layers as ``_plain_layers`` writes them out.

The observed tokens and the candidates are laid out as one doubled sequence of length 2L and run
through every layer with one explicit boolean attention mask, recomputed at every inner step. It
shares the model's weights but none of its attention code, so agreement with
``EBTModel.energy`` (cached context, candidate-only attention) checks the two-stream
implementation, and timing it against ``model(...)`` measures what context reuse saves.
"""

from __future__ import annotations

import math

import torch

from .modeling_ebt import EBTCausalLMOutput, EBTForCausalLM, _at_least_fp32


def doubled_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (2L, 2L), True = may attend.

    Rows/cols 0..L-1 are observed tokens x_0..x_{L-1}; L..2L-1 are candidates p_0..p_{L-1}.
    Observed i sees observed j <= i. Candidate i sees observed j <= i and itself, never another
    candidate and never its target x_{i+1}.
    """
    idx = torch.arange(length, device=device)
    causal = idx[None, :] <= idx[:, None]
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool, device=device)
    mask[:length, :length] = causal
    mask[length:, :length] = causal
    mask[length:, length:] = torch.eye(length, dtype=torch.bool, device=device)
    return mask


def plain_energy(model: EBTForCausalLM, input_ids: torch.Tensor, probs: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Energies (B, L) of candidates ``probs`` (B, L, V) from the full doubled sequence."""
    bsz, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device)
    positions = torch.cat((pos, pos + 1))[None].expand(bsz, -1)  # candidate i sits at i + 1
    mask = doubled_mask(length, input_ids.device)
    energies, hidden = _plain_layers(model, input_ids, probs, positions, mask, step)
    if model.model.energy_offset is None:
        return energies[:, length:]
    # the context-only term: candidate i's context ends at observed token i
    return energies[:, length:] + model.model.context_offsets(hidden[:, :length])


def _plain_layers(
    model: EBTForCausalLM,
    input_ids: torch.Tensor,
    probs: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position energies (B, T + Lc) of tokens ``input_ids`` (B, T) followed by candidates
    ``probs`` (B, Lc, V), at RoPE ``positions`` (B, T + Lc), under the boolean ``mask`` (True =
    may attend; (T + Lc, T + Lc) or (B, 1, T + Lc, T + Lc)): every layer written out. Also the
    final hidden states (B, T + Lc, D)."""
    base = model.model
    cfg = model.config
    bsz = input_ids.shape[0]
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    weight = base.embed_tokens.weight.t() if base.candidate_embed is None else base.candidate_embed.weight
    cand = torch.nn.functional.linear(probs.to(weight.dtype), weight)
    if base.step_embed is not None:
        cand = cand + base.step_embed.weight[min(step, base.step_embed.num_embeddings - 1)]
    h = torch.cat((base.embed_tokens(input_ids), cand), dim=1)  # (B, T + Lc, D)
    total = h.shape[1]
    # Llama's RoPE written out (rotate_half), independent of the model's folded-sign tables.
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=work, device=h.device) / head_dim))
    freqs = positions.to(work)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T + Lc, Dh)
    cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    for layer in base.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (proj(x).view(bsz, total, heads, head_dim).transpose(1, 2) for proj in projections)
        q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, T + Lc, T + Lc)
        weights = torch.softmax(_at_least_fp32(scores.masked_fill(~mask, float("-inf"))), dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(bsz, total, heads * head_dim)
        h = h + attn.o_proj(out)
        mlp, x = layer.mlp, layer.post_attention_layernorm(h)
        h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return _at_least_fp32(base.energy_head(base.norm(h))[..., 0]), h


def plain_forward(
    model: EBTForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    init_logits: torch.Tensor | None = None,
) -> EBTCausalLMOutput:
    """The training step of ``model(input_ids, labels=...)`` (train mode), the plain way."""
    return model.training_loss(
        input_ids, None, labels, init_logits, energy_fn=lambda probs, step: plain_energy(model, input_ids, probs, step)
    )


def plain_block_energy(
    model: EBTForCausalLM, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, probs: torch.Tensor, step: int = 0
) -> torch.Tensor:
    """The joint mode's energies (B, m) of a block ``probs`` (B, m, V) after a left-padded prompt
    (B, P), from one sequence (prompt then block, P + m) and one boolean mask: prompt tokens see
    earlier non-padding tokens (and themselves), the block sees every non-padding prompt token
    and the whole block. Positions: prompt tokens count non-padding tokens, block j sits at
    (last prompt position + 1 + j), or at (joint_block_start + j) where the config sets it."""
    bsz, length = prompt_ids.shape
    m = probs.shape[1]
    valid = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompt_pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    slots = torch.arange(m, device=prompt_ids.device)
    start = model.config.joint_block_start
    block_pos = prompt_pos[:, -1:] + 1 + slots if start is None else (start + slots)[None].expand(bsz, -1)
    positions = torch.cat((prompt_pos, block_pos), 1)
    total = length + m
    idx = torch.arange(total, device=prompt_ids.device)
    key_ok = torch.cat((valid, torch.ones(bsz, m, dtype=torch.bool, device=valid.device)), 1)  # (B, P + m)
    causal = (idx[None, :] <= idx[:, None]) & (idx[None, :] < length)  # prompt keys up to the query
    block_rows = (idx[:, None] >= length) & (idx[None, :] >= length)  # the block sees the whole block
    mask = ((causal[None] & key_ok[:, None, :]) | block_rows[None] | torch.eye(total, dtype=torch.bool)[None])[:, None]
    return _plain_layers(model, prompt_ids, probs, positions, mask, step)[0][:, length:]
