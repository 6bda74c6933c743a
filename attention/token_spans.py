"""Where a phrase sits in a tokenized prompt, in positions of the encoded text context.

Works on the token lists ComfyUI's tokenizers return with ``return_word_ids=True``: a list of chunks
(one per 77-token CLIP window), each a list of ``(token, weight, word_id)``. Word id 0 marks the tokens
that belong to no word (BOS, EOS, padding), so BOS handling and chunk boundaries need no knowledge of
the tokenizer. The encoder concatenates the chunks' outputs, so the context position of token ``i`` of
chunk ``c`` is ``sum(len(chunk) for the chunks before c) + i``.

Matching is on token ids, exactly as the text encoder sees them: prompt weights such as ``(dog:1.2)``
do not hide the word, whereas "dogs" does not contain "dog" (different BPE tokens). Tokens that are
embedding vectors (``embedding:name``) match nothing.

Some text encoders wrap the prompt in a template of their own (Flux.2's Mistral system prompt), whose words
carry word ids like the prompt's: what the prompt itself adds is what its tokens do not share with the empty
prompt's, between their common beginning and end (:func:`own_span`).
"""
from __future__ import annotations

from collections.abc import Sequence

TokenChunks = Sequence[Sequence[tuple]]  # chunks of (token, weight, word_id)


def find_subsequence(sequence: Sequence, pattern: Sequence) -> list[int]:
    """Start indices of every occurrence of ``pattern`` in ``sequence`` (overlaps included)."""
    if not pattern:
        raise ValueError("cannot search for an empty token sequence")
    pattern = list(pattern)
    width = len(pattern)
    return [start for start in range(len(sequence) - width + 1) if list(sequence[start:start + width]) == pattern]


def _token_id(token):
    return token if isinstance(token, int) else None  # embedding vectors have no id to match


def _ids_and_words(chunks: TokenChunks) -> list[tuple]:
    return [(_token_id(token), word_id) for chunk in chunks for token, _weight, word_id in chunk]


def token_ids(chunks: TokenChunks) -> list:
    """The ids of every token in order (None for embedding vectors), over all chunks."""
    return [token for token, _word in _ids_and_words(chunks)]


def own_span(chunks: TokenChunks, empty_chunks: TokenChunks) -> range:
    """Context positions of the tokens a prompt adds to ``empty_chunks``, the same tokenizer's tokens of the empty
    prompt: everything after their common beginning and before their common end (a template's text, BOS, EOS,
    padding)."""
    ids, empty = token_ids(chunks), token_ids(empty_chunks)
    limit = min(len(ids), len(empty))
    start = next((i for i in range(limit) if ids[i] != empty[i]), limit)
    end = next((i for i in range(limit - start) if ids[-1 - i] != empty[-1 - i]), limit - start)
    return range(start, len(ids) - end)


def word_token_ids(chunks: TokenChunks, own: range | None = None) -> list:
    """The ids of a tokenized phrase's own tokens (BOS, EOS, padding and, given ``own``, a template's dropped)."""
    positions = own if own is not None else range(context_length(chunks))
    return [token for position, (token, word_id) in enumerate(_ids_and_words(chunks))
            if word_id != 0 and position in positions]


def context_length(chunks: TokenChunks) -> int:
    """Number of tokens of the encoded context (sum of the chunk lengths, normally 77 per chunk)."""
    return sum(len(chunk) for chunk in chunks)


def phrase_occurrences(prompt_chunks: TokenChunks, phrase_ids: Sequence, own: range | None = None
                       ) -> list[tuple[int, ...]]:
    """Context positions of every occurrence of ``phrase_ids`` among the prompt's word tokens (within ``own``, the
    prompt's own span, where given).

    An occurrence may straddle two chunks (ComfyUI splits only between words unless a word is too
    long, but a multi-word phrase can cross the boundary); its positions then skip the EOS/BOS pair.
    """
    if not phrase_ids or any(token is None for token in phrase_ids):
        raise ValueError("the phrase must consist of ordinary vocabulary tokens (no embeddings)")
    ids, positions = [], []
    offset = 0
    for chunk in prompt_chunks:
        for index, (token, _weight, word_id) in enumerate(chunk):
            if word_id != 0:
                ids.append(_token_id(token))
                positions.append(offset + index)
        offset += len(chunk)
    width = len(phrase_ids)
    found = [tuple(positions[start:start + width]) for start in find_subsequence(ids, phrase_ids)]
    return [occurrence for occurrence in found if own is None or all(p in own for p in occurrence)]
