"""Settings: flags, their environment-variable equivalents, and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from studio.config import ConfigError, parse_settings, parse_size

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    s = parse_settings([], env={})
    assert (s.host, s.port, s.profile, s.strategy, s.device) == ("127.0.0.1", 7860, "auto", "lru", "auto")
    assert s.memory_budget is None and s.preload == () and s.api_keys == ()


def test_flags_override_environment():
    env = {"STUDIO_PROFILE": "default", "STUDIO_STRATEGY": "swap", "STUDIO_MEMORY_BUDGET": "1GiB"}
    s = parse_settings(["--profile", "tiny"], env=env)
    assert s.profile == "tiny" and s.strategy == "swap" and s.memory_budget == 2**30


def test_spaces_server_variables():
    s = parse_settings([], env={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (s.host, s.port) == ("0.0.0.0", 7861)


def test_lists_and_paths():
    s = parse_settings(["--preload", "tiny-llama, tiny-sd", "--log-dir", "/tmp/x", "--lora-dir", "/tmp/l"], env={})
    assert s.preload == ("tiny-llama", "tiny-sd")
    assert s.log_dir == Path("/tmp/x") and s.lora_dir == Path("/tmp/l")
    assert parse_settings([], env={"STUDIO_API_KEYS": "a, b"}).api_keys == ("a", "b")
    assert parse_settings(["--auth", "ann:pw,bob:pw2"], env={}).auth == (("ann", "pw"), ("bob", "pw2"))


@pytest.mark.parametrize("text, size", [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000),
                                        ("1000", 1000), ("2 mib", 2 * 2**20)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("argv, flag", [
    (["--port", "99999"], "--port"),
    (["--port", "web"], "--port"),
    (["--profile", "huge"], "--profile"),
    (["--strategy", "random"], "--strategy"),
    (["--device", "tpu"], "--device"),
    (["--memory-budget", "6XB"], "--memory-budget"),
    (["--memory-budget", "0"], "--memory-budget"),
    (["--auth", "nopassword"], "--auth"),
    (["--share"], "--share"),
    (["--load-timeout", "-1"], "--load-timeout"),
])
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=f"^{flag}:"):
        parse_settings(argv, env={})


def test_share_with_auth_or_explicit_public_is_allowed():
    assert parse_settings(["--share", "--auth", "a:b"], env={}).share
    assert parse_settings(["--share", "--allow-public"], env={}).share


@pytest.mark.parametrize("argv, flag", [(["--strategy", "random"], "--strategy"),
                                        (["--memory-budget", "lots"], "--memory-budget"),
                                        (["--preload", "no-such-model", "--profile", "tiny"], "--preload"),
                                        (["--bogus"], "unrecognized")])
def test_app_exits_2_with_one_line(argv, flag):
    proc = subprocess.run([sys.executable, "app.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home())})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("studio: error:")
