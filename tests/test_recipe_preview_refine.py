"""Preview–refine (DiffusionX): device previews, the preview latent goes up, the edge refines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from meg.errors import InvalidInputError
from meg.recipes.plan import make_plan
from meg.recipes.preview_refine import PreviewRefineRecipe, check_prompt, preview_refine_plan
from meg.recipes.registry import recipe_by_name, recipe_for
from meg.services.background import RunningServer
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
from meg.session import PreviewSession
from meg.split.engine import GenerationInputs, SplitEngine
from meg.v1 import generation_pb2 as gen_pb

PROMPTS = ("a red circle", "a blue circle", "a blue circle above a green square")


@pytest.fixture(scope="module")
def client(edge: RunningServer, pipeline: Any) -> Iterator[DeviceClient]:
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as c:
        yield c


def test_registered_under_its_wire_id() -> None:
    assert isinstance(recipe_for(gen_pb.RECIPE_PREVIEW_REFINE), PreviewRefineRecipe)
    assert recipe_by_name("preview-refine").uplink_names == ("preview",)


def test_three_rounds_then_final_equals_in_process_refine(client: DeviceClient, pipeline: Any,
                                                           engine: SplitEngine) -> None:
    session = PreviewSession(client, pipeline, seed=3)
    for prompt in PROMPTS:
        session.preview(prompt)
    assert [r.prompt for r in session.rounds] == list(PROMPTS)
    assert not torch.equal(session.rounds[0].latent, session.rounds[1].latent)

    result = session.final(plan=preview_refine_plan(strength=0.5, steps=4, codec_chain="none"))
    assert result.refined and result.rounds == 3
    report = result.report
    assert report.recipe == "preview-refine" and not report.fallback.used
    assert report.extra["preview_refine"] == {"preview_source": "session", "refined": True, "strength": 0.5,
                                              "refine_steps": 2}
    assert report.bytes.uplink > session.rounds[-1].latent.numel() * 4  # the fp32 preview went up
    assert [t.name for t in report.bytes.tensors] == ["latents"]

    # the served image is the same refine in one process: img2img of the last preview, decoded
    last = session.rounds[-1]
    inputs = GenerationInputs(prompt=last.prompt, seed=3, steps=4)
    expected = engine.decode(engine.vae, engine.run_img2img(inputs, last.latent, 0.5))
    torch.testing.assert_close(result.image, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(result.image, last.image, atol=1e-3)  # the edge changed the preview


def test_strength_sets_how_much_the_edge_changes(client: DeviceClient, pipeline: Any) -> None:
    session = PreviewSession(client, pipeline, seed=1)
    preview = session.preview(PROMPTS[0]).image
    changes = []
    for strength in (0.25, 1.0):
        result = session.final(plan=preview_refine_plan(strength=strength, steps=8, codec_chain="fp16"))
        assert result.report.extra["preview_refine"]["refine_steps"] == int(8 * strength)
        changes.append(float((result.image - preview).abs().mean()))
    assert changes[0] < changes[1]


def test_edge_loss_keeps_the_last_preview(pipeline: Any) -> None:
    config = ClientConfig(runtime="eager", connect_timeout_s=0.2)
    with DeviceClient("127.0.0.1:1", config, pipeline=pipeline) as lost:
        session = PreviewSession(lost, pipeline, seed=2)
        session.preview(PROMPTS[0])
        last = session.preview(PROMPTS[1])
        result = session.final()
    assert not result.refined and result.report.fallback.used and result.report.fallback.reason
    assert result.report.extra["preview_refine"]["refined"] is False
    torch.testing.assert_close(result.image, last.image)
    assert len(session.rounds) == 2


def test_bad_input_is_refused_and_the_session_stays(client: DeviceClient, pipeline: Any) -> None:
    session = PreviewSession(client, pipeline)
    with pytest.raises(InvalidInputError, match="final before any preview"):
        session.final()
    with pytest.raises(InvalidInputError, match="prompt is empty") as info:
        session.preview("   ")
    assert info.value.field == "prompt" and session.rounds == []
    session.preview(PROMPTS[0])
    with pytest.raises(InvalidInputError, match="strength"):
        session.final(strength=0.1)  # int(4 · 0.1) = 0 steps: refused by the edge's plan check
    assert len(session.rounds) == 1
    assert session.final(strength=0.5).refined  # the session still works


@pytest.mark.parametrize(("latent", "match"), [
    (torch.zeros(1, 4, 4, 4), r"shape \[1, 4, 4, 4\], expected \[1, 4, 8, 8\]"),
    (torch.zeros(1, 4, 8, 8, dtype=torch.int32), "dtype torch.int32"),
])
def test_a_bad_uplinked_latent_is_invalid_argument(client: DeviceClient, latent: torch.Tensor, match: str) -> None:
    recipe = recipe_by_name("preview-refine")
    assert isinstance(recipe, PreviewRefineRecipe)
    recipe.stage_preview("bad-latent", latent)
    plan = make_plan("decoder", steps=4, codec_chain="none", params={"strength": 0.5})
    request = DeviceRequest(prompt=PROMPTS[0], recipe="preview-refine", plan=plan, request_id="bad-latent")
    with pytest.raises(InvalidInputError, match=match):  # INVALID_ARGUMENT on the wire, not a fallback
        client.generate(request)


def test_a_request_without_a_session_previews_then_refines(client: DeviceClient) -> None:
    plan = preview_refine_plan(strength=0.5, steps=4, codec_chain="none")
    result = client.generate(DeviceRequest(prompt=PROMPTS[0], recipe="preview-refine", plan=plan,
                                           device_profile="jetson-agx-orin"), reference=True)
    info = result.report.extra["preview_refine"]
    assert info["preview_source"] == "this-request" and info["refined"]
    assert {"device.preview", "edge.compute"} <= {p.part for p in result.report.parts}
    assert result.report.quality is not None


def test_unknown_words_are_named() -> None:
    from transformers import AutoTokenizer

    from meg.models.registry import MODELS_ROOT

    tokenizer = AutoTokenizer.from_pretrained(MODELS_ROOT / "meg-tiny" / "tokenizer")
    check_prompt("a red circle", tokenizer)
    with pytest.raises(InvalidInputError, match=r"\['zzqx'\]"):
        check_prompt("a red zzqx", tokenizer)


def test_terminal_session_writes_previews_and_reports_errors(client: DeviceClient, pipeline: Any,
                                                             tmp_path: Any) -> None:
    import io

    from meg.session_cli import _interact

    session = PreviewSession(client, pipeline)
    said: list[str] = []
    script = ("/final\n   \na red circle\n/bogus\n/final 0.1\n/edit 0.5 a blue circle\n/edit 0.5\n/final 0.5\n"
              "/quit\nnot read\n")
    _interact(session, tmp_path, io.StringIO(script), said.append)
    assert "final before any preview" in said[1]
    assert said[2].startswith("round 1") and (tmp_path / "preview-1.png").exists()
    assert "unknown command '/bogus'" in said[3]
    assert said[4].startswith("error:") and "keeps its 1 rounds" in said[4]
    assert said[5].startswith("round 2 (edit)") and "prompt is empty" in said[6]
    assert said[-1].startswith("final (refined by the edge)") and (tmp_path / "report.json").exists()
    assert [r.prompt for r in session.rounds] == ["a red circle", "a blue circle"]


def test_demo_replays_a_three_round_session(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from meg.demo import demo

    result = CliRunner().invoke(demo, ["--recipe", "preview-refine", "--model", "tiny-random", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "preview-1.png", "preview-2.png",
                                                          "preview-3.png", "report.json", "session.json"]
    assert "refined at strength 0.75" in result.output
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(report, schema)
    assert report["extra"]["preview_refine"]["refine_steps"] == 3


def test_an_edit_round_starts_from_the_previous_preview(client: DeviceClient, pipeline: Any) -> None:
    session = PreviewSession(client, pipeline, seed=4)
    first = session.preview(PROMPTS[0])
    scratch = PreviewSession(client, pipeline, seed=4).preview(PROMPTS[1])
    edited = session.preview(PROMPTS[1], edit_strength=0.5)
    # closer to the previous round than a from-scratch preview of the edited prompt is
    assert (edited.latent - first.latent).abs().mean() < (scratch.latent - first.latent).abs().mean()
    assert not torch.equal(edited.latent, scratch.latent)
    with pytest.raises(InvalidInputError, match="strength"):
        session.preview(PROMPTS[2], edit_strength=0.1)  # int(2 · 0.1) = 0 steps
    assert len(session.rounds) == 2
