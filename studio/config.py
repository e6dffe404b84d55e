"""All settings of the studio, in one place: CLI flags with environment-variable equivalents.

A flag wins over its environment variable, which wins over the default. Invalid values stop
start-up with one line naming the flag and exit code 2, so a typo never starts a half-configured server.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Sequence

PROFILES = ("auto", "default", "tiny")
STRATEGIES = ("lru", "swap", "preload")
DEVICES = ("auto", "cpu", "cuda", "mps")
SPACES_DATA = Path("/data")  # Hugging Face Spaces mounts persistent storage here
PUBLIC_MAX_UPLOAD = 50 * 2**20  # a public studio (share link, Space) takes uploads up to this size, whatever is set

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ConfigError(ValueError):
    """A setting has an invalid value; the message starts with the flag's name."""


def parse_size(text: str) -> int:
    """Parse '6GiB', '512MB', '1.5g' or a plain byte count into bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 6GiB, 512MB or 1000000")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} must be larger than zero")
    return size


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    profile: str = "auto"
    memory_budget: int | None = None  # bytes; None = derived from the device (see devices.default_budget)
    strategy: str = "lru"
    preload: tuple[str, ...] = ()
    device: str = "auto"
    log_dir: Path = Path("logs")
    lora_dir: Path = Path("lora_adapters")
    log_prompts: bool = False
    share: bool = False
    auth: tuple[tuple[str, str], ...] = ()
    allow_public: bool = False
    api_keys: tuple[str, ...] = ()
    mcp: bool = False
    providers: Path | None = None  # external OpenAI-compatible providers (YAML)
    models_file: Path = Path("models.yaml")  # the user catalog (read when present, written by the model manager)
    models_dir: Path = Path("models")  # drop-in folders: models/<modality>/...
    load_timeout: float = 300.0  # seconds a request waits for memory while every model is in use
    concurrency: int = 1  # generations at once per model
    max_batch: int = 16  # sequences a chat model decodes together (continuous batching)
    analytics: bool = False  # Gradio's own usage analytics (off unless the user opts in)
    video_dir: Path = Path("outputs/videos")  # the videos of /v1/videos jobs, kept across restarts
    video_dir_limit: int = 2 * 2**30  # bytes those videos may take; the oldest are deleted first
    max_upload_size: int = 200 * 10**6  # bytes of one audio file to transcribe (public mode: PUBLIC_MAX_UPLOAD)
    max_audio_seconds: float = 3600.0  # the longest recording transcribed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        print(f"studio: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _env(env: dict, *names: str, default: str | None = None) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return default


def _flag(env: dict, name: str) -> bool:
    return str(env.get(name, "")).lower() in ("1", "true", "yes", "on")


def build_parser(env: dict) -> argparse.ArgumentParser:
    p = _Parser(prog="app.py", description="Multi-modal generative-AI studio (Gradio UI + HTTP API).")
    a = p.add_argument
    a("--host", default=_env(env, "STUDIO_HOST", "GRADIO_SERVER_NAME", default="127.0.0.1"),
      help="interface to listen on (env STUDIO_HOST or GRADIO_SERVER_NAME)")
    a("--port", default=_env(env, "STUDIO_PORT", "GRADIO_SERVER_PORT", default="7860"),
      help="port (env STUDIO_PORT or GRADIO_SERVER_PORT)")
    a("--profile", default=_env(env, "STUDIO_PROFILE", default="auto"),
      help="auto | default | tiny (env STUDIO_PROFILE); auto falls back to tiny when offline")
    a("--memory-budget", default=_env(env, "STUDIO_MEMORY_BUDGET"),
      help="memory for resident models, e.g. 6GiB (env STUDIO_MEMORY_BUDGET); "
           "default: free VRAM minus a reserve on CUDA, half the RAM on CPU")
    a("--strategy", default=_env(env, "STUDIO_STRATEGY", default="lru"), help="lru | swap | preload (env STUDIO_STRATEGY)")
    a("--preload", default=_env(env, "STUDIO_PRELOAD", default=""),
      help="comma-separated model ids to load at start-up (env STUDIO_PRELOAD); with --strategy preload and "
           "no list, all local models")
    a("--device", default=_env(env, "STUDIO_DEVICE", default="auto"), help="auto | cpu | cuda | mps (env STUDIO_DEVICE)")
    a("--log-dir", default=_env(env, "STUDIO_LOG_DIR"),
      help="request logs folder (env STUDIO_LOG_DIR; default /data/logs on Spaces with storage, else logs/)")
    a("--lora-dir", default=_env(env, "STUDIO_LORA_DIR", default="lora_adapters"),
      help="extra folder scanned for LoRA adapters (env STUDIO_LORA_DIR)")
    a("--log-prompts", action="store_true", default=_flag(env, "STUDIO_LOG_PROMPTS"),
      help="store prompt text in the logs (env STUDIO_LOG_PROMPTS); otherwise only its length and hash")
    a("--share", action="store_true", default=_flag(env, "STUDIO_SHARE"), help="create a public Gradio link (env STUDIO_SHARE)")
    a("--auth", default=_env(env, "STUDIO_AUTH"),
      help="user:password[,user:password] or a file with one per line (env STUDIO_AUTH)")
    a("--allow-public", action="store_true", default=_flag(env, "STUDIO_ALLOW_PUBLIC"),
      help="allow --share without --auth (env STUDIO_ALLOW_PUBLIC)")
    a("--api-key", action="append", default=None,
      help="require 'Authorization: Bearer KEY' on /v1 and /generate (repeatable; env STUDIO_API_KEYS, comma-separated)")
    a("--mcp", action="store_true", default=_flag(env, "STUDIO_MCP") or _flag(env, "GRADIO_MCP_SERVER"),
      help="expose generation as MCP tools (env STUDIO_MCP or GRADIO_MCP_SERVER)")
    a("--providers", default=_env(env, "STUDIO_PROVIDERS"),
      help="YAML file of external OpenAI-compatible providers (env STUDIO_PROVIDERS)")
    a("--models", default=_env(env, "STUDIO_MODELS"),
      help="YAML user catalog of extra models (env STUDIO_MODELS; default models.yaml, /data/models.yaml on "
           "Spaces with storage; read when present, written when a model is added)")
    a("--models-dir", default=_env(env, "STUDIO_MODELS_DIR"),
      help="drop-in folder with a subfolder per modality, e.g. models/chat/<model folder> (env STUDIO_MODELS_DIR; "
           "default models/, /data/models on Spaces with storage)")
    a("--load-timeout", default=_env(env, "STUDIO_LOAD_TIMEOUT", default="300"),
      help="seconds a request waits for memory while every resident model is busy (env STUDIO_LOAD_TIMEOUT)")
    a("--concurrency", default=_env(env, "STUDIO_CONCURRENCY", default="1"),
      help="generations at once per model, chat aside (env STUDIO_CONCURRENCY)")
    a("--max-batch", default=_env(env, "STUDIO_MAX_BATCH", default="16"),
      help="sequences a chat model decodes together, continuous batching; 1 serves one at a time "
           "(env STUDIO_MAX_BATCH)")
    a("--analytics", action="store_true", default=_flag(env, "STUDIO_GRADIO_ANALYTICS"),
      help="opt in to Gradio's usage analytics (env STUDIO_GRADIO_ANALYTICS)")
    a("--video-dir", default=_env(env, "STUDIO_VIDEO_DIR"),
      help="where /v1/videos jobs keep their videos (env STUDIO_VIDEO_DIR; default /data/videos on Spaces with "
           "storage, else outputs/videos)")
    a("--video-dir-limit", default=_env(env, "STUDIO_VIDEO_DIR_LIMIT", default="2GiB"),
      help="the most the videos in --video-dir may take, e.g. 2GiB; the oldest are deleted first "
           "(env STUDIO_VIDEO_DIR_LIMIT)")
    a("--max-upload-size", default=_env(env, "STUDIO_MAX_UPLOAD_SIZE", default="200MB"),
      help="largest audio file to transcribe, e.g. 25MB (env STUDIO_MAX_UPLOAD_SIZE); a public studio takes at "
           "most 50 MiB")
    a("--max-audio-seconds", default=_env(env, "STUDIO_MAX_AUDIO_SECONDS", default="3600"),
      help="longest recording to transcribe, in seconds (env STUDIO_MAX_AUDIO_SECONDS)")
    return p


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(choices)}")
    return value


def _number(flag: str, value: str, kind: type, low: float, high: float | None = None):
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{flag}: {value!r} is not a number") from None
    if number < low or (high is not None and number > high):
        raise ConfigError(f"{flag}: {value} is outside {low}..{high if high is not None else 'inf'}")
    return number


def _size(flag: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _auth(value: str | None) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    path = Path(value)
    lines = path.read_text().split() if path.is_file() else value.split(",")
    pairs = []
    for item in filter(None, (line.strip() for line in lines)):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"--auth: expected user:password, got {item.split(':')[0]!r}:…")
        pairs.append((user, password))
    return tuple(pairs)


def _on_storage(name: str, local: str | None = None) -> Path:
    """`name` under a Space's persistent storage when there is one, else `local` (default `name`) in the working
    directory."""
    if SPACES_DATA.is_dir() and os.access(SPACES_DATA, os.W_OK):
        return SPACES_DATA / name
    return Path(local or name)


def default_log_dir() -> Path:
    return _on_storage("logs")


def default_video_dir() -> Path:
    return _on_storage("videos", "outputs/videos")


def parse_settings(argv: Sequence[str] | None = None, env: dict | None = None) -> Settings:
    """Turn CLI flags and environment variables into Settings; raises ConfigError naming the flag."""
    env = dict(os.environ if env is None else env)
    ns = build_parser(env).parse_args(argv)
    budget = _size("--memory-budget", ns.memory_budget) if ns.memory_budget else None
    max_upload = _size("--max-upload-size", ns.max_upload_size)
    api_keys = ns.api_key or [k for k in (env.get("STUDIO_API_KEYS") or "").split(",") if k.strip()]
    settings = Settings(
        host=ns.host,
        port=_number("--port", ns.port, int, 1, 65535),
        profile=_choice("--profile", ns.profile, PROFILES),
        memory_budget=budget,
        strategy=_choice("--strategy", ns.strategy, STRATEGIES),
        preload=tuple(m.strip() for m in ns.preload.split(",") if m.strip()),
        device=_choice("--device", ns.device, DEVICES),
        log_dir=Path(ns.log_dir) if ns.log_dir else default_log_dir(),
        lora_dir=Path(ns.lora_dir),
        log_prompts=ns.log_prompts,
        share=ns.share,
        auth=_auth(ns.auth),
        allow_public=ns.allow_public,
        api_keys=tuple(k.strip() for k in api_keys),
        mcp=ns.mcp,
        providers=Path(ns.providers) if ns.providers else None,
        models_file=Path(ns.models) if ns.models else _on_storage("models.yaml"),
        models_dir=Path(ns.models_dir) if ns.models_dir else _on_storage("models"),
        load_timeout=_number("--load-timeout", ns.load_timeout, float, 0.1),
        concurrency=_number("--concurrency", ns.concurrency, int, 1, 64),
        max_batch=_number("--max-batch", ns.max_batch, int, 1, 256),
        analytics=ns.analytics,
        video_dir=Path(ns.video_dir) if ns.video_dir else default_video_dir(),
        video_dir_limit=_size("--video-dir-limit", ns.video_dir_limit),
        max_upload_size=max_upload,
        max_audio_seconds=_number("--max-audio-seconds", ns.max_audio_seconds, float, 1),
    )
    if settings.mcp and settings.auth:
        raise ConfigError("--mcp: Gradio's MCP server cannot log in, so with --auth its tools would be listed to "
                          "anyone and fail for everyone; use one of --mcp and --auth")
    if settings.providers and not settings.providers.is_file():
        raise ConfigError(f"--providers: {settings.providers} is not a file")
    if settings.models_file.is_dir() or settings.models_dir.is_file():
        raise ConfigError(f"--models: {settings.models_file} is a folder; --models names a YAML file"
                          if settings.models_file.is_dir() else
                          f"--models-dir: {settings.models_dir} is a file; --models-dir names a folder")
    if settings.share and not settings.auth and not settings.allow_public:
        raise ConfigError(
            "--share: a public link exposes every endpoint and this machine's accelerator to anyone who has it; "
            "add --auth user:password (or STUDIO_AUTH), or --allow-public to accept that"
        )
    return settings


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """For the command line: an invalid setting prints one line and exits with code 2."""
    try:
        yield
    except ConfigError as exc:
        print(f"studio: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
