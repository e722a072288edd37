"""Loading pipelines: tiny-random from configs, local folders offline, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from meg.errors import ModelNotFoundError
from meg.split import sources
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.loading import load_pipeline
from meg.split.tiny import build_tiny_tokenizer


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_pipeline("tiny-random")
    assert torch.equal(torch.rand(1), expected_next)
    b = load_pipeline("tiny-random")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert type(a).__name__ == "StableDiffusionPipeline"
    assert a.unet.config.sample_size == 8 and tuple(a.unet.config.block_out_channels) == (32, 64)
    assert 2 ** (len(a.vae.config.block_out_channels) - 1) == 8 and a.vae.config.latent_channels == 4


def test_tiny_tokenizer_encodes_any_text() -> None:
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("the ending", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("the ending").input_ids)
    assert tokens[1] == "the</w>"  # a merge applied
    assert tokens[-2] == "ing</w>"
    # Bytes outside ASCII are byte-level symbols, never unknown tokens.
    odd = tokenizer("Ünïcødé → 猫").input_ids
    assert tokenizer.unk_token_id not in odd[1:-1]
    assert tokenizer.decode(odd, skip_special_tokens=True).replace(" ", "") == "ünïcødé→猫"


def test_float16_tiny_random() -> None:
    pipeline = load_pipeline("tiny-random", torch_dtype=torch.float16)
    assert pipeline.unet.dtype == torch.float16 and pipeline.vae.dtype == torch.float16


def test_local_folder_roundtrip_offline(tmp_path: Path) -> None:
    original = load_pipeline("tiny-random")
    original.save_pretrained(tmp_path / "sd", safe_serialization=True)
    assert not list((tmp_path / "sd").rglob("*.bin"))
    loaded = load_pipeline(str(tmp_path / "sd"))
    assert os.environ.get("HF_HUB_OFFLINE")
    inputs = GenerationInputs("folder", steps=2)
    assert torch.equal(SplitEngine(loaded).run_full(inputs), SplitEngine(original).run_full(inputs))


def test_folder_with_safety_checker_entry_loads_without_it(tmp_path: Path) -> None:
    # SD 1.5 snapshots list a safety checker; loading skips it rather than failing.
    load_pipeline("tiny-random").save_pretrained(tmp_path / "sd15", safe_serialization=True)
    index_file = tmp_path / "sd15" / "model_index.json"
    index = json.loads(index_file.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_file.write_text(json.dumps(index))
    pipeline = load_pipeline(str(tmp_path / "sd15"))
    assert pipeline.safety_checker is None


def test_unknown_model_is_named() -> None:
    with pytest.raises(ModelNotFoundError, match="'no-such-model'"):
        load_pipeline("no-such-model")


def test_folder_without_index_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_incomplete_folder_is_a_model_not_found(tmp_path: Path) -> None:
    load_pipeline("tiny-random").save_pretrained(tmp_path / "sd", safe_serialization=True)
    for weights in (tmp_path / "sd" / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelNotFoundError, match="cannot load pipeline folder"):
        load_pipeline(str(tmp_path / "sd"))


def test_meg_tiny_without_a_source_names_the_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_SOURCES", {})
    with pytest.raises(ModelNotFoundError, match=r"'meg-tiny'.*importing meg\.models registers"):
        load_pipeline("meg-tiny")


def test_importing_meg_models_registers_the_embedded_family() -> None:
    import meg.models  # noqa: F401

    source = sources.model_source_for("meg-tiny")
    assert source is not None and source.name == "meg.models"


def test_names_are_delegated_to_the_source_that_serves_them(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = load_pipeline("tiny-random")

    class FakeSource:
        name = "fake"
        calls: list[str] = []

        def serves(self, model: str) -> bool:
            return model == "meg-tiny"

        def load_pipeline(self, model: str) -> object:
            self.calls.append(model)
            return tiny

    monkeypatch.setattr(sources, "_SOURCES", {})
    sources.register_model_source(FakeSource())
    assert load_pipeline("meg-tiny") is tiny
    assert FakeSource.calls == ["meg-tiny"]
    with pytest.raises(ModelNotFoundError, match=r"'other'.*sources: fake"):
        load_pipeline("other")
