"""Where a phrase sits in a tokenized prompt, in positions of the encoded text context.

Works on the token lists ComfyUI's tokenizers return with ``return_word_ids=True``: a list of chunks
(one per 77-token CLIP window), each a list of ``(token, weight, word_id)``. Word id 0 marks the tokens
that belong to no word (BOS, EOS, padding), so BOS handling and chunk boundaries need no knowledge of
the tokenizer. The encoder concatenates the chunks' outputs, so the context position of token ``i`` of
chunk ``c`` is ``sum(len(chunk) for the chunks before c) + i``.

Matching is on token ids, exactly as the text encoder sees them: prompt weights such as ``(dog:1.2)``
do not hide the word, whereas "dogs" does not contain "dog" (different BPE tokens). Tokens that are
embedding vectors (``embedding:name``) match nothing.
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


def word_token_ids(chunks: TokenChunks) -> list:
    """The ids of a tokenized phrase's own tokens (BOS, EOS and padding dropped)."""
    return [_token_id(token) for chunk in chunks for token, _weight, word_id in chunk if word_id != 0]


def context_length(chunks: TokenChunks) -> int:
    """Number of tokens of the encoded context (sum of the chunk lengths, normally 77 per chunk)."""
    return sum(len(chunk) for chunk in chunks)


def phrase_occurrences(prompt_chunks: TokenChunks, phrase_ids: Sequence) -> list[tuple[int, ...]]:
    """Context positions of every occurrence of ``phrase_ids`` among the prompt's word tokens.

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
    return [tuple(positions[start:start + width]) for start in find_subsequence(ids, phrase_ids)]
