"""OpenAI's videos API, driven by the official `openai` package against the running studio (tiny profile): jobs
are created, polled, downloaded, listed and deleted; what a model cannot do is a 400 naming the field; a finished
video survives a restart, and a job that was running when the server stopped is reported failed after it."""

from __future__ import annotations

import io
import time
import warnings
from contextlib import contextmanager

import av
import openai
import pytest
import torch
from PIL import Image

from conftest import free_port
from studio.config import parse_settings
from studio.runtime import create_studio
from studio.server import launch
from studio.telemetry.logreader import LogReader

KEY = "video-key"


@pytest.fixture(scope="module", autouse=True)
def quiet_and_one_thread():
    """The openai client marks its videos API deprecated (Sora's shutdown); the studio serves it on purpose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
    torch.set_num_threads(threads)


@contextmanager
def studio_server(folder):
    """A studio serving on a free port whose video jobs live in `folder`: (studio, openai client)."""
    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--log-dir", str(folder / "logs"),
                               "--video-dir", str(folder / "videos"), "--api-key", KEY], env={})
    studio = create_studio(settings)
    demo, url = launch(studio, block=False)
    try:
        yield studio, openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=KEY, max_retries=0, timeout=60)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("video-openai")


@pytest.fixture(scope="module")
def server(folder):
    with studio_server(folder) as served:
        yield served


@pytest.fixture(scope="module")
def finished(server):
    """One completed job, made with the client's create_and_poll (extensions through extra_body)."""
    _studio, client = server
    return client.videos.create_and_poll(model="tiny-animatediff", prompt="a fox running", seconds="1", size="64x80",
                                         extra_body={"seed": 9, "steps": 2})


def frames_of(data: bytes) -> tuple[int, int, int, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        return len(decoded), decoded[0].width, decoded[0].height, float(stream.average_rate)


def test_create_and_poll_then_download_the_video_and_its_thumbnail(server, finished):
    studio, client = server
    assert finished.status == "completed" and finished.progress == 100 and finished.error is None
    assert (finished.model, finished.seconds, finished.size) == ("tiny-animatediff", "1", "64x80")
    assert finished.model_extra["settings"]["seed"] == 9 and finished.completed_at >= finished.created_at
    video = client.videos.download_content(finished.id).read()
    assert frames_of(video) == (8, 64, 80, 8.0)  # "1" second at the model's 8 fps
    still = client.videos.download_content(finished.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(still)).size == (64, 80)


def test_the_job_is_logged_like_any_generation(server, finished):
    studio, _client = server
    rows = [row for row in LogReader(studio.log.folder).read().requests.to_dict("records")
            if row["endpoint"] == "openai:/v1/videos"]
    assert [(r["modality"], r["client"], r["status"], r["frames"], r["seed"]) for r in rows][:1] == [
        ("video", "openai", "ok", 8, 9)]


def test_list_and_delete(server, finished):
    _studio, client = server
    other = client.videos.create(model="tiny-wan", prompt="waves", seconds="1", extra_body={"steps": 1})
    assert other.status in ("queued", "in_progress") and other.size == "64x64" and other.seconds == "1.0625"
    listed = [video.id for video in client.videos.list()]
    assert listed[:2] == [other.id, finished.id]  # newest first
    assert [video.id for video in client.videos.list(order="asc", after=finished.id)] == [other.id]
    deleted = client.videos.delete(other.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (other.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(other.id)
    assert other.id not in [video.id for video in client.videos.list()]


@pytest.mark.parametrize("kwargs, param, words", [
    ({"size": "60x64"}, "size", "multiples of 8 from 64 to 128"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"seconds": "8"}, "seconds", "at most 16"),  # 64 frames; the tiny AnimateDiff makes 16
    ({"seconds": "soon"}, "seconds", "number of seconds"),
    ({"model": "tiny-wan", "size": "72x64"}, "size", "multiples of 16"),
    ({"extra_body": {"guidance_scale": 99}}, "guidance_scale", "at most 30"),
    ({"extra_body": {"adapters": {"nope": 1}}}, "adapters", "unknown adapter"),
    ({"extra_body": {"colour": "red"}}, "colour", "not a field"),
])
def test_what_a_model_cannot_do_is_an_openai_400_naming_the_field(server, kwargs, param, words):
    _studio, client = server
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(prompt="a fox", **{"model": "tiny-animatediff", **kwargs})
    error = caught.value.body
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_an_unknown_model_or_video_is_a_404(server):
    _studio, client = server
    with pytest.raises(openai.NotFoundError) as caught:
        client.videos.create(prompt="a fox", model="sora-2")
    assert caught.value.body["param"] == "model" and caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content("video_unknown")


def test_a_finished_video_survives_a_restart_and_a_running_one_is_reported_failed(server, finished, folder,
                                                                                   monkeypatch):
    studio, client = server
    video = client.videos.download_content(finished.id).read()
    with studio.cache.use("tiny-animatediff") as lease:  # each step lasts a while: the job is mid-way at restart
        unet = lease.model.pipe.unet
        forward = unet.forward
        monkeypatch.setattr(unet, "forward", lambda *a, **k: (time.sleep(0.2), forward(*a, **k))[1])
    running = client.videos.create(model="tiny-animatediff", prompt="a slow fox", extra_body={"steps": 50})
    deadline = time.monotonic() + 60
    while client.videos.retrieve(running.id).progress == 0:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)

    with studio_server(folder) as (_restarted, again):  # a second server on the same folder: the restart
        kept = again.videos.retrieve(finished.id)
        assert kept.status == "completed" and again.videos.download_content(finished.id).read() == video
        cut = again.videos.retrieve(running.id)
        assert cut.status == "failed" and cut.error.code == "interrupted"
        with pytest.raises(openai.ConflictError):  # no content for a failed job
            again.videos.download_content(running.id)
    client.videos.delete(running.id)  # stops the first server's job after its running step
