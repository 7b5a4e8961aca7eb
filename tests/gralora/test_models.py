"""Safe model loading: safetensors only, no remote code, clear errors for what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gralora.errors import ModelUnavailable, UnsafeModel
from gralora.models import check_local_weights, load_config, load_model, model_source


def test_a_model_with_only_pickle_weights_is_refused(tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(UnsafeModel) as caught:
        load_model(str(pickled))
    assert "pytorch_model.bin" in caught.value.message
    assert "safetensors" in caught.value.message


def test_a_folder_without_weights_is_unavailable(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelUnavailable):
        check_local_weights(empty)


def test_remote_code_is_never_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-custom"
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises((UnsafeModel, ModelUnavailable)) as caught:
        load_config(str(remote))
    assert caught.value.field == "base_model"


def test_a_local_model_outside_the_model_roots_is_refused(tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    with pytest.raises(UnsafeModel) as caught:
        model_source(str(tiny_model_dir), [tmp_path / "models"])
    assert caught.value.code == "model_refused"
    assert model_source(str(tiny_model_dir), [tiny_model_dir.parent]) == str(
        tiny_model_dir.resolve())


def test_a_hub_model_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as caught:
        load_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "HF_HUB_OFFLINE" in caught.value.message
