"""The model manager against a local stand-in for the Hugging Face Hub (tests/hub_stand_in.py): a Hub model is
read from its metadata, sized before any download (within 10% of what it measures once loaded), downloaded with
progress, cancelled mid-way with nothing broken left, resumed, used, and removed from disk; `/models` over HTTP
with Server-Sent Events; and every refusal names the model and the reason while the studio keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import routes
from hub_stand_in import hub_at, stand_in
from studio import hub as hub_module
from studio import weights
from studio.tiny.text import build_llama, build_phi3

REPO = "tiny/phi3-chat"
TINY = SimpleNamespace(options={})


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    """Folders served as Hub repos: a Phi-3 chat model in three safetensors shards, a base model with no chat
    template, and a BERT."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hub-repos")
    whole, sharded = root / "whole", root / "phi3"
    whole.mkdir()
    build_phi3(whole, TINY)
    AutoModelForCausalLM.from_pretrained(whole).save_pretrained(sharded, max_shard_size="200KB")
    for file in whole.iterdir():
        if not file.name.startswith("model") and not (sharded / file.name).exists():
            shutil.copy(file, sharded / file.name)
    base = root / "base"
    base.mkdir()
    build_llama(base, TINY)
    tokenizer = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    return {REPO: sharded, "tiny/base-llama": base, "tiny/bert": bert}


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """The stand-in Hub serving `repos`, with huggingface_hub pointed at it and a cache of this test's own."""
    monkeypatch.setattr(weights, "_remote", {})  # Hub estimates are remembered per process
    with stand_in() as server:
        for repo, folder in repos.items():
            server.add(repo, folder)
        hub_at(server, tmp_path / "hf-cache", monkeypatch)
        yield server


def last_shard(folder: Path) -> str:
    return sorted(f.name for f in folder.glob("model-*.safetensors"))[-1]


def wait_for(job, timeout: float = 60) -> None:
    seen = -1
    while not job.finished and timeout > 0:
        job.wait(seen, 1.0)
        seen, timeout = job.done, timeout - 1


# ---------------------------------------------------------------------------------------------- downloads


def test_a_hub_model_is_sized_before_download_fetched_with_progress_and_used(make_studio, hub, repos, tmp_path):
    studio = make_studio()
    plan = studio.manager.plan(REPO)
    assert (plan.spec.id, plan.spec.repo, plan.family_label, plan.dtype) == (
        "phi3-chat", REPO, "Causal language model with a chat template (transformers)", "bfloat16")
    weights_bytes = sum(f.stat().st_size for f in repos[REPO].glob("model-*.safetensors"))
    assert plan.download_bytes == weights_bytes  # the configs came with the plan; the weights are to fetch
    assert not [p for p in hub.downloads() if "model-" in p]  # sized from the headers alone (range requests)

    hub.hold(last_shard(repos[REPO]), after=32 * 1024)
    job = studio.manager.add(plan)
    assert hub.reached_gate.wait(60)
    job.wait(-1, 5)
    middle = job.status()
    assert 0 < middle["done_bytes"] < middle["total_bytes"] == weights_bytes and middle["state"] == "downloading"
    assert middle["bytes_per_s"] > 0 and middle["seconds_left"] is not None
    assert "phi3-chat" not in studio.registry  # registered only once complete
    with routes(studio) as http:
        assert [d["model"] for d in http.get("/models").json()["downloads"]] == ["phi3-chat"]
    hub.release()
    wait_for(job)
    assert job.state == "done" and job.status()["done_bytes"] == weights_bytes and job.status()["fraction"] == 1.0
    assert studio.manager.downloads() == []

    spec = studio.registry.get("phi3-chat")
    assert (spec.origin, spec.family) == ("catalog", "causal-lm")
    assert "{id: phi3-chat, modality: chat, source: tiny/phi3-chat}" in (tmp_path / "models.yaml").read_text()
    with routes(studio) as http:
        answer = http.post("/generate/text", json={"prompt": "Hello!", "model": "phi3-chat", "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
    measured = next(m.bytes for m in studio.cache.snapshot().models if m.id == "phi3-chat")
    assert plan.size_bytes == pytest.approx(measured, rel=0.1)


def test_a_cancelled_download_leaves_nothing_broken_and_adding_again_fetches_only_the_rest(make_studio, hub, repos,
                                                                                            tmp_path):
    studio = make_studio()
    shards = sorted(f.name for f in repos[REPO].glob("model-*.safetensors"))
    hub.hold(shards[-1], after=32 * 1024)
    job = studio.manager.add(studio.manager.plan(REPO))
    assert hub.reached_gate.wait(60)
    assert studio.manager.cancel("phi3-chat")
    hub.release()
    wait_for(job)
    assert job.state == "cancelled"
    assert "phi3-chat" not in studio.registry and not (tmp_path / "models.yaml").exists()
    assert hub_module.snapshot(REPO, "main") is None  # the finished shards are not taken for the whole model
    cache = hub_module.repo_folder(REPO)
    assert not list(cache.rglob("*.incomplete"))  # the unfinished file is gone
    assert studio.manager.plan(REPO).download_bytes == (repos[REPO] / shards[-1]).stat().st_size

    before = len(hub.downloads())
    job = studio.manager.add(studio.manager.plan(REPO))
    wait_for(job)
    assert job.state == "done" and job.total == (repos[REPO] / shards[-1]).stat().st_size
    again = [p.rsplit("/", 1)[-1] for p in hub.downloads()[before:] if "/model-" in p]
    assert again == [shards[-1]]  # the shards finished before the cancel were not fetched again
    with routes(studio) as http:
        assert http.post("/generate/text", json={"prompt": "Hi", "model": "phi3-chat",
                                                 "max_new_tokens": 2}).status_code == 200


def test_add_over_http_streams_progress_and_delete_frees_the_disk(make_studio, hub, repos, tmp_path):
    studio = make_studio()
    with routes(studio) as http:
        listed = http.post("/models/plan", json={"source": REPO, "id": "my-phi"})
        assert listed.status_code == 200 and listed.json()["download_bytes"] > 0
        answer = http.post("/models", json={"source": REPO, "id": "my-phi", "quantize": "int8"})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        assert answer.text.rstrip().endswith("data: [DONE]")
        kinds = [e["event"] for e in events]
        assert kinds[0] == "plan" and kinds[-1] == "done" and kinds.count("progress") >= 3
        progress = [e["done_bytes"] for e in events if e["event"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == events[0]["download_bytes"]
        assert events[-1]["model"]["quantize"] == "int8" and events[-1]["model"]["on_disk"]

        row = next(m for m in http.get("/models", params={"modality": "chat"}).json()["models"] if m["id"] == "my-phi")
        assert row["origin"] == "catalog" and row["source"] == f"{REPO}@main" and row["disk_bytes"] > 0
        assert {m["modality"] for m in http.get("/models", params={"modality": "chat"}).json()["models"]} == {"chat"}
        assert http.post("/v1/chat/completions", json={"model": "my-phi", "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hi"}]}).status_code == 200

        removed = http.delete("/models/my-phi")
        assert removed.status_code == 200 and removed.json()["unregistered"]
        assert removed.json()["freed_bytes"] >= row["disk_bytes"] - 4096
        assert not hub_module.repo_folder(REPO).exists() and "my-phi" not in studio.registry
        assert "my-phi" not in (tmp_path / "models.yaml").read_text()
        assert http.delete("/models/my-phi").status_code == 404


def test_a_catalog_entry_for_a_hub_repo_is_recognised_at_start_up_and_downloaded_on_first_use(make_studio, hub,
                                                                                             tmp_path):
    (tmp_path / "models.yaml").write_text(f"models:\n  - {{id: hubbed, modality: chat, source: {REPO}}}\n")
    studio = make_studio("--models", str(tmp_path / "models.yaml"))
    row = next(m for m in studio.manager.catalog("chat") if m.id == "hubbed")
    assert row.family == "causal-lm" and not row.on_disk and row.size_bytes > 0  # sized from the Hub's headers
    with routes(studio) as http:
        assert http.post("/generate/text", json={"prompt": "Hi", "model": "hubbed",
                                                 "max_new_tokens": 2}).status_code == 200
    assert next(m for m in studio.manager.catalog("chat") if m.id == "hubbed").on_disk


def test_an_uncached_hub_entry_is_left_out_offline_and_the_studio_starts(make_studio, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "models.yaml").write_text(f"models:\n  - {{id: later, modality: chat, source: {REPO}}}\n")
    studio = make_studio("--models", str(tmp_path / "models.yaml"))
    assert "later" not in studio.registry
    assert "left out until the Hub can be reached" in studio.manager.problems[0].message


# ---------------------------------------------------------------------------------------------- refusals


def test_every_refusal_names_the_model_and_the_reason_and_the_studio_keeps_serving(make_studio, hub, tmp_path,
                                                                                   monkeypatch):
    studio = make_studio()
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2,3]!")
    cases = [
        ({"source": "tiny/bert"}, 422, "source", "BertForMaskedLM is not a kind of model the studio serves"),
        ({"source": "tiny/base-llama"}, 422, "source", "LlamaForCausalLM has no chat template"),
        ({"source": str(junk)}, 422, "source", "weights.safetensors is not a model file the studio recognises"),
        ({"source": "tiny/no-such-repo"}, 422, "source", "tiny/no-such-repo (revision main) is not a model repo"),
        ({"source": "not a repo"}, 422, "source", "'not a repo' is neither a file or folder"),
        ({"source": REPO, "quantize": "8bit"}, 422, "quantize",
         "phi3-chat: 8bit needs CUDA (bitsandbytes); this studio runs on cpu: use quantize: int8 instead"),
        ({"source": REPO, "id": "tiny-llama"}, 422, "id", "'tiny-llama' is already a model of this studio"),
        ({"source": REPO, "options": {"max_new_tokens": 8, "warp": 9}}, 422, "options",
         "warp: not an option of ChatOptions"),
    ]
    with routes(studio) as http:
        for body, status, field, reason in cases:
            answer = http.post("/models/plan", json=body)
            assert (answer.status_code, answer.json().get("field")) == (status, field), answer.text
            assert reason in answer.json()["detail"], answer.text

        with monkeypatch.context() as patch:
            patch.setattr(hub_module, "free_bytes", lambda path: 1000)
            answer = http.post("/models", json={"source": REPO})
        assert answer.status_code == 507
        detail = answer.json()["detail"]
        assert detail.startswith("phi3-chat needs ") and "only 1000 B is free" in detail

        studio.cache.budget = 300_000  # the bf16 model (~284 KB) fits; with more weights it would not
        plan = studio.manager.plan(REPO)
        studio.cache.budget = plan.size_bytes - 1
        answer = http.post("/models", json={"source": REPO})
        assert answer.status_code == 413
        detail = answer.json()["detail"]
        assert detail.startswith("phi3-chat needs about ") and "more than the whole memory budget" in detail
        assert "add it with quantize int8 (about " in detail  # int8 would fit: the message says so

        assert "phi3-chat" not in studio.registry and not (tmp_path / "models.yaml").exists()
        studio.cache.budget = 2**31
        assert http.post("/generate/text", json={"prompt": "Hi", "model": "tiny-llama",
                                                 "max_new_tokens": 2}).status_code == 200
        assert http.get("/health").json()["status"] == "ok"


def test_removing_what_is_not_the_studios_to_delete_is_refused(make_studio, tmp_path):
    from studio.tiny.text import build_gemma

    (tmp_path / "models" / "chat" / "gem").mkdir(parents=True)
    build_gemma(tmp_path / "models" / "chat" / "gem", TINY)
    studio = make_studio("--models-dir", str(tmp_path / "models"))
    with routes(studio) as http:
        answer = http.delete("/models/gem")
        assert answer.status_code == 422 and "delete " in answer.json()["detail"]
        assert "the studio does not delete your files" in answer.json()["detail"]
        assert http.delete("/models/piper-joe").json()["detail"] == (
            "model: piper-joe ships inside a Python package; there is nothing to remove")
        assert (tmp_path / "models" / "chat" / "gem" / "config.json").exists()
        assert http.delete("/models/tiny-vits").status_code == 200  # a tiny build: deleted, rebuilt on use
        assert http.post("/generate/speech", json={"text": "Hi.", "model": "tiny-vits"}).status_code == 200
