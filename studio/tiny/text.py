"""Tiny chat models with a byte-level BPE tokenizer trained in-process: Llama and Qwen2 (the tiny profile), and
Phi-3, Gemma and Mistral (user models in the tests: each with its real model's chat template in shape)."""

from __future__ import annotations

from pathlib import Path

from studio.registry import ModelSpec
from studio.tiny import seeded

# TinyLlama's Zephyr-style template; Qwen2 uses ChatML. Both match the real models' own templates in shape.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Gemma has no system role: its template folds a system message into a user turn, as Gemma's own users do.
GEMMA_TEMPLATE = (
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}"
)
# English sentences give the tokenizer whole-word merges, so a random model's replies read as words, not bytes.
CORPUS = [
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog.",
    "Generative models write text, speak, paint images and shape 3D objects.",
    "A language model predicts the next word from the words before it, one token at a time.",
    "Answers can be wrong, so check the facts before you use them in your work.",
    "The studio runs small models on this machine: chat, speech, pictures and meshes.",
    "What would you like to know about the weather, music, science, history or cooking?",
    "Sure, here is a short story about a friendly robot who learned to paint the sea.",
    "<|system|> <|user|> <|assistant|> <|im_start|> <|im_end|> system user assistant",
] * 20


def _tokenizer(specials: list[str], template: str, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, unk_token=None)
    fast.chat_template = template
    assert fast("hello world")["input_ids"], "tiny tokenizer encodes nothing"
    return fast


def _save(folder: Path, model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_llama(folder: Path, spec: ModelSpec) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"], ZEPHYR_TEMPLATE, "</s>")
    seeded()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=spec.options.get("context_length", 256),
                         bos_token_id=tokenizer.convert_tokens_to_ids("<s>"), eos_token_id=tokenizer.eos_token_id)
    _save(folder, LlamaForCausalLM(config), tokenizer)


def build_qwen2(folder: Path, spec: ModelSpec) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, "<|im_end|>")
    seeded()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=spec.options.get("context_length", 256),
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    _save(folder, Qwen2ForCausalLM(config), tokenizer)


def _small(config_class, tokenizer, spec: ModelSpec, **extra):
    """A two-layer config of the architecture, sized like the tiny profile's models."""
    return config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=spec.options.get("context_length", 256),
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def build_phi3(folder: Path, spec: ModelSpec) -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
                           PHI3_TEMPLATE, "<|end|>")
    seeded()
    _save(folder, Phi3ForCausalLM(_small(Phi3Config, tokenizer, spec, bos_token_id=1)), tokenizer)


def build_gemma(folder: Path, spec: ModelSpec) -> None:
    from transformers import GemmaConfig, GemmaForCausalLM

    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE,
                           "<end_of_turn>")
    seeded()
    _save(folder, GemmaForCausalLM(_small(GemmaConfig, tokenizer, spec, head_dim=16, bos_token_id=2)), tokenizer)


def build_mistral(folder: Path, spec: ModelSpec) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], MISTRAL_TEMPLATE, "</s>")
    seeded()
    _save(folder, MistralForCausalLM(_small(MistralConfig, tokenizer, spec, bos_token_id=1)), tokenizer)
