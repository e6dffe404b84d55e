"""MCP: `--mcp` exposes chat, image, speech (both ways), 3D and video generation as tools with typed, documented
parameters."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import free_port
from studio.config import parse_settings
from studio.runtime import create_studio
from studio.server import launch

# tool name (the documented gr.api endpoint of each modality) -> its main, required text parameter
TOOLS = {"generate_text": "message", "generate_image": "prompt", "generate_speech": "text", "generate_3d": "prompt",
         "generate_video": "prompt"}


@pytest.fixture(scope="module")
def mcp_url(tmp_path_factory):
    logs = tmp_path_factory.mktemp("mcp-logs")
    settings = parse_settings(["--profile", "tiny", "--port", str(free_port()), "--log-dir", str(logs), "--mcp"],
                              env={})
    demo, url = launch(create_studio(settings), block=False)
    yield url.rstrip("/") + "/gradio_api/mcp/"
    demo.close()


async def _session(url: str, work):
    async with streamable_http_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


def list_tools(url: str) -> dict:
    return {tool.name: tool for tool in asyncio.run(_session(url, lambda s: s.list_tools())).tools}


def call_tool(url: str, name: str, arguments: dict):
    return asyncio.run(_session(url, lambda s: s.call_tool(name, arguments)))


def types(prop: dict) -> set[str]:
    """JSON-schema types of a parameter; Gradio writes an optional one as oneOf [null, type]."""
    return {prop["type"]} if "type" in prop else {t["type"] for t in prop.get("oneOf", prop.get("anyOf", []))}


def test_generation_tools_have_typed_documented_parameters(mcp_url):
    tools = list_tools(mcp_url)
    assert set(TOOLS) <= set(tools), f"missing MCP tools: {sorted(set(TOOLS) - set(tools))}"
    for name, main in TOOLS.items():
        schema = tools[name].inputSchema
        assert main in schema["required"] and schema["properties"][main]["type"] == "string", name
        assert "model" in schema["properties"], name
    assert "integer" in types(tools["generate_text"].inputSchema["properties"]["max_new_tokens"])
    assert "integer" in types(tools["generate_image"].inputSchema["properties"]["steps"])
    for name, tool in tools.items():  # every tool, so no UI-only event leaks out undocumented
        assert tool.description, f"tool {name} has no description"
        for param, prop in tool.inputSchema["properties"].items():
            assert prop.get("description"), f"{name}.{param} is not documented"
            assert types(prop), f"{name}.{param} has no type"


def test_schema_endpoint_lists_the_same_tools(mcp_url):
    schema = httpx.get(mcp_url + "schema").json()
    assert set(TOOLS) <= {tool["name"] for tool in schema}


def test_a_tool_call_runs_a_generation(mcp_url):
    result = call_tool(mcp_url, "generate_text", {"message": "Hello", "model": "tiny-llama", "max_new_tokens": 8,
                                                  "seed": 1})
    assert not result.isError, result.content
    assert result.content[0].type == "text"


def test_the_transcript_tool_takes_its_audio_as_a_data_uri(mcp_url):
    import base64
    import io

    import numpy as np
    import soundfile

    tool = list_tools(mcp_url)["generate_transcript"]
    assert {"audio", "model", "language", "response_format"} <= set(tool.inputSchema["properties"])
    assert "audio" in tool.inputSchema["required"]
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).standard_normal(16_000 * 3).astype(np.float32) * 0.05
    soundfile.write(buffer, noise, 16_000, format="WAV", subtype="PCM_16")
    uri = "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    result = call_tool(mcp_url, "generate_transcript", {"audio": uri, "model": "tiny-whisper",
                                                        "response_format": "vtt"})
    assert not result.isError, result.content
    assert result.content[0].type == "text" and result.content[0].text.startswith("WEBVTT")


def test_without_mcp_no_mcp_endpoint(live_server):
    _studio, url = live_server
    assert httpx.get(url + "/gradio_api/mcp/schema").status_code == 404
