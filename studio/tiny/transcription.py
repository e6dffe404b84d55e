"""Tiny speech-to-text model: openai/whisper-small's architecture, tokenizer layout and generation settings, random
weights.

The tokenizer keeps Whisper's token layout: text tokens, then `<|endoftext|>`, `<|startoftranscript|>`, the 99
language tokens, `<|translate|>`, `<|transcribe|>`, `<|startoflm|>`, `<|startofprev|>`, `<|nocaptions|>`,
`<|notimestamps|>` and the 1,501 timestamp tokens `<|0.00|>` ... `<|30.00|>`. Only the text part is smaller (a
byte-level BPE trained here) unless `text_tokens` asks for the real 50,257. The generation config carries the ids
`WhisperForConditionalGeneration.generate` looks up (languages, tasks, timestamps, prompts), so language detection,
timestamps and prompts run as with a real checkpoint, and the folder loads with the same `from_pretrained` calls.
"""

from __future__ import annotations

from pathlib import Path

from studio.backends.transcription import WHISPER_LANGUAGES
from studio.registry import ModelSpec
from studio.tiny import seeded
from studio.tiny.text import CORPUS

TINY_TEXT_TOKENS = 512
REAL_TEXT_TOKENS = 50_257  # GPT-2's byte-level BPE, which Whisper's multilingual tokenizer extends
TIMESTAMPS = 1_501  # 0.00 s to 30.00 s in steps of 0.02 s
# whisper-small: 80 mel bins, 30 s windows of 3,000 frames (1,500 encoder positions), up to 448 decoder tokens.
WHISPER_SMALL = {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 12,
                 "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072}
WHISPER_TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}


def whisper_tokenizer(text_tokens: int = TINY_TEXT_TOKENS):
    """A WhisperTokenizer with the real special-token layout after `text_tokens` byte-level BPE tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=text_tokens, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = bpe.get_vocab()
    # A tiny corpus runs out of merges early: filler tokens (never produced by encoding) keep the id layout.
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), text_tokens)})
    vocab["<|endoftext|>"] = text_tokens
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in WHISPER_LANGUAGES), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=_merges(bpe))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # Timestamps are plain (not special) added tokens, as in the real tokenizer, which finds them as the ids after
    # its last special token.
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False,
                                     special=False) for i in range(TIMESTAMPS)])
    return tokenizer


def _merges(bpe) -> list[tuple[str, str]]:
    """The trained merges, which `tokenizers` only exposes through its JSON form."""
    import json

    return [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]


def generation_config(tokenizer) -> dict:
    """The fields of whisper-small's generation_config.json that `generate` reads, with this tokenizer's ids."""
    ids = tokenizer.convert_tokens_to_ids
    specials = ["<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nocaptions|>"]
    eot = ids("<|endoftext|>")
    return {
        "decoder_start_token_id": ids("<|startoftranscript|>"), "bos_token_id": eot, "eos_token_id": eot,
        "pad_token_id": eot, "max_length": 448, "is_multilingual": True,
        "lang_to_id": {f"<|{code}|>": ids(f"<|{code}|>") for code in WHISPER_LANGUAGES},
        "task_to_id": {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        "no_timestamps_token_id": ids("<|notimestamps|>"), "prev_sot_token_id": ids("<|startofprev|>"),
        "max_initial_timestamp_index": 50, "return_timestamps": False,
        "begin_suppress_tokens": [ids("Ġ"), eot], "suppress_tokens": [ids(t) for t in specials],
    }


def build_whisper_folder(folder: Path, shape: dict, text_tokens: int, **generation_overrides) -> None:
    """Write a random-weight Whisper of the given shape with its tokenizer, feature extractor and generation config."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    tokenizer = whisper_tokenizer(text_tokens)
    generation = generation_config(tokenizer) | generation_overrides
    seeded()
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, max_source_positions=1500,
                           max_target_positions=448, decoder_start_token_id=generation["decoder_start_token_id"],
                           bos_token_id=generation["bos_token_id"], eos_token_id=generation["eos_token_id"],
                           pad_token_id=generation["pad_token_id"], **shape)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)


# Random weights never end a window the way a real checkpoint does (a lone timestamp, then <|endoftext|>), so each
# decoding pass runs to max_length (448 positions, about 1.3 s here) and transformers then decodes the window again
# from its last timestamp pair, as often as the random timestamps say. One pass of at most 64 positions keeps a
# window near 0.3 s and still gives several timestamped segments.
RANDOM_WEIGHTS_GENERATION = {"max_length": 64, "force_unique_generate_call": True}


def build_whisper(folder: Path, spec: ModelSpec) -> None:
    build_whisper_folder(folder, WHISPER_TINY, TINY_TEXT_TOKENS, **RANDOM_WEIGHTS_GENERATION)
