"""Token positions of a phrase in a prompt: pure span search, then the real ComfyUI tokenizers."""
import pytest
import torch
from personalization_nodes.attention.token_spans import (
    context_length,
    find_subsequence,
    own_span,
    phrase_occurrences,
    word_token_ids,
)

BOS, EOS = 49406, 49407


def chunk(ids, word_ids=None):
    """A 77-token chunk as ComfyUI returns it: BOS, the word tokens, EOS, EOS padding."""
    word_ids = word_ids or [1] * len(ids)
    tokens = [(BOS, 1.0, 0)] + [(t, 1.0, w) for t, w in zip(ids, word_ids)] + [(EOS, 1.0, 0)]
    return tokens + [(EOS, 1.0, 0)] * (77 - len(tokens))


def reference_starts(sequence, pattern):
    """Slow obvious reference: compare every window as a string of ids."""
    text = [",".join(map(str, sequence[i:i + len(pattern)])) for i in range(len(sequence))]
    return [i for i, window in enumerate(text) if window == ",".join(map(str, pattern))
            and i + len(pattern) <= len(sequence)]


@pytest.mark.parametrize("seed", range(5))
def test_find_subsequence_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    sequence = torch.randint(0, 3, (40,), generator=gen).tolist()
    pattern = torch.randint(0, 3, (2,), generator=gen).tolist()
    assert find_subsequence(sequence, pattern) == reference_starts(sequence, pattern)


def test_find_subsequence_overlaps_and_empty():
    assert find_subsequence([7, 7, 7], [7, 7]) == [0, 1]
    with pytest.raises(ValueError):
        find_subsequence([1, 2], [])


def test_positions_count_bos_and_all_occurrences():
    prompt = [chunk([10, 11, 12, 11, 12])]
    assert phrase_occurrences(prompt, [11, 12]) == [(2, 3), (4, 5)]
    assert context_length(prompt) == 77


def test_positions_in_later_chunks_are_offset_and_may_straddle():
    first = chunk(list(range(100, 175)))  # 75 words fill the chunk
    second = chunk([200, 201])
    prompt = [first, second]
    assert phrase_occurrences(prompt, [200]) == [(78,)]  # 77 + BOS
    # the last word of chunk 0 followed by the first of chunk 1 skips EOS/padding and the next BOS
    assert phrase_occurrences(prompt, [174, 200]) == [(75, 78)]
    assert context_length(prompt) == 154


def test_special_tokens_never_match_and_word_ids_drop_them():
    prompt = [chunk([10])]
    assert phrase_occurrences(prompt, [EOS]) == []
    assert word_token_ids([chunk([5, 6])]) == [5, 6]


def test_embedding_tokens_match_nothing():
    embedding = torch.zeros(768)
    prompt = [[(BOS, 1.0, 0), (embedding, 1.0, 1), (10, 1.0, 2), (EOS, 1.0, 0)]]
    assert phrase_occurrences(prompt, [10]) == [(2,)]
    with pytest.raises(ValueError):
        phrase_occurrences(prompt, [None])


def templated(ids, template=(1, 90, 91, 92, 3), close=4):
    """One chunk as a templating tokenizer gives it (Flux.2's Mistral: BOS, a system prompt of words, the
    instruction marker, the prompt, the closing marker, no padding); every token carries word id 1."""
    return [[(t, 1.0, 1) for t in (*template, *ids, close)]]


def test_the_prompts_own_span_excludes_a_template_and_padding():
    assert own_span(templated([91, 10, 11]), templated([])) == range(5, 8)
    # a word of the template (91) that the prompt also holds is found only in the prompt's own span
    assert phrase_occurrences(templated([91, 10, 11]), [91]) == [(2,), (5,)]
    assert phrase_occurrences(templated([91, 10, 11]), [91], own_span(templated([91, 10, 11]), templated([]))) == [(5,)]
    assert word_token_ids(templated([10, 11]), own_span(templated([10, 11]), templated([]))) == [10, 11]
    # CLIP's BOS, EOS and EOS padding: the own span is the words between them
    assert own_span([chunk([10, 11])], [chunk([])]) == range(1, 3)
    assert own_span([chunk(list(range(100, 175))), chunk([200])], [chunk([])]) == range(1, 79)


# --- real ComfyUI tokenizers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_tokens(comfy):
    from harness.comfy_env import pack_module
    return pack_module("nodes.prompt_tokens")


def official_start(clip, prompt, phrase):
    """The released RealCustom formula: span starts at len(tokens(prefix)) + 1 (BOS), one 77-chunk."""
    hf = clip.tokenizer.clip_l.tokenizer
    starts, at = [], prompt.find(phrase)
    while at >= 0:
        starts.append(len(hf(prompt[:at])["input_ids"]) - 2 + 1)  # minus HF's own BOS/EOS, plus BOS
        at = prompt.find(phrase, at + 1)
    return starts


def test_sd15_positions_match_the_official_formula(sd15, prompt_tokens):
    clip = sd15[1]
    prompt = "a photo of a dog with the pink hat, next to another dog with the pink hat"
    for phrase in ("dog", "dog with the pink hat"):
        found = prompt_tokens.find_phrase_tokens(clip, prompt, phrase)
        assert [o[0] for o in found.occurrences] == official_start(clip, prompt, phrase)
        assert all(len(o) == len(phrase.split()) for o in found.occurrences)
    found = prompt_tokens.find_phrase_tokens(clip, prompt, "dog")
    assert found.positions == (5, 14)  # BOS a photo of a dog with the pink hat , next to another dog
    indicator = found.indicator()
    assert indicator.shape == (77,) and indicator.sum() == 2 and indicator[5] == 1


def test_sd15_long_prompt_position_indexes_the_encoded_context(sd15, prompt_tokens):
    from harness.checkpoints import encode_prompt
    clip = sd15[1]
    prompt = " ".join(["red"] * 80) + " toy"
    found = prompt_tokens.find_phrase_tokens(clip, prompt, "toy")
    cond = encode_prompt(clip, prompt)[0][0]
    assert found.context_length == cond.shape[1] == 154
    assert found.positions == (77 + 1 + 5,)  # 75 "red" fill chunk 0; 5 more, then "toy", after BOS


def test_weights_and_case_do_not_hide_the_word(sd15, prompt_tokens):
    found = prompt_tokens.find_phrase_tokens(sd15[1], "A Photo of a (TOY:1.3) car", "toy")
    assert found.positions == (5,)


def test_missing_word_names_word_and_prompt(sd15, prompt_tokens):
    with pytest.raises(prompt_tokens.PhraseNotInPromptError) as error:
        prompt_tokens.find_phrase_tokens(sd15[1], "a photo of two dogs", "dog", node_name="SomeNode")
    message = str(error.value)
    assert "SomeNode" in message and "'dog'" in message and "a photo of two dogs" in message and "dogs" in message


@pytest.mark.parametrize("phrase", ["", "   "])
def test_empty_phrase_is_rejected(sd15, prompt_tokens, phrase):
    with pytest.raises(ValueError, match="empty"):
        prompt_tokens.find_phrase_tokens(sd15[1], "a dog", phrase)


def test_missing_clip_is_rejected(prompt_tokens):
    with pytest.raises(ValueError, match="clip input is empty"):
        prompt_tokens.find_phrase_tokens(None, "a dog", "dog")


def test_sdxl_both_encoders_agree(comfy, prompt_tokens):
    from harness.text_encoders import sdxl_tokenizer_clip
    clip = sdxl_tokenizer_clip()
    assert set(clip.tokenize("a toy")) == {"g", "l"}
    found = prompt_tokens.find_phrase_tokens(clip, "a photo of a plush toy on a table", "plush toy")
    assert found.occurrences == ((5, 6),) and found.context_length == 77


def test_indicator_rejects_a_shorter_context(sd15, prompt_tokens):
    found = prompt_tokens.find_phrase_tokens(sd15[1], " ".join(["red"] * 80) + " toy", "toy")
    with pytest.raises(ValueError, match="only 77 tokens"):
        found.indicator(77)
