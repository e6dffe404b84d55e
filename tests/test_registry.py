"""Profiles, the offline fallback, and the tiny profile: every model builds, loads through the cache and
reloads to the same weights."""

from __future__ import annotations

import pytest
import torch

from studio import devices
from studio.cache import ModelCache, ModelLoadError
from studio import modalities
from studio.catalog import DEFAULT_MODELS, TINY_MODELS, select_profile
from studio.registry import Registry
from studio.weights import estimate_bytes, safetensors_bytes, tiny_folder


def test_both_profiles_cover_every_modality():
    for models in (DEFAULT_MODELS, TINY_MODELS):
        assert {s.modality for s in models} == set(modalities.names())
        assert "piper-joe" in {s.id for s in models}
    repos = {s.repo for s in DEFAULT_MODELS}
    assert {"TinyLlama/TinyLlama-1.1B-Chat-v1.0", "suno/bark-small", "facebook/mms-tts-eng",
            "stabilityai/sd-turbo", "openai/shap-e"} <= repos
    assert len([s for s in DEFAULT_MODELS if s.modality == "chat"]) >= 2
    assert all(s.stands_for for s in TINY_MODELS if s.build)


def test_auto_falls_back_to_tiny_offline_and_names_the_real_models():
    choice = select_profile("auto")  # HF_HUB_OFFLINE=1 and nothing cached
    assert choice.registry.name == "tiny"
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in choice.notice and "tiny profile" in choice.notice


def test_tiny_profile_answers_to_every_real_model_id():
    """Every real model with a tiny twin of its modality is an alias of it, so README's examples run offline."""
    registry = select_profile("tiny").registry
    twins = {spec.id for spec in DEFAULT_MODELS} - {spec.id for spec in TINY_MODELS}
    assert set(registry.aliases) == twins
    for alias in registry.aliases.values():
        real = next(spec for spec in DEFAULT_MODELS if spec.id == alias.id)
        assert registry.get(alias.id).modality == real.modality and alias.id in registry
        assert "tiny random-weight stand-in" in alias.label
    assert registry.get("sd-1.5").id == "tiny-sd" and registry.get("animatediff").id == "tiny-animatediff"
    assert [spec.id for spec in registry] == [spec.id for spec in TINY_MODELS]  # listed once, under its own id


def test_aliases_are_listed_in_both_model_apis(http):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert cards["sd-turbo"]["alias_of"] == "tiny-sd-turbo" and cards["tiny-sd-turbo"]["alias_of"] is None
    assert "tiny random-weight stand-in" in cards["sd-turbo"]["label"]
    assert http.get("/v1/models/whisper-small").json()["alias_of"] == "tiny-whisper"
    catalog = http.get("/models", params={"modality": "chat"}).json()
    assert {(a["id"], a["model"]) for a in catalog["aliases"]} == {("tinyllama-1.1b-chat", "tiny-llama"),
                                                                   ("qwen2.5-0.5b-instruct", "tiny-qwen2")}
    assert http.patch("/models/tinyllama-1.1b-chat", json={"keep_loaded": True}).json()["id"] == "tiny-llama"
    assert http.post("/models/tinyllama-1.1b-chat/unload").json()["state"] == "not loaded"


def test_explicit_default_does_not_fall_back_and_fails_clearly_on_use():
    choice = select_profile("default")
    assert choice.registry.name == "default" and choice.notice is None
    cache = ModelCache(choice.registry, budget=64 * 2**30)
    with pytest.raises(ModelLoadError, match="mms-tts-eng.*facebook/mms-tts-eng.*HF_HUB_OFFLINE"):
        with cache.use("mms-tts-eng"):
            pass
    assert cache.snapshot().models == []


@pytest.mark.parametrize("spec", [s for s in TINY_MODELS if s.build], ids=lambda s: s.id)
def test_tiny_model_builds_loads_and_reloads_identically(spec):
    registry = Registry("tiny", [spec])
    cache = ModelCache(registry, budget=2 * 2**30)
    with cache.use(spec.id) as lease:
        first = {k: v.clone() for k, v in _state(lease.model).items()}
        measured = devices.module_bytes(lease.model)
    del lease
    folder = tiny_folder(spec)
    assert (folder / ".complete").exists()
    assert safetensors_bytes(folder, "float32") > 0
    assert estimate_bytes(spec, "float32") == pytest.approx(measured, rel=0.25)
    cache.clear()
    with cache.use(spec.id) as lease:
        again = _state(lease.model)
        assert not lease.hit
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[k], again[k]) for k in first)


def _state(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(devices.torch_modules(model)) for k, v in m.state_dict().items()}
