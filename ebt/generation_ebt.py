"""``generate()`` for EBT in the ``transformers`` style, with thinking controls and a KV cache.

Self-contained on purpose: ``save_pretrained`` copies ``modeling_ebt.py`` and its relative imports
(this file) next to the checkpoint, so it may import only the standard library, torch and
transformers. It knows the model only through ``self.model.encode`` (the context stream) and
``self.think`` (the one thinking loop), so generation cannot drift from training or evaluation.

Why not ``GenerationMixin.generate``: an EBT has no next-token logits until it has thought, and
its cache is an ``EBTContext`` rather than a ``Cache``. Per new token:

1. the context stream runs over the one new token and appends its keys/values to the cache
   (``use_cache=False`` instead recomputes the whole prefix, the reference behaviour);
2. ``think()`` optimises the candidate of the last position only: every inner step runs that one
   candidate through the layers against the cached keys/values, and back;
3. the final candidate logits go through the usual logits warpers, then argmax or sampling.

In the joint mode (``joint_block_size`` m > 0) step 2 refines the whole block of m positions after
the context at once and step 3 emits all of them; the next round encodes that block into the cache.

The random starts and Langevin noise of ``think()`` depend only on (seed, absolute position), so
greedy generation picks exactly what ``think()`` picks on the same prefix, cached or not, alone
or in a left-padded batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .configuration_ebt import ThinkingConfig

# Generation options this generate() does not implement, with the value meaning "off". Anything
# else set raises instead of being silently ignored.
_UNSUPPORTED = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "stop_strings": None,
    "max_time": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "prompt_lookup_num_tokens": None,
    "dola_layers": None,
}
_DEFAULT_MAX_LENGTH = 20  # transformers' default total length when no length is given


@dataclass
class EBTGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus what thinking reports per generated token.

    energies: (B, new) final energy of each generated token's candidate (NaN after EOS): the
        model's own uncertainty, lower = more confident.
    steps_taken: (B, new) inner steps spent on each token (fewer than asked with a tolerance).
    function_evaluations: energy passes per token (samples * (2 * steps + 1)).
    """

    energies: torch.FloatTensor | None = None
    steps_taken: torch.LongTensor | None = None
    function_evaluations: int | None = None


def _merge_config(model_config: GenerationConfig, given: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """kwargs > ``given`` > the model's generation config, as ``transformers`` resolves them."""
    config = copy.deepcopy(given) if given is not None else GenerationConfig()
    config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"EBT generate() got unsupported arguments: {sorted(unused)}.")
    return config


def _thinking(kwargs: dict) -> ThinkingConfig:
    """Pop ``thinking=`` and ``think_<field>`` keyword arguments into one ``ThinkingConfig``."""
    given = kwargs.pop("thinking", None)
    if isinstance(given, dict):
        given = ThinkingConfig.from_dict(given)
    return (given or ThinkingConfig()).merged(ThinkingConfig.pop_prefixed(kwargs))


def _check_supported(config: GenerationConfig) -> None:
    bad = {k: getattr(config, k) for k, off in _UNSUPPORTED.items() if getattr(config, k, None) not in (None, off)}
    if bad:
        raise ValueError(
            f"EBT generate() does not support {bad}: it does greedy decoding or sampling "
            "(do_sample, temperature, top_k, top_p) after thinking; unset these options."
        )


def _warpers(config: GenerationConfig) -> LogitsProcessorList:
    """Sampling warpers (the ``transformers`` classes, with its defaults: top_k 50)."""
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    temperature = 1.0 if config.temperature is None else config.temperature
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    top_k = 50 if config.top_k is None else config.top_k
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


class EBTGenerationMixin:
    """Adds ``generate()`` to ``EBTForCausalLM`` (placed before ``GenerationMixin`` in its bases)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        stopping_criteria: StoppingCriteriaList | None = None,
        **kwargs,
    ) -> torch.LongTensor | EBTGenerateOutput:
        """Generate after thinking at every new token.

        input_ids: (B, T) prompt, left-padded in a batch with ``attention_mask`` (1 = token).
        Generation options (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``eos_token_id``, ``pad_token_id``, ``num_return_sequences``, ``use_cache``,
        ``output_scores``, ``output_logits``, ``return_dict_in_generate``) come as keyword
        arguments or in ``generation_config``; ``streamer`` gets ``put``/``end`` as in
        ``transformers``; ``stopping_criteria`` (e.g. lm-eval's stop sequences) ends a sequence
        when it returns True for it. Thinking: ``thinking=ThinkingConfig(...)`` and/or
        ``think_<field>`` keyword arguments (``think_steps=4``), also accepted as entries of the
        ``generation_config``; unset ones default to the model config's ``inference_*`` fields.
        ``energy_terms``: extra ``(weight, term)`` energies for every thinking step (see ``think``).

        Joint mode (``config.joint_block_size`` m > 0): each round thinks about a whole block of m
        tokens after the context and emits it (cut to the length budget); a longer answer takes
        block after block, each continuing the cached context. A row ends at its first EOS.

        Returns the sequences (B * num_return_sequences, T + new), or an ``EBTGenerateOutput``
        with per-token ``energies`` when ``return_dict_in_generate=True``.
        """
        thinking = _thinking(kwargs)
        energy_terms = kwargs.pop("energy_terms", ())
        config = _merge_config(self.generation_config, generation_config, kwargs)
        # Precedence: think_* keyword arguments > ``thinking=`` > the generation config's entries
        # (think_<field>, e.g. from a checkpoint's generation_config.json) > the model config.
        from_config = {name: getattr(config, f"think_{name}", None) for name in ThinkingConfig.field_names()}
        thinking = ThinkingConfig.from_dict(from_config).merged(thinking)
        _check_supported(config)
        if input_ids is None or input_ids.shape[1] == 0:
            raise ValueError("EBT generate() needs a prompt of at least one token: the model predicts after a context token.")

        n_return = config.num_return_sequences or 1
        sequences = input_ids.repeat_interleave(n_return, dim=0)
        mask = torch.ones_like(sequences) if attention_mask is None else attention_mask.repeat_interleave(n_return, dim=0)
        bsz, prompt_len = sequences.shape
        max_new = self._max_new_tokens(config, prompt_len)
        eos = config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=sequences.device)
        pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        use_cache = True if config.use_cache is None else config.use_cache
        warpers = _warpers(config)

        unfinished = torch.ones(bsz, dtype=torch.bool, device=sequences.device)
        context, chunk = None, 0  # chunk: tokens appended last round, not yet in the cache
        energies, steps_taken, scores, raw_logits = [], [], [], []
        function_evaluations = None
        if streamer is not None:
            streamer.put(sequences.cpu())
        while sequences.shape[1] - prompt_len < max_new:
            if context is None or not use_cache:
                context = self.model.encode(sequences, mask)  # (re)computes the whole prefix
            else:
                context = self.model.encode(sequences[:, -chunk:], mask, past=context)  # the new tokens only
            # Autoregressive: think about the last position's next token. Joint mode: the block after the context.
            query = None if self.config.joint_block_size else torch.tensor([context.length - 1], device=sequences.device)
            out = self.think(
                sequences,
                mask,
                thinking=thinking,
                context=context,
                query_index=query,
                energy_terms=energy_terms,
                final_energy=config.return_dict_in_generate,
            )
            chunk = min(out.logits.shape[1], max_new - (sequences.shape[1] - prompt_len))
            logits = out.logits[:, :chunk]  # (B, chunk, V)
            warped = warpers(sequences.repeat_interleave(chunk, dim=0), logits.flatten(0, 1)).view_as(logits)
            if config.do_sample:
                new = torch.multinomial(torch.softmax(warped.flatten(0, 1), dim=-1), num_samples=1).view(bsz, chunk)
            else:
                new = warped.argmax(dim=-1)  # (B, chunk)
            is_eos = torch.isin(new, eos) if len(eos) else torch.zeros_like(new, dtype=torch.bool)
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # positions after a row's first EOS
            keep = unfinished[:, None] & ~after_eos
            new = torch.where(keep, new, pad)
            energies.append(torch.where(keep, out.energies[:, :chunk, -1], float("nan")))
            steps_taken.append(torch.where(keep, out.steps_taken[:, :chunk], 0))
            scores.extend(warped.unbind(1))
            raw_logits.extend(logits.unbind(1))
            function_evaluations = out.function_evaluations
            sequences = torch.cat((sequences, new), dim=1)
            mask = torch.cat((mask, torch.ones_like(new)), dim=1)
            if streamer is not None:
                for column in new.unbind(1):
                    streamer.put(column.cpu())
            unfinished = unfinished & ~(is_eos & keep).any(1)
            if stopping_criteria:
                unfinished = unfinished & ~stopping_criteria(sequences, warped[:, -1])
            if not unfinished.any():
                break
        if streamer is not None:
            streamer.end()

        if not config.return_dict_in_generate:
            return sequences
        return EBTGenerateOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(raw_logits) if config.output_logits else None,
            energies=torch.cat(energies, dim=1),
            steps_taken=torch.cat(steps_taken, dim=1),
            function_evaluations=function_evaluations,
        )

    def _max_new_tokens(self, config: GenerationConfig, prompt_len: int) -> int:
        """New tokens to generate; the prompt plus all but the last of them must fit the context."""
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        else:
            max_new = (config.max_length or _DEFAULT_MAX_LENGTH) - prompt_len
        context = self.config.max_position_embeddings
        if prompt_len > context:
            raise ValueError(
                f"The prompt has {prompt_len} tokens (padding included) but the model's context is "
                f"max_position_embeddings={context}: truncate the prompt (keep its last tokens)."
            )
        if max_new < 1:
            raise ValueError(
                f"Nothing to generate: max_new_tokens={max_new} (max_length counts the prompt's {prompt_len} tokens)."
            )
        if prompt_len + max_new - 1 > context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context "
                f"(max_position_embeddings={context}): ask for at most {context - prompt_len + 1} new tokens."
            )
        return max_new
