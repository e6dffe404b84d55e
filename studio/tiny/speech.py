"""Tiny speech models: Bark (suno/bark-small's architecture) and VITS (facebook/mms-tts-eng's), random weights;
and MusicGen (facebook/musicgen-small's), which the tests bring as a user model that transformers' text-to-speech
pipeline runs.

Bark and VITS use character-level tokenizers written here, so nothing is downloaded. The folders have the same files as the
real checkpoints and load through the same `studio.backends.speech` loaders.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from studio.registry import ModelSpec
from studio.tiny import seeded

# Bark's sub-models address each other's tokens through fixed offsets in its generation config (text tokens start
# at 10,048 in the semantic vocabulary, the pad and infer tokens sit at 129,595 and 129,599, coarse codes follow the
# 10,000 semantic codes, fine codes use 1,024 + specials), so the vocabulary sizes must stay the real ones.
BARK_VOCAB = {"semantic": (129_600, 10_048), "coarse_acoustics": (12_096, 12_096), "fine_acoustics": (1_056, 1_056)}
BARK_TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "block_size": 1024, "bias": False}


def bark_tokenizer():
    """Bark reads text with a WordPiece (BERT) tokenizer: here a character vocabulary with "##" continuations."""
    from transformers import BertTokenizer

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=False)


def bark_generation_config() -> dict:
    """Bark's generation settings in the form the real checkpoints' generation_config.json has them.

    Two library faults meet here: `save_pretrained` fails with a BarkGenerationConfig attached ("no attribute
    'early_stopping'"), and `BarkModel.generate` fails when the three sub-configs are objects rather than dicts.
    The real checkpoints ship the sub-configs as plain dicts, which load as a GenerationConfig holding dicts, the
    form `generate` expects; so a tiny model gets this dict written as its generation_config.json after saving, and
    the loader treats tiny and real Bark alike.
    """
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig, BarkFineGenerationConfig, BarkGenerationConfig, BarkSemanticGenerationConfig)

    return BarkGenerationConfig(semantic_config=BarkSemanticGenerationConfig().to_dict(),
                                coarse_acoustics_config=BarkCoarseGenerationConfig().to_dict(),
                                fine_acoustics_config=BarkFineGenerationConfig().to_dict()).to_dict()


def build_bark(folder: Path, spec: ModelSpec) -> None:
    from transformers import BarkCoarseConfig, BarkConfig, BarkFineConfig, BarkModel, BarkSemanticConfig, EncodecConfig

    seeded()
    (sem_in, sem_out), (coarse_in, coarse_out), (fine_in, fine_out) = BARK_VOCAB.values()
    config = BarkConfig(
        semantic_config=BarkSemanticConfig(input_vocab_size=sem_in, output_vocab_size=sem_out, **BARK_TINY).to_dict(),
        coarse_acoustics_config=BarkCoarseConfig(input_vocab_size=coarse_in, output_vocab_size=coarse_out,
                                                 **BARK_TINY).to_dict(),
        fine_acoustics_config=BarkFineConfig(input_vocab_size=fine_in, output_vocab_size=fine_out, n_codes_total=8,
                                             n_codes_given=1, **BARK_TINY).to_dict(),
        # EnCodec 24 kHz with narrow layers; its 1,024-entry codebooks and 320-sample hop (75 codes/s) stay real.
        codec_config=EncodecConfig(hidden_size=16, num_filters=4, num_lstm_layers=1, codebook_dim=16).to_dict(),
    )
    BarkModel(config).save_pretrained(folder)
    bark_tokenizer().save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(bark_generation_config(), indent=2))


def vits_tokenizer(folder: Path, vocab: list[str]):
    """A character tokenizer like MMS-TTS's (lower-case text, no phonemizer; other characters are dropped)."""
    from transformers import VitsTokenizer

    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(vocab)}))
    return VitsTokenizer(vocab_file=str(folder / "vocab.json"), phonemize=False)


def build_vits(folder: Path, spec: ModelSpec) -> None:
    from transformers import VitsConfig, VitsModel

    tokenizer = vits_tokenizer(folder, ["<pad>", "<unk>", " ", "'", "-", *string.ascii_lowercase, *string.digits])
    seeded()
    config = VitsConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
        flow_size=16, spectrogram_bins=33, upsample_initial_channel=32, resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1, duration_predictor_filter_channels=16, duration_predictor_num_flows=1,
        depth_separable_num_layers=1,
        sampling_rate=16_000,  # upsample_rates stay [8, 8, 2, 2]: 256 samples per frame, as in the real model
    )
    VitsModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


MUSICGEN_CODEBOOK = 64  # entries per EnCodec codebook; the decoder's vocabulary, its pad / start token one past it


def build_musicgen(folder: Path, spec: ModelSpec) -> None:
    """MusicGen: a T5 text encoder (the tiny chat models' BPE tokenizer stands in for T5's), an EnCodec audio
    codec and a decoder over its codebooks, with 8 new tokens per call (about 0.3 s of audio at 16 kHz)."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    from studio.tiny.text import CHATML_TEMPLATE, _tokenizer

    tokenizer = _tokenizer(["<pad>", "</s>", "<unk>"], CHATML_TEMPLATE, "</s>")
    seeded()
    codec = EncodecConfig(hidden_size=16, num_filters=4, num_lstm_layers=1, codebook_dim=16,
                          codebook_size=MUSICGEN_CODEBOOK, sampling_rate=16_000)
    config = MusicgenConfig(
        text_encoder=T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                              num_heads=2).to_dict(),
        audio_encoder=codec.to_dict(),
        decoder=MusicgenDecoderConfig(vocab_size=MUSICGEN_CODEBOOK, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, ffn_dim=32, num_codebooks=codec.num_quantizers,
                                      pad_token_id=MUSICGEN_CODEBOOK, bos_token_id=MUSICGEN_CODEBOOK).to_dict())
    model = MusicgenForConditionalGeneration(config)
    model.generation_config.update(max_new_tokens=8, decoder_start_token_id=MUSICGEN_CODEBOOK,
                                   pad_token_id=MUSICGEN_CODEBOOK, bos_token_id=MUSICGEN_CODEBOOK)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
