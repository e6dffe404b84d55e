"""The user catalog file and the drop-in folders: entries read and checked (a bad one stops start-up naming the
file, the entry and the field), families detected from the files, refusals with their reason, the file written
and edited without losing the user's comments, and the drop-in folders scanned at start-up and on Refresh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio import usermodels
from studio.config import ConfigError
from studio.contract import UnsupportedModel
from studio.providers import read_config
from studio.tiny.speech import build_vits
from studio.tiny.text import build_gemma, build_llama, build_phi3

ROOT = Path(__file__).resolve().parents[1]
TINY = SimpleNamespace(options={})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny models built once: a Phi-3 and a Gemma chat model, a VITS voice, a base Llama without a chat
    template, a BERT (no kind the studio serves), a folder with no config, and a file that is no model."""
    root = tmp_path_factory.mktemp("user-models")
    built = {}
    for name, build in (("phi3", build_phi3), ("gemma", build_gemma), ("vits", build_vits), ("base", build_llama)):
        built[name] = root / name
        built[name].mkdir()
        build(built[name], TINY)
    config = json.loads((built["base"] / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (built["base"] / "tokenizer_config.json").write_text(json.dumps(config))
    (built["base"] / "chat_template.jinja").unlink(missing_ok=True)
    built["bert"] = root / "bert"
    built["bert"].mkdir()
    (built["bert"] / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                           "model_type": "bert"}))
    built["empty"] = root / "empty"
    built["empty"].mkdir()
    (built["empty"] / "notes.txt").write_text("not a model")
    built["junk"] = root / "junk.safetensors"
    built["junk"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return built


def write_catalog(path: Path, *entries: str) -> Path:
    path.write_text("models:\n" + "".join(f"  - {entry}\n" for entry in entries))
    return path


# ---------------------------------------------------------------------------------------------- the catalog file


def test_catalog_entries_register_with_their_family_and_settings(make_studio, folders, tmp_path):
    catalog = write_catalog(tmp_path / "models.yaml",
                            f"{{id: my-phi3, modality: chat, source: {folders['phi3']}, quantize: int8, "
                            "label: My Phi}",
                            f"{{id: my-voice, modality: text-to-speech, source: {folders['vits']}, dtype: float32}}",
                            "{id: rel-gemma, modality: chat, source: gemma-copy, options: {max_new_tokens: 32}}")
    shutil.copytree(folders["gemma"], tmp_path / "gemma-copy")  # a relative source: beside the catalog file
    studio = make_studio("--models", str(catalog))
    phi3, voice, gemma = (studio.registry.get(i) for i in ("my-phi3", "my-voice", "rel-gemma"))
    assert (phi3.family, phi3.quantize, phi3.label, phi3.origin) == ("causal-lm", "int8", "My Phi", "catalog")
    assert phi3.dtype("cpu") == "bfloat16" and voice.dtype("cpu") == "float32" and voice.family == "vits"
    assert gemma.path == str((tmp_path / "gemma-copy").resolve()) and gemma.options["max_new_tokens"] == 32
    assert studio.models("chat")[:2] == ["tiny-llama", "tiny-qwen2"]  # the built-in ones come first


@pytest.mark.parametrize("entry, where, message", [
    ("{id: a, modality: chat}", "model 1 (a)", "source must be a non-empty string"),
    ("{id: a, modality: video-ish, source: x/y}", "model 1 (a)", "modality 'video-ish' is not one of"),
    ("{id: a, modality: chat, source: x/y, colour: red}", "model 1", "unknown key 'colour'"),
    ("{id: a, modality: chat, source: x/y, dtype: float8}", "model 1 (a)", "dtype 'float8' is not one of"),
    ("{id: a, modality: chat, source: x/y, quantize: int4}", "model 1 (a)", "quantize 'int4' is not one of"),
    ("{id: a, modality: chat, source: x/y, options: {temperature_max: 3}}", "model 1 (a)",
     "options.temperature_max: not an option of ChatOptions"),
    ("{id: a, modality: chat, source: ./no/such/folder}", "model 1 (a)",
     "source: './no/such/folder' is neither a file or folder on this disk nor a Hub repo id"),
    ("{id: tiny-llama, modality: chat, source: x/y}", "model 1 (tiny-llama)", "id: 'tiny-llama' is already taken"),
    ("{id: a, modality: chat, source: <phi3>, quantize: 8bit}", "model 1 (a)",
     "quantize: 8bit needs CUDA (bitsandbytes); this studio runs on cpu: use quantize: int8 instead"),
    ("{id: a, modality: text-to-speech, source: <vits>, quantize: int8}", "model 1 (a)",
     "quantize: quantization is not supported for text-to-speech models"),
    ("{id: a, modality: chat, source: <base>}", "model 1 (a)", "has no chat template: it is a base"),
    ("{id: a, modality: chat, source: <bert>}", "model 1 (a)",
     "BertForMaskedLM is not a kind of model the studio serves"),
    ("{id: a, modality: chat, source: <empty>}", "model 1 (a)", "has no config.json"),
    ("{id: a, modality: chat, source: <junk>}", "model 1 (a)", "junk.safetensors is not a model file"),
    ("{id: a, modality: chat, source: <vits>}", "model 1 (a)",
     "modality: <vits> is a text-to-speech model (VITS / MMS-TTS (transformers)), not a chat model"),
])
def test_a_bad_entry_stops_start_up_naming_file_entry_and_field(make_studio, folders, tmp_path, entry, where,
                                                                message):
    for name, path in folders.items():  # <name>: a tiny model's path
        entry, message = entry.replace(f"<{name}>", str(path)), message.replace(f"<{name}>", str(path))
    catalog = write_catalog(tmp_path / "models.yaml", entry)
    with pytest.raises(ConfigError) as raised:
        make_studio("--models", str(catalog))
    text = str(raised.value)
    assert text.startswith(f"--models: {catalog}: {where}: "), text
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("content", ["- {id: a}\n", "models: {id: a}\n", "other: 1\n", "models: [\n"])
def test_a_catalog_file_of_the_wrong_shape_stops_start_up(make_studio, tmp_path, content):
    (tmp_path / "models.yaml").write_text(content)
    with pytest.raises(ConfigError, match=r"^--models: .*models.yaml"):
        make_studio("--models", str(tmp_path / "models.yaml"))


def test_a_missing_or_empty_catalog_file_is_no_catalog(make_studio, tmp_path):
    assert "my-phi3" not in make_studio("--models", str(tmp_path / "absent.yaml")).registry
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    make_studio("--models", str(tmp_path / "empty.yaml"))
    (tmp_path / "none.yaml").write_text("models: []\n")
    make_studio("--models", str(tmp_path / "none.yaml"))


def test_app_exits_2_with_one_line_on_a_bad_entry(folders, tmp_path):
    catalog = write_catalog(tmp_path / "models.yaml", f"{{id: base, modality: chat, source: {folders['base']}}}")
    proc = subprocess.run([sys.executable, "app.py", "--profile", "tiny", "--models", str(catalog),
                           "--log-dir", str(tmp_path / "logs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home())})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"studio: error: --models: {catalog}: model 1 (base): source:")
    assert "no chat template" in lines[0]


def test_providers_and_the_catalog_share_one_entry_format(tmp_path):
    """The same bad `options` is refused with the same words in both files."""
    (tmp_path / "providers.yaml").write_text(
        "- {name: p, base_url: 'http://x/v1', models: [{id: a, modality: chat, options: {nope: 1}}]}\n")
    with pytest.raises(ConfigError) as provider_error:
        read_config(tmp_path / "providers.yaml")
    write_catalog(tmp_path / "models.yaml", "{id: a, modality: chat, source: x/y, options: {nope: 1}}")
    with pytest.raises(ConfigError) as catalog_error:
        usermodels.read_catalog(tmp_path / "models.yaml")
    tail = "options.nope: not an option of ChatOptions"
    assert tail in str(provider_error.value) and tail in str(catalog_error.value)


# ---------------------------------------------------------------------------------------------- writing it


def test_added_entries_keep_the_users_comments_and_removing_takes_only_that_line(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("# my models\nmodels:\n  # the small one\n  - id: small   # fast\n    modality: chat\n"
                    "    source: org/small\n")
    entry = usermodels.UserEntry(id="qwen", modality="chat", source="Qwen/Qwen2.5-0.5B-Instruct", quantize="int8")
    usermodels.append_entry(path, entry)
    text = path.read_text()
    assert "# my models" in text and "# the small one" in text and "# fast" in text
    assert [e.id for e in usermodels.read_catalog(path)] == ["small", "qwen"]
    assert usermodels.read_catalog(path)[1] == entry
    assert usermodels.remove_entry(path, "qwen") and not usermodels.remove_entry(path, "qwen")
    assert path.read_text() == "# my models\nmodels:\n  # the small one\n  - id: small   # fast\n    modality: chat\n" \
                               "    source: org/small\n"
    usermodels.remove_entry(path, "small")  # a multi-line entry: the file is rewritten without it
    assert usermodels.read_catalog(path) == []


def test_the_first_added_model_creates_the_file_and_a_flow_style_list_is_rewritten(tmp_path):
    entry = usermodels.UserEntry(id="a", modality="chat", source="org/a")
    usermodels.append_entry(tmp_path / "new.yaml", entry)
    assert usermodels.read_catalog(tmp_path / "new.yaml") == [entry]
    (tmp_path / "flow.yaml").write_text("models: [{id: b, modality: chat, source: org/b}]\n")
    usermodels.append_entry(tmp_path / "flow.yaml", entry)
    assert [e.id for e in usermodels.read_catalog(tmp_path / "flow.yaml")] == ["b", "a"]


# ---------------------------------------------------------------------------------------------- families


def test_chat_detect_reads_the_architecture_and_refuses_what_it_cannot_chat_with(folders):
    from studio.backends.chat import detect

    family = detect(folders["phi3"])
    assert family.name == "causal-lm" and detect(folders["gemma"]).name == "causal-lm"
    # from config.json's 256 positions: replies capped so that the conversation keeps room
    assert family.options == {"context_length": 256, "max_new_tokens": 128, "default_max_new_tokens": 64}
    assert detect(folders["vits"]) is None and detect(folders["bert"]) is None and detect(folders["junk"]) is None
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM has no chat template: it is a base"):
        detect(folders["base"])


def test_recognise_says_why_nothing_matched(folders):
    assert usermodels.recognise(folders["vits"])[0].name == "text-to-speech"
    for name, reason in (("bert", "BertForMaskedLM is not a kind of model the studio serves (it serves chat, "),
                         ("empty", "empty has no config.json or model_index.json"),
                         ("junk", "junk.safetensors is not a model file the studio recognises")):
        with pytest.raises(UnsupportedModel, match=re.escape(reason)):
            usermodels.recognise(folders[name])


def test_remote_code_models_are_refused(tmp_path):
    from studio.backends.chat import detect

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FancyForCausalLM"], "model_type": "fancy",
                                                      "auto_map": {"AutoModelForCausalLM": "x.FancyForCausalLM"}}))
    with pytest.raises(UnsupportedModel, match="FancyForCausalLM is not built into transformers .* no "
                                               "trust_remote_code"):
        detect(tmp_path)


# ---------------------------------------------------------------------------------------------- drop-in folders


def test_drop_in_folders_are_scanned_at_start_up_and_on_refresh(make_studio, folders, tmp_path):
    drop = tmp_path / "models"
    (drop / "chat").mkdir(parents=True)
    shutil.copytree(folders["phi3"], drop / "chat" / "My Phi-3")
    shutil.copytree(folders["base"], drop / "chat" / "base-model")
    (drop / "chat" / "README.md").write_text("notes")  # not a model file: passed over
    studio = make_studio("--models-dir", str(drop))
    spec = studio.registry.get("my-phi-3")
    assert (spec.origin, spec.family, spec.label) == ("drop-in", "causal-lm", "My Phi-3")
    assert [p.where for p in studio.manager.problems] == [str(drop / "chat" / "base-model")]
    assert "no chat template" in studio.manager.problems[0].message

    (drop / "text-to-speech").mkdir()
    shutil.copytree(folders["vits"], drop / "text-to-speech" / "voice")
    shutil.copytree(folders["gemma"], drop / "text-to-speech" / "chatty")  # in the wrong folder
    shutil.rmtree(drop / "chat" / "My Phi-3")
    added, removed = studio.manager.refresh()
    assert added == ["voice"] and removed == ["my-phi-3"]
    assert studio.registry.get("voice").family == "vits" and "my-phi-3" not in studio.registry
    assert any("is a chat model" in p.message for p in studio.manager.problems)
    assert studio.manager.refresh() == ([], [])  # nothing new the second time


def test_a_drop_in_whose_name_is_taken_is_left_out_with_the_reason(make_studio, folders, tmp_path):
    (tmp_path / "models" / "chat").mkdir(parents=True)
    shutil.copytree(folders["phi3"], tmp_path / "models" / "chat" / "tiny-llama")
    studio = make_studio("--models-dir", str(tmp_path / "models"))
    assert studio.registry.get("tiny-llama").origin == "built-in"
    assert "the id 'tiny-llama' is already taken" in studio.manager.problems[0].message

