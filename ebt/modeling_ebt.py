"""Energy-based transformer (EBT) as a Hugging Face causal LM.

Self-contained on purpose: ``save_pretrained`` copies this file next to the checkpoint, so it may
import only the standard library, torch, transformers and ``configuration_ebt``.

How it predicts. For every position r the model keeps a candidate distribution p_r over the token
at r+1 and scores it with a scalar energy E_r(x<=r, p_r). Prediction is optimisation: start from a
random candidate and descend the energy. Two streams share the same Llama blocks:

- the *observed* (context) stream runs the real tokens with ordinary causal attention. It never
  sees a candidate, so it is computed ONCE per forward; its per-layer keys/values (an
  ``EBTContext``, which is also the KV cache of generation) are reused by every inner step;
- the *candidate* stream embeds p_r (softmax -> Linear(V, D)) and, in every layer, attends to the
  observed keys/values at positions <= r and to its own key/value only. RoPE places p_r at the
  position of the token it predicts.

So E_r depends only on (x<=r, p_r): one ``autograd.grad(E.sum(), p)`` gives every position its own
gradient, and the inner gradient never traverses the context stream. Candidate attention is
written out (matmul + softmax) because the fused SDPA kernels have no double backward; the context
stream only needs first-order gradients, so it uses the fused kernel.

``EBTForCausalLM._optimize`` is the one inner loop: training, ``think()``, evaluation and
generation all call it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_ebt import EBTConfig, ThinkingConfig
from .generation_ebt import EBTGenerationMixin

# Keyword arguments that Hugging Face callers (pipelines, harnesses, Trainer) pass to ``forward``
# and that have no meaning for this model: accepted and ignored, anything else is an error.
_IGNORED_FORWARD_KWARGS = frozenset(
    {
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "cache_position",
        "logits_to_keep",
        "num_items_in_batch",
        "token_type_ids",
    }
)
# An extra energy term of ``think``/``generate``: (probs (B, Lc, V), input_ids (B, T), attention_mask
# (B, T)) -> energies (B, Lc) or (B,).
EnergyTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Accepted only as None: the model computes positions itself and keeps its own context cache.
_NONE_ONLY_KWARGS = frozenset({"past_key_values", "position_ids", "inputs_embeds"})


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@dataclass
class EBTCausalLMOutput(ModelOutput):
    """Output of ``EBTForCausalLM.forward``.

    logits: final candidates (B, L, V); ``logits[:, r]`` predicts token r+1, as in any causal LM.
    energies: energy per position and step (B, L, S): column i is the energy before step i; in
        evaluation the last column is the energy of the final candidates.
    step_losses: cross-entropy after each inner step (S,), when labels are given.
    steps_taken: inner steps actually applied per position (B, L) (adaptive thinking stops early).
    final_loss: training only: the (detached) cross-entropy of the final candidates, while
        ``loss`` is the recipe's objective; in evaluation ``loss`` is that cross-entropy.
    draft_logits, draft_loss: training with a draft head: its proposals (B, L, V) and their
        cross-entropy (both detached). contrastive_loss: training with ``contrastive_weight``;
        calibration_loss: with ``calibration_weight`` (the energy against the cross-entropy).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    energies: torch.FloatTensor | None = None
    step_losses: torch.FloatTensor | None = None
    steps_taken: torch.LongTensor | None = None
    final_loss: torch.FloatTensor | None = None
    draft_logits: torch.FloatTensor | None = None
    draft_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    calibration_loss: torch.FloatTensor | None = None


@dataclass
class EBTThinkOutput(ModelOutput):
    """Output of ``EBTForCausalLM.think``.

    logits: final candidates (B, Lc, V) of the best sample per position.
    energies: (B, Lc, steps + 1) energies along the chosen sample's trajectory.
    sample_energies: (samples, B, Lc) final energy of every random start (self-verification).
    steps_taken: (B, Lc) inner steps applied to the chosen sample.
    step_losses: (steps,) cross-entropy after each step when ``labels`` are given (samples == 1).
    trajectory: (B, Lc, steps + 1, V) candidates along the way, when asked for (samples == 1).
    function_evaluations: energy forward passes spent per position (each inner step is one
        forward and one backward of the candidate stream; the final energy is one forward).
    """

    logits: torch.FloatTensor | None = None
    energies: torch.FloatTensor | None = None
    sample_energies: torch.FloatTensor | None = None
    steps_taken: torch.LongTensor | None = None
    step_losses: torch.FloatTensor | None = None
    trajectory: torch.FloatTensor | None = None
    function_evaluations: int | None = None


# --------------------------------------------------------------------------------------------
# Context (observed stream keys/values; doubles as the generation KV cache)
# --------------------------------------------------------------------------------------------


@dataclass
class EBTContext:
    """Per-layer keys/values of the observed stream, RoPE applied.

    keys[l], values[l]: (B, H, T, Dh). key_valid: (B, T) False at padding. positions: (B, T)
    RoPE position of each token (padding-aware, so left-padded batches match unpadded samples).
    draft_logits: (B, n, V) the draft head's proposals for the tokens of the latest ``encode``
    call, which start at index ``draft_offset`` (None without a draft head). energy_offsets:
    (B, n) the energy's context-only term for the same tokens (None without
    ``calibration_offset``).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor
    positions: torch.Tensor
    draft_logits: torch.Tensor | None = None
    draft_offset: int = 0
    energy_offsets: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    def repeat(self, n: int) -> EBTContext:
        """Tile the batch n times, sample-major (row s * B + b), for n random starts."""
        if n == 1:
            return self
        return EBTContext(
            keys=[k.repeat(n, 1, 1, 1) for k in self.keys],
            values=[v.repeat(n, 1, 1, 1) for v in self.values],
            key_valid=self.key_valid.repeat(n, 1),
            positions=self.positions.repeat(n, 1),
            draft_logits=None if self.draft_logits is None else self.draft_logits.repeat(n, 1, 1),
            draft_offset=self.draft_offset,
            energy_offsets=None if self.energy_offsets is None else self.energy_offsets.repeat(n, 1),
        )

    def draft(self, query_index: torch.Tensor) -> torch.Tensor:
        """The draft head's logits (B, Lc, V) after the context indices ``query_index``."""
        if self.draft_logits is None:
            raise ValueError("init='draft' needs a model with a draft head (EBTConfig.draft_head=True).")
        return self.draft_logits[:, self._latest(query_index, "the draft")]

    def offsets(self, query_index: torch.Tensor) -> torch.Tensor | None:
        """The energy's context-only term (B, Lc) after the context indices ``query_index`` (None without one)."""
        if self.energy_offsets is None:
            return None
        return self.energy_offsets[:, self._latest(query_index, "the energy offsets")]

    def _latest(self, query_index: torch.Tensor, what: str) -> torch.Tensor:
        """``query_index`` as indices into the latest ``encode`` call's tokens (what the draft and offsets cover)."""
        local = query_index - self.draft_offset
        if bool((local < 0).any()):
            raise ValueError(f"{what}: only the tokens of the latest encode() call are covered; re-encode the context.")
        return local


# --------------------------------------------------------------------------------------------
# Building blocks (Llama conventions and parameter names)
# --------------------------------------------------------------------------------------------


class EBTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = _at_least_fp32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * _like(x, dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (B, 1, T, Dh) for integer positions (B, T), for ``apply_rope``.

    The sin table carries the sign of Llama's ``rotate_half`` (first half negative), so applying
    RoPE is one roll and three elementwise operations.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    freqs = positions.to(work)[..., None] * inv_freq  # (B, T, Dh/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, None]  # (B, 1, T, Dh)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None]
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE, ``x * cos + rotate_half(x) * sin``, with the sign folded into ``sin``."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def qk_rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (2, B, 1, T, Dh) for queries and keys stacked, the query half pre-scaled by
    1/sqrt(Dh): one ``apply_rope`` rotates both and folds the attention scale into the queries."""
    cos, sin = rope_cos_sin(positions, head_dim, theta, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    return torch.stack((cos * scale, cos)), torch.stack((sin * scale, sin))


class EBTMLP(nn.Module):
    """SwiGLU feed-forward, no biases."""

    def __init__(self, config: EBTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def gate_up_weight(self) -> torch.Tensor:
        """Gate and up projections stacked (2I, D): one matmul for both."""
        return torch.cat((self.gate_proj.weight, self.up_proj.weight))

    def forward(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        """``gate_up_weight``: ``self.gate_up_weight()``, built once where a forward reuses it."""
        gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class EBTAttention(nn.Module):
    """Multi-head attention with the two EBT attention patterns.

    ``observed``: causal self-attention of the context stream (fused SDPA; first order only).
    ``candidate``: candidates attend to observed keys <= their own index plus their own key,
    written out so it can be differentiated twice.
    """

    def __init__(self, config: EBTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = x.shape
        return self.o_proj(x.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], qkv_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (scaled by 1/sqrt(Dh)), keys, values (B, H, T, Dh).

        ``rope``: the ``qk_rope`` tables of their positions; ``qkv_weight``: the three projections
        stacked (3D, D), so one matmul and one rotation serve all heads of q, k and v.
        """
        b, t, _ = x.shape
        qkv = F.linear(x, qkv_weight).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k = apply_rope(qkv[:2], *rope).unbind(0)
        return q, k, qkv[2]

    def observed(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Context stream attention; ``mask`` (B, 1, Tq, Tk) bool, or None for plain causal."""
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=1.0)
        return self._merge(out)

    def candidate(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        hidden: torch.Tensor,
        qkv_weight: torch.Tensor,
        joint: bool = False,
    ) -> torch.Tensor:
        """Candidate stream attention.

        x: (B, Lc, D) candidate states; rope: their ``qk_rope`` tables; keys/values: (B, H, T, Dh)
        observed; hidden: (B, 1, Lc or 1, T) additive mask, -inf at observed keys a candidate may
        not see. A candidate also sees its own key, or with ``joint`` every candidate's (the block).
        """
        q, k, v = self.project(x, rope, qkv_weight)
        scores_obs = torch.matmul(q, keys.transpose(-1, -2)) + hidden  # (B, H, Lc, T); q is pre-scaled
        if joint:
            scores_cand = torch.matmul(q, k.transpose(-1, -2))  # (B, H, Lc, Lc): the whole block
        else:
            scores_cand = (q * k).sum(-1, keepdim=True)  # (B, H, Lc, 1): itself only
        weights = torch.softmax(_at_least_fp32(torch.cat((scores_obs, scores_cand), dim=-1)), dim=-1)
        w_obs, w_cand = _like(weights, q).split((keys.shape[-2], scores_cand.shape[-1]), dim=-1)
        out = torch.matmul(w_obs, values) + (torch.matmul(w_cand, v) if joint else w_cand * v)
        return self._merge(out)  # (B, H, Lc, Dh) -> (B, Lc, D)


class EBTDraftHead(nn.Module):
    """LM head on the context stream: proposes next-token logits from the final hidden state.

    ``draft_layers`` own residual SwiGLU blocks keep its features apart from the shared stack.
    """

    def __init__(self, config: EBTConfig):
        super().__init__()
        self.stop_gradient = config.draft_stop_gradient
        self.norms = nn.ModuleList(EBTRMSNorm(config.hidden_size, config.rms_norm_eps) for _ in range(config.draft_layers))
        self.mlps = nn.ModuleList(EBTMLP(config) for _ in range(config.draft_layers))
        self.norm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.stop_gradient:
            h = h.detach()
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h), mlp.gate_up_weight())
        return _at_least_fp32(self.lm_head(self.norm(h)))


class EBTEnergyOffset(nn.Linear):
    """The energy's context-only term c(x): a linear map of the context stream's final features.

    Zero-initialised without drawing random numbers, so adding it changes no other initial weight
    of a seeded model; its loss reaches no other parameter (only gradient-norm clipping sees it).
    """

    def __init__(self, hidden_size: int):
        with torch.random.fork_rng(devices=[]):
            super().__init__(hidden_size, 1)


class EBTDecoderLayer(nn.Module):
    def __init__(self, config: EBTConfig):
        super().__init__()
        self.input_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EBTAttention(config)
        self.post_attention_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EBTMLP(config)

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k, v) projections stacked (3D, D) and (gate, up) stacked (2I, D).

        Built once per forward and reused by every inner step (fewer, larger matmuls); the
        parameters keep Llama's names, so checkpoints are unchanged.
        """
        attn = self.self_attn
        qkv = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        return qkv, self.mlp.gate_up_weight()

    def feed_forward(self, h: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h), gate_up_weight)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class EBTPreTrainedModel(PreTrainedModel):
    config_class = EBTConfig
    config: EBTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EBTDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, EBTEnergyOffset):  # zeros, drawing nothing: the rest of a seed's init is unchanged
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, EBTForCausalLM):
            init.constant_(module.alpha, self.config.step_size)


class EBTModel(EBTPreTrainedModel):
    """The energy function: context encoder plus candidate stream and energy head."""

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(EBTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        # Candidate distribution (V) -> width (D); optionally the token embedding itself.
        self.candidate_embed = (
            None if config.tie_candidate_embeddings else nn.Linear(config.vocab_size, config.hidden_size, bias=False)
        )
        # One learned offset per inner step: each step may see its own energy landscape.
        self.step_embed = nn.Embedding(config.max_train_steps, config.hidden_size) if config.step_embeddings else None
        self.energy_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.draft = EBTDraftHead(config) if config.draft_head else None
        # Context-only energy term c(x) (calibration_offset): no gradient w.r.t. the candidates, so
        # thinking never sees it; trained only by the calibration loss, on detached features.
        self.energy_offset = EBTEnergyOffset(config.hidden_size) if config.calibration_offset else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: EBTContext | None = None
    ) -> EBTContext:
        """Run the observed stream over ``input_ids`` (B, n), appending to ``past`` if given.

        ``attention_mask`` (B, T_past + n) follows the Hugging Face convention (1 = token,
        0 = padding) and covers the past too. Only keys/values are kept: the last layer's
        attention output and MLP are never needed, so they are skipped.
        """
        bsz, n = input_ids.shape
        device = input_ids.device
        vocab = self.config.vocab_size
        if n == 0 or bsz == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: give at least one sequence of at least one token."
            )
        if bool((input_ids < 0).any() or (input_ids >= vocab).any()):
            raise ValueError(
                f"input_ids holds ids outside [0, vocab_size={vocab}) (min {int(input_ids.min())}, max "
                f"{int(input_ids.max())}): encode the text with this checkpoint's tokenizer."
            )
        t_past = past.length if past is not None else 0
        if t_past + n > self.config.max_position_embeddings:
            raise ValueError(
                f"The context has {t_past + n} tokens but the model was built for at most "
                f"max_position_embeddings={self.config.max_position_embeddings}: truncate the input "
                "(keep its last tokens) or use a model with a longer context."
            )
        if attention_mask is None:
            valid_new = torch.ones(bsz, n, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape != (bsz, t_past + n):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(bsz, t_past + n)} "
                    "(batch, cached + new tokens)."
                )
            valid_new = attention_mask[:, t_past:].bool()
        seen = (
            past.key_valid.sum(1, keepdim=True) if past is not None else torch.zeros(bsz, 1, dtype=torch.long, device=device)
        )
        positions_new = (seen + valid_new.long().cumsum(1) - 1).clamp(min=0)  # (B, n)
        key_valid = valid_new if past is None else torch.cat((past.key_valid, valid_new), 1)

        # Boolean mask (B, 1, n, T): causal, not padding; a token always sees itself so padded
        # query rows stay finite. None = plain causal (fast path).
        mask = None
        if past is not None or not bool(valid_new.all()):
            q_index = torch.arange(t_past, t_past + n, device=device)
            k_index = torch.arange(t_past + n, device=device)
            causal = k_index[None, :] <= q_index[:, None]
            itself = k_index[None, :] == q_index[:, None]
            mask = (causal & (key_valid[:, None, :] | itself))[:, None]

        h = self.embed_tokens(input_ids)
        rope = qk_rope(positions_new, self.config.head_dim, self.config.rope_theta, h.dtype)  # once, all layers
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            qkv_weight, gate_up_weight = layer.fused_weights()
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), rope, qkv_weight)
            if past is not None:
                k = torch.cat((past.keys[i], k), dim=2)
                v = torch.cat((past.values[i], v), dim=2)
            else:  # own storage: the cache must not keep the stacked q/k/v projections alive
                k, v = k.contiguous(), v.contiguous()
            keys.append(k)
            values.append(v)
            if i == len(self.layers) - 1 and self.draft is None and self.energy_offset is None:
                break  # the last layer's output is needed only by a draft head or an energy offset
            h = h + layer.self_attn.observed(q, k, v, mask)
            h = layer.feed_forward(h, gate_up_weight)
        positions = positions_new if past is None else torch.cat((past.positions, positions_new), 1)
        draft = None if self.draft is None else self.draft(h)
        offsets = None if self.energy_offset is None else self.context_offsets(h)
        return EBTContext(keys, values, key_valid, positions, draft, draft_offset=t_past, energy_offsets=offsets)

    def context_offsets(self, h: torch.Tensor) -> torch.Tensor:
        """The energy offset (B, n) from the context stream's final hidden states ``h`` (B, n, D),
        detached: fitting the offset must not move the features the energy's gradient uses."""
        return _at_least_fp32(self.energy_offset(self.norm(h).detach())[..., 0])

    def energy_function(self, context: EBTContext, query_index: torch.Tensor):
        """The energy ``E(probs, step) -> (B, Lc)`` of candidate distributions ``probs`` (B, Lc, V).

        Candidate c predicts the token after context index ``query_index[c]``: it sees observed
        keys 0..query_index[c] and sits at RoPE position (that token's position + 1). What does
        not depend on the candidates (RoPE tables, visibility mask) is built here once and reused
        by every inner step.
        """
        positions = context.positions[:, query_index] + 1  # (B, Lc)
        k_index = torch.arange(context.length, device=context.key_valid.device)
        visible = (k_index[None, :] <= query_index[:, None])[None] & context.key_valid[:, None, :]  # (B, Lc, T)
        energy = self._candidate_energy(context, positions, visible, joint=False)
        offsets = context.offsets(query_index)
        if offsets is None:
            return energy
        return lambda probs, step=0: energy(probs, step) + offsets

    def block_energy_function(self, context: EBTContext, size: int):
        """The joint mode's energy ``E(probs, step) -> (B, size)`` of a block ``probs`` (B, size, V).

        The block continues the whole context: candidate j sits at :meth:`block_positions`, sees
        every (non-padding) context key and every candidate of the block. The energy of a problem
        is the sum over its block; per-position values are returned so that the caller can weight
        or mask positions.
        """
        positions = self.block_positions(context, size)
        return self._candidate_energy(context, positions, context.key_valid[:, None, :], joint=True)

    def block_positions(self, context: EBTContext, size: int) -> torch.Tensor:
        """RoPE positions (B, size) of a joint block: (last context position + 1 + j), or with
        ``config.joint_block_start`` k, k + j whatever the context's length."""
        offsets = torch.arange(size, device=context.key_valid.device)
        start = self.config.joint_block_start
        if start is None:
            return context.positions[:, -1:] + 1 + offsets
        return (start + offsets)[None].expand(context.batch_size, -1)

    def _candidate_energy(self, context: EBTContext, positions: torch.Tensor, visible: torch.Tensor, joint: bool):
        """The energy closure shared by both modes; ``visible`` (B, Lc or 1, T): observed keys a candidate sees."""
        dtype = context.keys[0].dtype
        rope = qk_rope(positions, self.config.head_dim, self.config.rope_theta, dtype)
        hidden = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
        hidden = hidden[:, None]  # (B, 1, Lc or 1, T)
        weight = self.embed_tokens.weight.t() if self.candidate_embed is None else self.candidate_embed.weight
        fused = [layer.fused_weights() for layer in self.layers]

        def energy(probs: torch.Tensor, step: int = 0) -> torch.Tensor:
            h = F.linear(_like(probs, weight.dtype), weight)  # (B, Lc, D)
            if self.step_embed is not None:
                h = h + self.step_embed.weight[min(step, self.step_embed.num_embeddings - 1)]
            for layer, keys, values, (qkv_weight, gate_up_weight) in zip(self.layers, context.keys, context.values, fused):
                x = layer.input_layernorm(h)
                h = h + layer.self_attn.candidate(x, rope, keys, values, hidden, qkv_weight, joint)
                h = layer.feed_forward(h, gate_up_weight)
            return _at_least_fp32(self.energy_head(self.norm(h))[..., 0])

        return energy

    def energy(self, context: EBTContext, probs: torch.Tensor, query_index: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Energies (B, Lc) of ``probs`` (B, Lc, V); one-off form of :meth:`energy_function`."""
        return self.energy_function(context, query_index)(probs, step)


class EBTForCausalLM(EBTPreTrainedModel, EBTGenerationMixin, GenerationMixin):
    """EBT language model.

    Entry points: ``think()`` predicts (inference); ``training_loss()`` runs the config's training
    recipe. ``forward`` follows the Hugging Face convention: in train mode it is
    ``training_loss`` (so DDP's forward wrapper and ``Trainer``-style loops work unchanged), in
    eval mode it thinks (``think_<field>`` keyword arguments or ``thinking=ThinkingConfig(...)``).
    The hooks a generic training loop asks for (starting candidates, optimiser overrides,
    replay rows, health metrics, validation variants) are methods here, next to the recipe.
    """

    # Second-order training may leave a parameter without gradient in a step (e.g. the step
    # embedding of an unused step count); DDP must then look for unused parameters.
    ddp_find_unused_parameters = True

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.model = EBTModel(config)
        # Inner-loop step size. Its own optimiser group (lr x step_size_lr_multiplier, no decay).
        # Shape (1,), not a scalar: FSDP shards only parameters with at least one dimension.
        self.alpha = nn.Parameter(torch.full((1,), float(config.step_size)), requires_grad=config.step_size_learnable)
        self._compiled_energy_and_grad = None  # set by compile_thinking()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    # ---------------------------------------------------------------- the inner loop
    def compile_thinking(self, **options) -> None:
        """Compile the inference energy-and-gradient of every thinking step with ``torch.compile``.

        Dynamic shapes, so a growing generation context or another batch size does not recompile.
        Inference only: training keeps the eager path, because compiled double backward has known
        silent-wrong-gradient reports. The first call compiles (tens of seconds on a CPU); the
        result equals the eager loop to float rounding (tested). ``options`` go to ``torch.compile``.
        torch's kernel cache does not key on ``ATEN_CPU_CAPABILITY``: after changing it, point
        ``TORCHINDUCTOR_CACHE_DIR`` at a fresh folder.
        """
        self._compiled_energy_and_grad = torch.compile(self._energy_and_grad, dynamic=True, **options)

    def _energy_and_grad(
        self, energy_fn, z_in: torch.Tensor, step: int, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energy (B, Lc), its gradient w.r.t. the variable the update rule moves, and p = softmax(z_in)."""
        if self.config.update_rule == "logit":
            x = z_in if z_in.requires_grad else z_in.detach().requires_grad_()
            p = torch.softmax(x, dim=-1)
        else:  # probability and mirror rules move along dE/dp
            p = torch.softmax(z_in, dim=-1)
            x = p if p.requires_grad else p.detach().requires_grad_()
            p = x
        energy = energy_fn(p, step)
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        return energy, grad, p

    def _optimize(
        self,
        energy_fn,
        z: torch.Tensor,
        *,
        steps: int,
        step_size: torch.Tensor,
        training: bool,
        noise: float = 0.0,
        noise_fn=None,
        step_size_factor=None,
        anchor: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        tolerance: float | None = None,
        halting: str = "energy",
        accept_decrease: bool = False,
        joint: bool = False,
        final_energy: bool = True,
        keep_trajectory: bool = False,
    ) -> dict:
        """Refine candidate logits ``z`` (B, Lc, V) by ``steps`` gradient steps on the energy.

        The single implementation of thinking. ``energy_fn(p, step) -> (B, Lc)`` scores candidate
        distributions; normally ``EBTModel.energy_function`` on a context computed once, in the
        tests and benchmarks the plain doubled-sequence reference. ``training`` builds the
        second-order graph as the config says (candidates detached between steps, or only the last
        step second order); otherwise every step is first order and nothing returned carries a
        graph. ``step_size`` broadcasts against (B, Lc, 1); ``step_size_factor(i)`` scales it at
        step i (a schedule). ``anchor`` (B, Lc, V): the logits of q in the ``kl_weight`` term (the
        draft; None = uniform). ``targets`` (B, Lc) (-100 = ignore) gives the cross-entropy after
        every step. ``noise_fn(step, shape)`` draws Langevin noise (seeded at inference).
        Inference only: ``tolerance`` freezes a position once a step lowers its energy by less
        than that (``halting="energy"``) or moves its distribution by less (``"residual"``: the
        largest change of a probability); ``accept_decrease`` undoes a step that raised a
        position's energy and halves that position's step size. With ``joint`` the unit of those
        decisions is the problem (a row's block: its summed energy, its largest move), so a block
        halts, or is undone, as a whole. Returns z, energies (B, Lc, S), step_losses, steps_taken
        and trajectory.
        """
        cfg = self.config

        def per_problem(x: torch.Tensor, how: str) -> torch.Tensor:
            """(B, Lc) -> (B, Lc): with ``joint`` every position gets its row's sum or max."""
            if not joint:
                return x
            reduced = x.sum(1, keepdim=True) if how == "sum" else x.amax(1, keepdim=True)
            return reduced.expand_as(x)

        bsz, n, _ = z.shape
        step_size = (step_size.reshape(1, 1, 1) if step_size.dim() == 0 else step_size).expand(bsz, n, 1)
        active = torch.ones(bsz, n, dtype=torch.bool, device=z.device)
        steps_taken = torch.full((bsz, n), steps if training else 0, dtype=torch.long, device=z.device)
        energies, step_losses = [], []
        trajectory = [z.detach()] if keep_trajectory else None
        last_good = None  # (z, z_in, p, energy, grad) at the last accepted point (accept_decrease)
        for i in range(steps):
            if not training or cfg.detach_between_steps:
                z = z.detach()
            z_in = z + noise * noise_fn(i, z.shape) if noise > 0 else z
            build_graph = training and (cfg.second_order == "all" or i == steps - 1)
            compiled = None if training else self._compiled_energy_and_grad
            with torch.enable_grad():
                energy, grad, p = (compiled or self._energy_and_grad)(energy_fn, z_in, i, build_graph)
            if not training:
                energy, grad, p = energy.detach(), grad.detach(), p.detach()
                if accept_decrease and last_good is not None:
                    # the previous step raised the energy: undo it
                    worse = (per_problem(energy, "sum") > per_problem(last_good[3], "sum")) & active
                    z, z_in, p, energy, grad = (
                        torch.where(worse if new.dim() == 2 else worse[..., None], old, new)
                        for old, new in zip(last_good, (z, z_in, p, energy, grad))
                    )
                    step_size = torch.where(worse[..., None], step_size / 2, step_size)
                    steps_taken = steps_taken - worse.long()
                if tolerance is not None and halting == "energy" and energies:
                    active = active & (per_problem(energies[-1] - energy, "sum") >= tolerance)
                last_good = (z, z_in, p, energy, grad)
            energies.append(energy)
            alpha = step_size if step_size_factor is None else step_size * step_size_factor(i)
            if cfg.update_rule == "probability":
                z_new = p - alpha * grad
            elif cfg.kl_weight > 0:  # damped mirror step on E(p) + kl_weight * KL(p || q)
                pull = alpha * cfg.kl_weight
                z_new = (1 - pull) * z_in - alpha * grad + (0.0 if anchor is None else pull * anchor)
            else:
                z_new = z_in - alpha * grad
            if training:
                z = z_new
            else:
                moved = per_problem((torch.softmax(z_new, dim=-1) - torch.softmax(z, dim=-1)).abs().amax(-1), "max")
                z = torch.where(active[..., None], z_new.detach(), z)
                steps_taken = steps_taken + active.long()
                if tolerance is not None and halting == "residual":
                    active = active & (moved >= tolerance)  # this step barely moved it: converged
            if targets is not None:
                step_loss = F.cross_entropy(_at_least_fp32(z.flatten(0, 1)), targets.flatten(), ignore_index=-100)
                step_losses.append(step_loss if training else step_loss.detach())
            if keep_trajectory:
                trajectory.append(z.detach())
        if final_energy:
            with torch.no_grad():
                last = energy_fn(torch.softmax(z.detach(), dim=-1), steps)
            if accept_decrease and last_good is not None:
                worse = (per_problem(last, "sum") > per_problem(last_good[3], "sum")) & active
                z = torch.where(worse[..., None], last_good[0], z)
                last = torch.where(worse, last_good[3], last)
                steps_taken = steps_taken - worse.long()
            energies.append(last)
        return {
            "z": z,
            "energies": torch.stack(energies, dim=-1),
            "step_losses": torch.stack(step_losses) if step_losses else None,
            "steps_taken": steps_taken,
            "trajectory": torch.stack(trajectory, dim=2) if keep_trajectory else None,
        }

    # ---------------------------------------------------------------- starting points
    def initial_logits(
        self, positions: torch.Tensor, thinking: ThinkingConfig, draft: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Starting candidates (samples * B, Lc, V) for inference at ``positions`` (B, Lc).

        Noise keyed on (seed, absolute position), so a sequence gets the same start alone or in
        any batch, padded or not, and a prefix the same start as in the full sequence. With
        ``init="draft"`` the starts are ``draft`` (B, Lc, V) plus that noise, the first exactly it.
        """
        z = _position_normal(positions, thinking.samples, self.config.vocab_size, thinking.seed, salt=0)
        z = z * self.config.init_noise_scale
        if thinking.init in ("uniform", "draft"):
            z[0] = 0.0  # the first start is the uniform distribution / the draft, the others add noise
        if thinking.init == "draft":
            z = z + draft
        return z.flatten(0, 1)

    def starting_candidates(self, rows: torch.Tensor, length: int, seed: int) -> torch.Tensor:
        """Training starts (B, length, V) for the batch rows with global ids ``rows`` (B,).

        Keyed on (seed, row) by the same scheme as inference, so they do not depend on how a
        global batch is split over processes or micro-batches. A trainer passes a seed that
        changes every optimiser step.
        """
        keys = [(seed, int(row)) for row in rows.tolist()]
        length = self.config.joint_block_size or length  # the joint mode's candidates: its block
        noise = keyed_normal(keys, (length, self.config.vocab_size), self.alpha.device)
        return noise * self.config.init_noise_scale

    # ---------------------------------------------------------------- inference
    def think(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        thinking: ThinkingConfig | None = None,
        *,
        labels: torch.Tensor | None = None,
        init_logits: torch.Tensor | None = None,
        return_trajectory: bool = False,
        context: EBTContext | None = None,
        query_index: torch.Tensor | None = None,
        energy_terms: Sequence[tuple[float, EnergyTerm]] = (),
        final_energy: bool = True,
        **settings,
    ) -> EBTThinkOutput:
        """Predict by minimising the energy: the inference entry point.

        thinking: a ``ThinkingConfig``; ``settings`` are its field names (``steps=8, samples=4``)
            and override it; unset fields take the checkpoint's ``inference_*`` defaults.
        labels: token ids giving ``step_losses`` (one trajectory: samples == 1): (B, L) in the
            HF convention (shifted inside), or in the joint mode the block's targets (B, m).
        init_logits: (B, Lc, V) starting candidates instead of the seeded random starts.
        context/query_index: a precomputed ``EBTContext`` (e.g. a generation KV cache) and which
            of its indices to predict after; by default every position of ``input_ids``. In the
            joint mode (``config.joint_block_size`` m > 0) and without ``query_index`` the
            candidates are the block of m positions after the (left-padded) context.
        energy_terms: ``(weight, term)`` pairs added to the model's energy in the same inner loop
            (product of experts, task constraints; ``ebt.energies``): ``term(probs, input_ids,
            attention_mask)`` -> (B, Lc) per position or (B,) per problem (spread evenly over its
            positions), differentiable in ``probs`` (B, Lc, V). Needs ``input_ids`` even with a
            ``context``.
        final_energy: False skips the energy pass after the last step when the caller does not
            read it (``energies`` then stops before the last step); kept where choosing among
            samples or ``accept_decrease`` needs it.

        Works under ``torch.no_grad()`` (gradients are enabled for the inner loop only and nothing
        is returned with a graph); cannot work under ``torch.inference_mode()``.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "EBT thinking descends the energy with autograd, which torch.inference_mode() disables. "
                "Run the model under torch.no_grad() instead (thinking enables gradients only for its inner loop)."
            )
        cfg = self.config
        thinking = (thinking or ThinkingConfig()).merged(settings).resolve(cfg)
        samples = thinking.samples
        if return_trajectory and samples > 1:
            raise ValueError("think(return_trajectory=True) needs samples=1: each random start has its own trajectory.")
        if labels is not None and samples > 1:
            raise ValueError("think(labels=...) gives per-step losses of one trajectory: use samples=1.")
        if energy_terms and input_ids is None:
            raise ValueError("think(energy_terms=...) needs input_ids (the terms read the prompt), also with a context.")

        with torch.no_grad():
            if context is None:
                if input_ids is None:
                    raise ValueError("think() needs input_ids (or a precomputed context).")
                context = self.model.encode(input_ids, attention_mask)
            joint = cfg.joint_block_size > 0 and query_index is None
            device = context.key_valid.device
            if joint:
                n = cfg.joint_block_size
                positions = self.model.block_positions(context, n)  # (B, m)
                energy_fn = self.model.block_energy_function(context.repeat(samples), n)
                targets = labels
            else:
                if query_index is None:
                    query_index = torch.arange(context.length, device=device)
                n = len(query_index)
                positions = context.positions[:, query_index]
                energy_fn = self.model.energy_function(context.repeat(samples), query_index)
                targets = _shift_labels(labels)[:, query_index] if labels is not None else None
            bsz = context.batch_size
            if targets is not None and targets.shape != (bsz, n):
                raise ValueError(f"labels give targets of shape {tuple(targets.shape)}; expected {(bsz, n)}.")
            if energy_terms:
                energy_fn = _with_terms(energy_fn, energy_terms, input_ids.repeat(samples, 1), attention_mask, samples)
            if init_logits is None:
                draft = context.draft(query_index) if thinking.init == "draft" else None
                z0 = self.initial_logits(positions, thinking, draft)
            else:
                if init_logits.shape != (bsz, n, cfg.vocab_size):
                    raise ValueError(f"init_logits has shape {tuple(init_logits.shape)}; expected {(bsz, n, cfg.vocab_size)}.")
                z0 = init_logits.repeat(samples, 1, 1)
            step_size = (
                self.alpha.detach() if thinking.step_size is None else torch.tensor(thinking.step_size, device=z0.device)
            )

            def noise_fn(step: int, shape: torch.Size) -> torch.Tensor:
                return _position_normal(positions, samples, cfg.vocab_size, thinking.seed, salt=step + 1).flatten(0, 1)

            anchor = None if context.draft_logits is None else context.draft(query_index).repeat(samples, 1, 1)
            result = self._optimize(
                energy_fn,
                z0.to(_at_least_fp32(self.alpha).dtype),
                steps=thinking.steps,
                step_size=_at_least_fp32(step_size),
                training=False,
                noise=thinking.noise * thinking.temperature**0.5,
                noise_fn=noise_fn,
                step_size_factor=thinking.step_size_factor,
                anchor=anchor,
                targets=targets,
                tolerance=thinking.tolerance,
                halting=thinking.halting,
                accept_decrease=thinking.accept_decrease,
                joint=joint,
                final_energy=final_energy or samples > 1 or thinking.accept_decrease or thinking.steps == 0,
                keep_trajectory=return_trajectory,
            )
            vocab = cfg.vocab_size
            z = result["z"].view(samples, bsz, n, vocab)
            energies = result["energies"].view(samples, bsz, n, -1)
            taken = result["steps_taken"].view(samples, bsz, n)
            final = energies[..., -1]  # (S, B, Lc)
            if thinking.selection == "average":  # the mean of the samples' distributions
                logits = torch.logsumexp(torch.log_softmax(z, dim=-1), dim=0) - math.log(samples)
                chosen_energies, chosen_taken = energies.mean(0), taken.max(0).values
            else:  # the start with the lowest final energy: per position, or per problem (joint)
                score = final.sum(-1, keepdim=True).expand_as(final) if joint else final
                best = score.argmin(0)[None]  # (1, B, Lc)
                logits = z.gather(0, best[..., None].expand(1, bsz, n, vocab))[0]
                chosen_energies = energies.gather(0, best[..., None].expand(1, bsz, n, energies.shape[-1]))[0]
                chosen_taken = taken.gather(0, best)[0]
        return EBTThinkOutput(
            logits=logits,
            energies=chosen_energies,
            sample_energies=final,
            steps_taken=chosen_taken,
            step_losses=result["step_losses"],
            trajectory=result["trajectory"],
            function_evaluations=samples * (2 * thinking.steps + int(result["energies"].shape[-1] > thinking.steps)),
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        init_logits: torch.Tensor | None = None,
        thinking: ThinkingConfig | None = None,
        **kwargs,
    ) -> EBTCausalLMOutput:
        """Train mode: ``training_loss``. Eval mode: think, then score ``labels`` if given.

        labels: HF convention (same ids as ``input_ids``, shifted inside, -100 ignored).
        init_logits: (B, L, V) starting candidates (the replay buffer's, in training).
        thinking / ``think_<field>`` keyword arguments: inference settings (eval mode only).
        Joint mode (``config.joint_block_size`` m > 0): ``input_ids`` (B, P + m) is a left-padded
        prompt followed by the m positions of the answer block, whose ids are never read (only
        ``labels`` there, unshifted: ``logits[:, j]`` (B, m, V) predicts block position j).
        """
        settings = ThinkingConfig.pop_prefixed(kwargs)
        unknown = [
            k for k, v in kwargs.items() if k not in _IGNORED_FORWARD_KWARGS and not (k in _NONE_ONLY_KWARGS and v is None)
        ]
        if unknown:
            raise TypeError(f"EBTForCausalLM.forward got unsupported arguments: {sorted(unknown)}.")
        if self.training:
            if thinking is not None or settings:
                raise ValueError(
                    "Thinking settings apply in eval mode; in train mode forward runs the training recipe "
                    "(the config's train_* fields). Call model.eval() to think."
                )
            return self.training_loss(input_ids, attention_mask, labels, init_logits)

        thinking = (thinking or ThinkingConfig()).merged(settings)
        one_trajectory = thinking.resolve(self.config).samples == 1
        prompt, prompt_mask, targets = self._split_block(input_ids, attention_mask, labels)
        think_labels = (labels if targets is None else targets) if one_trajectory else None
        out = self.think(prompt, prompt_mask, thinking, init_logits=init_logits, labels=think_labels)
        loss = None
        if labels is not None:
            targets = _shift_labels(labels) if targets is None else targets
            loss = F.cross_entropy(_at_least_fp32(out.logits.flatten(0, 1)), targets.flatten(), ignore_index=-100)
        return EBTCausalLMOutput(
            loss=loss, logits=out.logits, energies=out.energies, step_losses=out.step_losses, steps_taken=out.steps_taken
        )

    def _split_block(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Joint mode: a row (B, P + m) -> prompt ids (B, P), prompt mask, block targets (B, m).
        Autoregressive: the inputs unchanged and no targets (labels are shifted by the caller)."""
        m = self.config.joint_block_size
        if not m:
            return input_ids, attention_mask, None
        if input_ids.shape[1] <= m:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions; a joint-mode row is a prompt followed by the "
                f"answer block of joint_block_size={m} positions (see data.answer_block), so it needs more than {m}."
            )
        mask = None if attention_mask is None else attention_mask[:, :-m]
        return input_ids[:, :-m], mask, None if labels is None else labels[:, -m:]

    # ---------------------------------------------------------------- training
    def training_steps(self) -> int:
        """The inner step count of one training batch (random in the configured range)."""
        cfg = self.config
        if cfg.train_steps_max is None or cfg.train_steps_max == cfg.train_steps:
            return cfg.train_steps
        return int(torch.randint(cfg.train_steps, cfg.train_steps_max + 1, (1,)).item())

    def training_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        init_logits: torch.Tensor | None = None,
        energy_fn=None,
    ) -> EBTCausalLMOutput:
        """The config's training recipe on one batch (docs/design.md): the training entry point.

        ``loss`` is the recipe's objective (what to back-propagate: the mean over steps for
        ``loss_on="all"``); ``final_loss`` the cross-entropy of the final candidates, the
        quantity evaluation reports. Without ``init_logits`` the starts come from
        ``starting_candidates`` with a seed drawn from torch's global generator. With a draft
        head, ``init_logits`` is an offset from the (detached) draft, and the draft's
        cross-entropy (times ``draft_loss_weight``) joins the objective. With ``train_segments``
        > 1 the loop runs again from its detached result, and the objective averages the segments.
        In the joint mode a row ends with the answer block (see ``forward``).
        ``energy_fn`` replaces the cached-context energy (the plain reference uses it).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "EBT training needs autograd (the inner loop differentiates the energy), but gradients are "
                "disabled. To evaluate, call model.eval() and the forward thinks; to train, leave torch.no_grad()."
            )
        cfg = self.config
        prompt, prompt_mask, targets = self._split_block(input_ids, attention_mask, labels)
        joint = cfg.joint_block_size > 0
        bsz, length = prompt.shape
        n = cfg.joint_block_size if joint else length  # candidate positions per row
        context = None
        if energy_fn is None or self.model.draft is not None or self.model.energy_offset is not None:
            context = self.model.encode(prompt, prompt_mask)
        if energy_fn is None and joint:
            energy_fn = self.model.block_energy_function(context, n)
        elif energy_fn is None:
            energy_fn = self.model.energy_function(context, torch.arange(length, device=input_ids.device))
        if init_logits is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            init_logits = self.starting_candidates(torch.arange(bsz), length, seed)
        draft = None if context is None else context.draft_logits
        if draft is not None:
            init_logits = draft.detach() + init_logits
        step_size = self.alpha
        if cfg.step_size_random_scale > 1:
            s = cfg.step_size_random_scale
            u = torch.rand(bsz, n, 1, device=input_ids.device)
            step_size = self.alpha * (1 / s + (s - 1 / s) * u)  # uniform in [alpha/s, alpha*s]
        if targets is None and labels is not None:
            targets = _shift_labels(labels)
        # Deep supervision: each segment starts where the previous one ended (detached) and is scored.
        z, objectives, losses, energies = _at_least_fp32(init_logits), [], None, []
        for _ in range(cfg.train_segments):
            result = self._optimize(
                energy_fn,
                z,
                steps=self.training_steps(),
                step_size=step_size,
                training=True,
                noise=cfg.langevin_noise,
                noise_fn=lambda step, shape: torch.randn(shape, device=input_ids.device),
                anchor=None if draft is None else draft.detach(),
                targets=targets,
                final_energy=False,
            )
            z, losses = result["z"].detach(), result["step_losses"]
            energies.append(result["energies"].detach())
            if losses is not None:
                objectives.append(losses.mean() if cfg.loss_on == "all" else losses[-1])
        draft_loss = contrastive = calibration = None
        final_step = int(result["steps_taken"].max())  # the step index of the final energy (step embeddings)
        objective = torch.stack(objectives).mean() if objectives else None
        if losses is not None:
            if draft is not None:
                draft_loss = F.cross_entropy(draft.flatten(0, 1), targets.flatten(), ignore_index=-100)
                objective = objective + cfg.draft_loss_weight * draft_loss
            if cfg.contrastive_weight > 0:
                shaping = self._block_contrastive_loss if joint else self._contrastive_loss
                contrastive = shaping(energy_fn, result["z"].detach(), targets, final_step)
                objective = objective + cfg.contrastive_weight * contrastive
            if cfg.calibration_weight > 0:
                offsets = None if context is None else context.energy_offsets  # (B, L): the queries are 0..L-1
                calibration = self._calibration_loss(energy_fn, result["z"].detach(), targets, final_step, offsets)
                objective = objective + cfg.calibration_weight * calibration
        return EBTCausalLMOutput(
            loss=objective,
            final_loss=None if losses is None else losses[-1].detach(),
            logits=result["z"],
            energies=torch.cat(energies, dim=-1),
            step_losses=None if losses is None else losses.detach(),
            steps_taken=result["steps_taken"],
            draft_logits=None if draft is None else draft.detach(),
            draft_loss=None if draft_loss is None else draft_loss.detach(),
            contrastive_loss=None if contrastive is None else contrastive.detach(),
            calibration_loss=None if calibration is None else calibration.detach(),
        )

    def _calibration_loss(
        self, energy_fn, z: torch.Tensor, targets: torch.Tensor, step: int, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error between the energies (B, n) of the final candidates ``z`` (B, n, V)
        and their per-position cross-entropy against ``targets`` (B, n) (-100 = ignore): the
        energy learns to estimate the loss of the candidate it is given. With ``offsets`` (B, n),
        the energy's context-only term, only that term learns (the rest is detached)."""
        energy = energy_fn(torch.softmax(z, dim=-1), step)  # (B, n)
        if offsets is not None:
            energy = (energy - offsets).detach() + offsets
        nll = F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none").view_as(targets)
        scored = targets >= 0
        return F.mse_loss(energy[scored], nll[scored])

    def _contrastive_loss(self, energy_fn, z: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy of the true token among wrong ones, scored by the energies (lower = more
        likely) of one-hot candidates. ``targets`` (B, L); ``z`` (B, L, V) the final candidates,
        whose most likely wrong tokens are the hard negatives; the rest are uniformly random wrong
        tokens (torch's global generator)."""
        cfg = self.config
        vocab, k = cfg.vocab_size, cfg.contrastive_negatives
        true = targets.clamp(min=0)  # ignored positions (-100) are scored, then dropped by the loss
        hard = z.scatter(-1, true[..., None], float("-inf")).topk(k - k // 2, dim=-1).indices  # (B, L, k - k//2)
        offset = torch.randint(1, vocab, (*true.shape, k // 2), device=z.device)
        rand = (true[..., None] + offset) % vocab  # uniform over the wrong tokens
        tokens = torch.cat((true[..., None], hard, rand), dim=-1)  # (B, L, 1 + k); index 0 is the truth
        energies = torch.stack([energy_fn(F.one_hot(tokens[..., j], vocab).to(z.dtype), step) for j in range(k + 1)], -1)
        labels = torch.where(targets >= 0, 0, -100)
        return F.cross_entropy((-energies).flatten(0, 1), labels.flatten(), ignore_index=-100)

    def _block_contrastive_loss(self, energy_fn, z: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        """Joint mode: cross-entropy of the true answer among corrupted ones, scored by the summed
        block energies of one-hot blocks (IRED's contrastive shaping), so the energy ranks whole
        answers and descent has a minimum at the truth. ``targets`` (B, m); ``z`` (B, m, V) the
        final candidates. Negatives: the model's own answer (argmax of ``z``), and answers where
        each position is, with a probability drawn per negative, replaced by the true token of a
        random position of the same block (a cell gets another cell's digit: plausible, wrong).
        A corruption that happens to equal the truth costs nothing (it is pushed up as much as the
        truth is pushed down). Torch's global generator draws the corruptions."""
        cfg = self.config
        vocab, k = cfg.vocab_size, cfg.contrastive_negatives
        true = targets.clamp(min=0)  # (B, m)
        bsz, m = true.shape
        blocks = [true, z.argmax(-1)]
        for _ in range(k - 1):
            rate = torch.rand(bsz, 1, device=z.device)  # how much of the answer this negative changes
            swap = torch.rand(bsz, m, device=z.device) < rate
            source = true.gather(1, torch.randint(0, m, (bsz, m), device=z.device))
            blocks.append(torch.where(swap, source, true))
        energies = torch.stack([energy_fn(F.one_hot(t, vocab).to(z.dtype), step).sum(-1) for t in blocks], -1)  # (B, 1 + k)
        return F.cross_entropy(-energies, torch.zeros(bsz, dtype=torch.long, device=z.device))

    # Hooks of a generic training loop (train/hooks.py gives every causal LM defaults).
    def optimizer_overrides(self) -> dict[str, dict[str, float]]:
        """Per-parameter optimiser settings: alpha learns at lr x step_size_lr_multiplier, no decay."""
        if not self.alpha.requires_grad:
            return {}
        return {"alpha": {"lr_scale": self.config.step_size_lr_multiplier, "weight_decay": 0.0}}

    def replay_rows(self, batch: dict[str, torch.Tensor], output: EBTCausalLMOutput) -> dict[str, torch.Tensor]:
        """Rows for a replay buffer: the final candidates become later starts of their own sequences
        (with a draft head, as the offset from the draft that ``training_loss`` expects)."""
        start = output.logits.detach() if output.draft_logits is None else output.logits.detach() - output.draft_logits
        return {**{k: v for k, v in batch.items() if k != "init_logits"}, "init_logits": start}

    def training_metrics(self, outputs: list[EBTCausalLMOutput]) -> dict[str, float]:
        """Inner-loop health over a step's micro-batches: alpha, energy drop along the steps, loss per step."""
        metrics = {"alpha": float(self.alpha.detach())}
        metrics["energy_drop"] = sum(float((o.energies[..., 0] - o.energies[..., -1]).mean()) for o in outputs) / len(outputs)
        if outputs[-1].step_losses is not None:
            metrics.update({f"step_loss_{i + 1}": float(v) for i, v in enumerate(outputs[-1].step_losses)})
        for name in ("draft_loss", "contrastive_loss", "calibration_loss"):
            if getattr(outputs[-1], name) is not None:
                metrics[name] = sum(float(getattr(o, name)) for o in outputs) / len(outputs)
        return metrics

    def validation_variants(self, think_steps: list[int]) -> dict[str, dict]:
        """Extra validation passes: the default thinking, and ``think_steps`` steps each (suffix -> forward kwargs)."""
        return {"": {}, **{f"_think{k}": {"thinking": ThinkingConfig(steps=k)} for k in think_steps}}


def keyed_normal(keys: list[tuple[int, ...]], shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Standard normal draws (len(keys), *shape), each from a generator seeded by its key alone.

    The model's one seeding scheme for starting candidates and inference noise: a draw depends on
    its key (seed, ..., row or position) and on nothing else in the batch.
    """
    out = torch.empty(len(keys), *shape, device=device)
    for i, key in enumerate(keys):
        seed = 0
        for part in key:
            seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
        out[i] = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    return out


def _position_normal(positions: torch.Tensor, samples: int, vocab: int, seed: int, salt: int) -> torch.Tensor:
    """Noise (samples, B, Lc, V) keyed on (seed, salt, absolute position): batch- and prefix-invariant."""
    unique, inverse = torch.unique(positions, return_inverse=True)
    table = keyed_normal([(seed, salt, pos) for pos in unique.tolist()], (samples, vocab), positions.device)
    return table[inverse].permute(2, 0, 1, 3)  # (U, S, V)[(B, Lc)] -> (B, Lc, S, V) -> (S, B, Lc, V)


def _with_terms(energy_fn, terms: Sequence[tuple[float, EnergyTerm]], input_ids: torch.Tensor, attention_mask, samples: int):
    """``energy_fn`` plus the weighted extra ``terms`` (see ``think``), for ``samples`` starts per row."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.repeat(samples, 1)
    for weight, term in terms:
        if not callable(term) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"energy_terms takes (weight, callable) pairs; got ({weight!r}, {term!r}).")

    def energy(probs: torch.Tensor, step: int = 0) -> torch.Tensor:
        total = energy_fn(probs, step)  # (B, Lc)
        for weight, term in terms:
            extra = term(probs, input_ids, mask)
            if extra.shape not in (total.shape, total.shape[:1]):
                raise ValueError(
                    f"an energy term returned shape {tuple(extra.shape)}; expected {tuple(total.shape)} (per position) "
                    f"or {tuple(total.shape[:1])} (per problem)."
                )
            total = total + weight * (extra if extra.dim() == 2 else extra[:, None] / total.shape[1])
        return total

    return energy


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Candidates and energies are kept in fp32 under bf16/fp16 weights, in fp64 for fp64 checks."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _like(x: torch.Tensor, dtype: torch.Tensor | torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (or another tensor's dtype), without a dispatched no-op when it already is."""
    dtype = dtype.dtype if isinstance(dtype, torch.Tensor) else dtype
    return x if x.dtype == dtype else x.to(dtype)


def _shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets (B, L): position r is scored against token r+1; the last position is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


__all__ = ["EBTContext", "EBTForCausalLM", "EBTModel", "EBTPreTrainedModel", "EBTCausalLMOutput", "EBTThinkOutput"]
