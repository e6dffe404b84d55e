"""Text to video through the studio (tiny profile): every tiny video model's MP4 decodes with the asked frames,
size and fps, seeds reproduce, an SD 1.5 LoRA changes AnimateDiff's frames and removing it restores them, caps are
refused naming the field, Stop keeps nothing, the request log, analytics and /metrics count videos, the Gradio
client endpoint works, and the job store keeps its folder within its limit and reports cut-off jobs as failed."""

from __future__ import annotations

import io
import json
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from conftest import call, collect_rows, routes, tiny_studio
from studio.backends.video import VideoRequest, frames_for, generate_video
from studio.backends.video_jobs import VideoJobs
from studio.telemetry.analytics import report
from studio.telemetry.logreader import LogReader
from studio.tiny.image import random_lora
from studio.weights import ensure_local

SIZES = {"tiny-animatediff": (8, 64, 80, 8), "tiny-wan": (9, 96, 64, 16)}  # frames, width, height, fps
LORA = "motion-style"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest and steadiest


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """One studio for the module (models load once), with an adapter made for the tiny SD 1.5 UNet."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    loras = tmp_path_factory.mktemp("video-loras")
    studio = tiny_studio(tmp_path_factory.mktemp("video") / "logs", "--lora-dir", str(loras))
    folder = ensure_local(studio.registry.get("tiny-animatediff"))  # its SD 1.5 parts are tiny-sd's
    random_lora(loras / f"{LORA}.safetensors", UNet2DConditionModel.from_pretrained(folder / "unet"),
                CLIPTextModel.from_pretrained(folder / "text_encoder"), seed=4, strength=0.3)
    return studio


@pytest.fixture(scope="module")
def http(studio):
    with routes(studio) as client:
        yield client


def decode(data: bytes) -> tuple[np.ndarray, float]:
    """The frames (RGB) and the frame rate a real decoder (FFmpeg's, through PyAV) reads from an MP4."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


def make(http, **body) -> bytes:
    response = http.post("/generate/video", json={"prompt": "a red fox running", "seed": 5, "steps": 2, **body})
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.parametrize("model", list(SIZES))
def test_every_tiny_model_gives_an_mp4_with_the_asked_frames_size_and_fps(studio, http, model):
    frames, width, height, fps = SIZES[model]
    rows = collect_rows(studio)
    response = http.post("/generate/video", json={"prompt": "a red fox running", "model": model, "frames": frames,
                                                  "width": width, "height": height, "fps": fps, "seed": 11,
                                                  "steps": 2})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4" and response.headers["x-seed"] == "11"
    assert (response.headers["x-frames"], response.headers["x-fps"]) == (str(frames), str(fps))
    pixels, rate = decode(response.content)
    assert pixels.shape == (frames, height, width, 3) and rate == fps
    assert [(r["modality"], r["model"], r["endpoint"], r["status"], r["frames"], r["fps"], r["seed"]) for r in rows] \
        == [("video", model, "rest:/generate/video", "ok", frames, fps, 11)]
    assert rows[0]["video_seconds"] == pytest.approx(frames / fps) and rows[0]["ttft_ms"] is not None


def test_same_seed_and_settings_give_the_same_clip(http):
    first, again, other = make(http), make(http), make(http, seed=6)
    assert first == again
    assert not np.array_equal(decode(first)[0], decode(other)[0])


def test_a_lora_changes_the_frames_and_removing_it_restores_them(studio, http):
    base = make(http)
    styled = make(http, adapters={LORA: 1.0})
    assert not np.array_equal(decode(styled)[0], decode(base)[0])
    assert make(http, prompt=f"a red fox running <lora:{LORA}:1>") == styled  # the prompt syntax, same adapter
    assert make(http) == base  # adapters off: exactly the clip without them
    rows = collect_rows(studio)
    make(http, adapters={LORA: 0.5})
    assert rows[-1]["adapters"] == {LORA: 0.5}


def test_gif_and_webp_are_alternatives(http):
    for fmt, kind in (("gif", "GIF"), ("webp", "WEBP")):
        response = http.post("/generate/video", json={"prompt": "a fox", "format": fmt, "frames": 6, "steps": 1})
        assert response.headers["content-type"] == f"image/{fmt}"
        with Image.open(io.BytesIO(response.content)) as clip:
            assert (clip.format, clip.n_frames, clip.size) == (kind, 6, (64, 64))


@pytest.mark.parametrize("body, field", [
    ({"frames": 17}, "frames"),  # tiny-animatediff's cap is 16
    ({"width": 136}, "width"),  # its max_size is 128
    ({"height": 60}, "height"),  # not a multiple of 8
    ({"steps": 51}, "steps"),
    ({"fps": 61}, "fps"),
    ({"guidance": 31}, "guidance"),
    ({"model": "tiny-wan", "frames": 8}, "frames"),  # Wan makes 4k + 1 frames
    ({"model": "tiny-wan", "width": 72}, "width"),  # in multiples of 16
    ({"model": "tiny-wan", "adapters": {LORA: 1.0}}, "adapters"),  # SD 1.5 adapters do not fit a DiT
    ({"adapters": {"nope": 1.0}}, "adapters"),
    ({"prompt": " "}, "prompt"),
    ({"seed": -1}, "seed"),
])
def test_what_a_model_cannot_do_is_refused_naming_the_field(studio, http, body, field):
    rows = collect_rows(studio)
    response = http.post("/generate/video", json={"prompt": "a fox", **body})
    assert response.status_code == 422 and response.json()["field"] == field, response.text
    assert rows == []  # refused before anything ran


def test_an_unknown_model_is_a_404(http):
    response = http.post("/generate/video", json={"prompt": "a fox", "model": "sora-2"})
    assert response.status_code == 404 and response.json()["field"] == "model"


def test_stop_ends_after_the_running_step_and_keeps_nothing(studio):
    rows = collect_rows(studio)
    cancel, seen = threading.Event(), []

    def progress(fraction: float, text: str) -> None:
        seen.append(text)
        cancel.set()  # Stop pressed during the first step

    result = generate_video(studio, VideoRequest(prompt="a fox", steps=50), call("ui", "video", cancel=cancel,
                                                                              progress=progress))
    assert result.stopped and result.files == {} and result.thumbnail is None
    assert seen == ["step 1/50"]
    assert rows[-1]["status"] == "stopped" and rows[-1]["frames"] is None


def test_progress_covers_the_steps_then_the_encoding(studio):
    seen = []
    generate_video(studio, VideoRequest(prompt="a fox", steps=2, formats=("mp4", "gif")),
                   call(progress=lambda fraction, text: seen.append((round(fraction, 3), text))))
    assert [text for _, text in seen] == ["step 1/2", "step 2/2", "encoding MP4", "encoding GIF"]
    assert [fraction for fraction, _ in seen] == sorted(fraction for fraction, _ in seen) and seen[-1][0] < 1


def test_analytics_and_metrics_count_videos(studio, http):
    make(http, frames=8, fps=4)
    totals = report(LogReader(studio.log.folder).read()).totals
    ok = [r for r in LogReader(studio.log.folder).read().requests.to_dict("records")
          if r["modality"] == "video" and r["status"] == "ok"]
    assert totals["videos"] == len(ok) and totals["video seconds"] == pytest.approx(sum(r["video_seconds"] for r in ok))
    assert totals["ms per frame"] == pytest.approx(sum(r["latency_ms"] for r in ok) / sum(r["frames"] for r in ok))
    metrics = http.get("/metrics").text
    assert f'studio_outputs_total{{modality="video",output="video_seconds"}} {totals["video seconds"]:g}' in metrics
    assert 'gen_ai_server_requests_total{client="rest",modality="video",model="tiny-animatediff",status="ok"}' \
        in metrics


def test_openai_seconds_map_onto_frames_the_model_makes():
    assert frames_for(4, 8, "animatediff") == 32
    assert frames_for(4, 16, "wan") == 65  # 64 frames, rounded to 4k + 1
    assert frames_for(0.01, 16, "wan") == 1 and frames_for(1, 16, "wan") == 17


def test_gradio_client_generate_video(live_server):
    from gradio_client import Client

    _studio, url = live_server
    client = Client(url, verbose=False)
    path = client.predict(prompt="a red fox", model="tiny-wan", frames=5, seed=3, steps=2, api_name="/generate_video")
    pixels, rate = decode(open(path, "rb").read())
    assert pixels.shape == (5, 64, 64, 3) and rate == 16
    with pytest.raises(Exception, match="frames: must be 4k"):
        client.predict(prompt="a red fox", model="tiny-wan", frames=4, api_name="/generate_video")


# ---------------------------------------------------------------------------------------------- the job store


def wait(jobs: VideoJobs, job_id: str, statuses=("completed", "failed"), timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (job := jobs.get(job_id)) is not None and job.status not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stayed {job.status}"
        time.sleep(0.05)
    return job


def test_the_folder_keeps_within_its_limit_oldest_first(tmp_path):
    studio = tiny_studio(tmp_path / "logs")
    folder = tmp_path / "videos"
    jobs = VideoJobs(studio, folder, limit=1)  # one byte: only the newest video stays
    made = []
    for seed in (1, 2, 3):
        job = jobs.create(VideoRequest(prompt="a fox", seed=seed, steps=1, frames=4))
        assert wait(jobs, job.id).status == "completed"
        made.append(job.id)
        assert [job.id for job in jobs.list()] == [job.id]
    assert sorted(p.name for p in folder.iterdir()) == [f"{made[-1]}{suffix}" for suffix in (".json", ".mp4", ".png")]

    roomy = VideoJobs(studio, folder, limit=2**30)  # a restart with more room keeps what is there
    assert [job.id for job in roomy.list()] == [made[-1]] and roomy.get(made[-1]).settings["seed"] == 3


def test_a_job_cut_off_by_a_stop_is_reported_failed_after_the_restart(tmp_path):
    studio = tiny_studio(tmp_path / "logs")
    folder = tmp_path / "videos"
    jobs = VideoJobs(studio, folder, limit=2**30)
    job = jobs.create(VideoRequest(prompt="a fox", steps=1, frames=4))
    wait(jobs, job.id)
    # What a server killed mid-job leaves: the job's file says in_progress, a video was being written.
    record = json.loads((folder / f"{job.id}.json").read_text())
    (folder / f"{job.id}.json").write_text(json.dumps({**record, "status": "in_progress", "progress": 40}))
    (folder / f".{job.id}.mp4.tmp").write_bytes(b"half")

    restarted = VideoJobs(studio, folder, limit=2**30)
    found = restarted.get(job.id)
    assert found.status == "failed" and found.error["code"] == "interrupted"
    assert restarted.file(job.id, "video") is None
    assert sorted(p.name for p in folder.iterdir()) == [f"{job.id}.json"]  # the unfinished files are gone
    assert json.loads((folder / f"{job.id}.json").read_text())["status"] == "failed"  # and it stays failed
