"""Token positions of a word or phrase in a prompt, as the model's text encoder actually encodes it.

Shared by the techniques that read or edit the cross-attention of a real word (RealCustom's word mask,
DisenDiff's class/identifier tokens, PVA). Usage::

    tokens = find_phrase_tokens(clip, prompt, "toy", node_name="RealCustomApply")
    tokens.positions            # (5,) — context positions, BOS counted, all occurrences, all tokens
    tokens.indicator()          # float tensor [context_length], 1 at those positions

Positions index the token axis of the CONDITIONING tensor that CLIPTextEncode produces from the same
prompt. On the U-Nets it is ``[1, 77 * chunks, C]``: chunk ``c`` starts at ``77 * c`` and every chunk
starts with BOS. For SDXL the two encoders (``l`` and ``g``) tokenize identically and are concatenated
channel-wise, so they share positions; this is checked rather than assumed. The DiT text encoders fill
the token axis in *stretches* (:func:`context_stretches`): Flux's conditioning is T5-XXL's sequence alone
(no BOS, padded to 256 tokens; its CLIP-L gives only the pooled vector); SD3/SD3.5's is CLIP-L and CLIP-G
side by side (77 per chunk, zero-padded to 4096 channels) followed by T5-XXL's sequence (77 or more), so a
word has positions in both stretches. A phrase must occur in every stretch; T5, unlike CLIP, is
case-sensitive. Matching is by token ids (see
``attention.token_spans``): case and prompt weights do not matter, word forms do ("dogs" ≠ "dog"). The prompt's
``embedding:`` words are checked as ``validation.checked_clip`` checks them (else positions would count a word
ComfyUI then drops).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import families
from ..attention.token_spans import context_length, own_span, phrase_occurrences, token_ids, word_token_ids
from .validation import checked_clip


class PhraseNotInPromptError(ValueError):
    """The word/phrase does not occur in the prompt as the text encoder reads it."""


@dataclass(frozen=True)
class PhraseTokens:
    phrase: str
    prompt: str
    #: context positions of each occurrence of the phrase, in prompt order
    occurrences: tuple[tuple[int, ...], ...]
    #: tokens in the encoded context (77 per chunk)
    context_length: int

    @property
    def positions(self) -> tuple[int, ...]:
        """Every position of every occurrence, sorted (what a word map sums over)."""
        return tuple(sorted({p for occurrence in self.occurrences for p in occurrence}))

    def placed(self, family: families.Family) -> "PhraseTokens":
        """The phrase's positions in the conditioning a model of ``family`` receives (Flux.2's is padded in front)."""
        placement = family.conditioning_placement(self.context_length)
        return PhraseTokens(self.phrase, self.prompt, tuple(placement.shift(o) for o in self.occurrences),
                            placement.total)

    def indicator(self, length: int | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        """``[length]`` vector, 1 at the phrase's positions (``length`` defaults to the prompt's context)."""
        length = self.context_length if length is None else length
        if self.positions[-1] >= length:
            raise ValueError(f"the phrase {self.phrase!r} sits at token {self.positions[-1]} of the prompt, but the "
                             f"conditioning has only {length} tokens; encode the same prompt you named the word in.")
        out = torch.zeros(length, device=device, dtype=dtype)
        out[list(self.positions)] = 1.0
        return out


def context_stretches(clip, tokens: dict) -> list[tuple[str, ...]]:
    """The tokenizer keys (of ``tokens``, ``clip.tokenize``'s output) whose encoders fill the conditioning's
    token axis, one tuple per stretch in token order, as the family of ``clip``'s text encoders lays them out
    (attention.families.context_stretches)."""
    return families.context_stretches(getattr(clip, "cond_stage_model", None), tokens)


def find_phrase_tokens(clip, prompt: str, phrase: str, node_name: str = "") -> PhraseTokens:
    """Locate ``phrase`` in ``prompt`` with ``clip``'s own tokenizer(s) (ComfyUI ``clip.tokenize``).

    Raises PhraseNotInPromptError naming the phrase and showing the prompt (and what the encoder read)
    when it is absent, and ValueError for an empty phrase, a missing CLIP or encoders that disagree.
    """
    who = _require_phrase(clip, phrase, node_name)
    clip = checked_clip(node_name, clip)
    prompt_tokens = clip.tokenize(prompt, return_word_ids=True)
    searched = _Search(clip, phrase)
    family = families.text_encoder_family(getattr(clip, "cond_stage_model", None))
    occurrences, offset = [], 0
    for stretch in context_stretches(clip, prompt_tokens):
        found = {encoder: _occurrences(clip, encoder, prompt, phrase, prompt_tokens[encoder], searched, who)
                 for encoder in stretch}
        first = next(iter(found.values()))
        if any(positions != first for positions in found.values()):
            raise ValueError(f"{who}the text encoders of this CLIP place {phrase!r} at different tokens "
                             f"({ {e: sorted({p for o in f for p in o}) for e, f in found.items()} }); this model "
                             "family is not supported.")
        # the encoder may leave a template's first tokens out of the conditioning (Qwen-Image's system prompt)
        dropped = family.dropped_template_tokens(token_ids(prompt_tokens[stretch[0]]))
        occurrences += [tuple(offset - dropped + p for p in occurrence) for occurrence in first]
        offset += min(context_length(prompt_tokens[encoder]) for encoder in stretch) - dropped
    return PhraseTokens(phrase, prompt, tuple(occurrences), offset)


def occurrences_per_encoder(clip, prompt: str, phrase: str, node_name: str = "") -> dict[str, list[tuple[int, ...]]]:
    """Positions of every occurrence of ``phrase`` in each text encoder's own tokens of ``prompt`` (the token
    lists ``clip.tokenize`` gives, each encoder with its own tokenizer: CLIP and T5 place words differently)."""
    who = _require_phrase(clip, phrase, node_name)
    clip = checked_clip(node_name, clip)
    prompt_tokens = clip.tokenize(prompt, return_word_ids=True)
    searched = _Search(clip, phrase)
    return {encoder: _occurrences(clip, encoder, prompt, phrase, chunks, searched, who)
            for encoder, chunks in prompt_tokens.items()}


def _require_phrase(clip, phrase: str, node_name: str) -> str:
    """The error prefix naming ``node_name``, after checking there is a CLIP and a phrase to look for."""
    who = f"{node_name}: " if node_name else ""
    if clip is None:
        raise ValueError(f"{who}the clip input is empty; connect the text encoder that encodes the prompt.")
    if not phrase.strip():
        raise ValueError(f"{who}name the word of the prompt to use (it is empty).")
    return who


def encoder_attribute(clip, key: str) -> str:
    """ComfyUI's name of the text encoder whose tokens ``clip.tokenize`` keys ``key``, as an attribute of the
    tokenizer and of the text model: ``clip_<key>`` where ComfyUI's tokenizer wraps one encoder (CLIP-L ``l`` ->
    ``clip_l``; Chroma's T5 ``t5xxl`` -> ``clip_t5xxl``), the key itself where it combines several (Flux's and
    SD3's ``t5xxl``)."""
    return f"clip_{key}" if hasattr(clip.tokenizer, f"clip_{key}") else key


def embedding_key(clip, key: str) -> str:
    """The embedding key (``embedding:`` words' files and token vectors of trainers) of the text encoder whose
    tokens ``clip.tokenize`` keys ``key``: its tokenizer's (``clip_l``, ``t5xxl``)."""
    return getattr(clip.tokenizer, encoder_attribute(clip, key)).embedding_key


class _Search:
    """What a phrase is searched for in a prompt: its tokens as each encoder's tokenizer gives them, alone and after a
    space (byte-level tokenizers such as Flux.2's Mistral one give a word after a space other tokens), without the
    template, BOS, EOS and padding the tokenizer puts around any text (what it gives the empty prompt)."""

    def __init__(self, clip, phrase: str):
        self.empty = clip.tokenize("", return_word_ids=True)
        self.forms = [clip.tokenize(form, return_word_ids=True) for form in (phrase.strip(), " " + phrase.strip())]

    def token_ids(self, encoder: str) -> list[list]:
        """The distinct token-id sequences of the phrase in ``encoder``'s tokens."""
        found = []
        for form in self.forms:
            ids = word_token_ids(form[encoder], own_span(form[encoder], self.empty[encoder]))
            if ids not in found:
                found.append(ids)
        return found

    def own(self, encoder: str, prompt_chunks) -> range:
        return own_span(prompt_chunks, self.empty[encoder])


def _occurrences(clip, encoder, prompt, phrase, prompt_chunks, searched: _Search, who) -> list[tuple[int, ...]]:
    """Positions of every occurrence of ``phrase`` in one encoder's tokens of ``prompt`` (in the prompt's own text,
    not in the encoder's template)."""
    forms = searched.token_ids(encoder)
    if any(not ids or None in ids for ids in forms):
        raise ValueError(f"{who}{phrase!r} is not plain text the tokenizer can look for (embeddings cannot be "
                         "searched); name a word of the prompt.")
    own = searched.own(encoder, prompt_chunks)
    occurrences = sorted({o for ids in forms for o in phrase_occurrences(prompt_chunks, ids, own)})
    if not occurrences:
        raise PhraseNotInPromptError(
            f"{who}the word {phrase!r} does not occur in the prompt as the text encoder reads it.\n"
            f"Prompt: {prompt!r}\nThe encoder reads: {_readable(clip, encoder, prompt_chunks)}\n"
            "Write the word exactly as it appears in the prompt ((word:1.2) weights do not matter, word forms do: "
            "'dogs' is not 'dog'; CLIP ignores case, T5 (Flux, SD3) does not).")
    return occurrences


def _readable(clip, encoder: str, chunks) -> str:
    """The prompt's word tokens as ``encoder``'s vocabulary pieces, so a user sees why a word did not match."""
    pairs = [(token, weight) for chunk in chunks for token, weight, word_id in chunk
             if word_id != 0 and isinstance(token, int)]
    tokenizer = getattr(clip.tokenizer, encoder_attribute(clip, encoder), clip.tokenizer)
    pieces = [piece for _pair, piece in tokenizer.untokenize(pairs)]
    return " ".join(piece.replace("</w>", "").replace("\u2581", "") for piece in pieces) or "(no words)"
