"""Token positions of a word or phrase in a prompt, as the model's text encoder actually encodes it.

Shared by the techniques that read or edit the cross-attention of a real word (RealCustom's word mask,
DisenDiff's class/identifier tokens, PVA). Usage::

    tokens = find_phrase_tokens(clip, prompt, "toy", node_name="RealCustomApply")
    tokens.positions            # (5,) — context positions, BOS counted, all occurrences, all tokens
    tokens.indicator()          # float tensor [context_length], 1 at those positions

Positions index the token axis of the CONDITIONING tensor that CLIPTextEncode produces from the same
prompt (``[1, 77 * chunks, C]``): chunk ``c`` starts at ``77 * c`` and every chunk starts with BOS. For
SDXL the two encoders (``l`` and ``g``) tokenize identically and are concatenated channel-wise, so they
share positions; this is checked rather than assumed. Matching is by token ids (see
``attention.token_spans``): case and prompt weights do not matter, word forms do ("dogs" ≠ "dog").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.token_spans import context_length, phrase_occurrences, word_token_ids


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

    def indicator(self, length: int | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        """``[length]`` vector, 1 at the phrase's positions (``length`` defaults to the prompt's context)."""
        length = self.context_length if length is None else length
        if self.positions[-1] >= length:
            raise ValueError(f"the phrase {self.phrase!r} sits at token {self.positions[-1]} of the prompt, but the "
                             f"conditioning has only {length} tokens; encode the same prompt you named the word in.")
        out = torch.zeros(length, device=device, dtype=dtype)
        out[list(self.positions)] = 1.0
        return out


def find_phrase_tokens(clip, prompt: str, phrase: str, node_name: str = "") -> PhraseTokens:
    """Locate ``phrase`` in ``prompt`` with ``clip``'s own tokenizer(s) (ComfyUI ``clip.tokenize``).

    Raises PhraseNotInPromptError naming the phrase and showing the prompt (and what the encoder read)
    when it is absent, and ValueError for an empty phrase, a missing CLIP or encoders that disagree.
    """
    who = f"{node_name}: " if node_name else ""
    if clip is None:
        raise ValueError(f"{who}the clip input is empty; connect the text encoder that encodes the prompt.")
    if not phrase.strip():
        raise ValueError(f"{who}name the word of the prompt to use (it is empty).")
    prompt_tokens = clip.tokenize(prompt, return_word_ids=True)
    phrase_tokens = clip.tokenize(phrase.strip(), return_word_ids=True)
    found: dict[str, PhraseTokens] = {}
    for encoder, chunks in prompt_tokens.items():
        phrase_ids = word_token_ids(phrase_tokens[encoder])
        if not phrase_ids or None in phrase_ids:
            raise ValueError(f"{who}{phrase!r} is not plain text the tokenizer can look for (embeddings cannot be "
                             "searched); name a word of the prompt.")
        occurrences = phrase_occurrences(chunks, phrase_ids)
        if not occurrences:
            raise PhraseNotInPromptError(
                f"{who}the word {phrase!r} does not occur in the prompt as the text encoder reads it.\n"
                f"Prompt: {prompt!r}\nThe encoder reads: {_readable(clip, chunks)}\n"
                "Write the word exactly as it appears in the prompt (case and (word:1.2) weights do not matter, "
                "word forms do: 'dogs' is not 'dog').")
        found[encoder] = PhraseTokens(phrase, prompt, tuple(occurrences), context_length(chunks))
    first = next(iter(found.values()))
    for tokens in found.values():
        if tokens.occurrences != first.occurrences:
            raise ValueError(f"{who}the text encoders of this CLIP place {phrase!r} at different tokens "
                             f"({ {e: t.positions for e, t in found.items()} }); this model family is not supported.")
    return first


def _readable(clip, chunks) -> str:
    """The prompt's word tokens as vocabulary pieces, so a user sees why a word did not match."""
    pairs = [(token, weight) for chunk in chunks for token, weight, word_id in chunk
             if word_id != 0 and isinstance(token, int)]
    pieces = [piece for _pair, piece in clip.tokenizer.untokenize(pairs)]
    return " ".join(piece.replace("</w>", "") for piece in pieces) or "(no words)"
