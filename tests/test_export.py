"""The Hugging Face folder format: laps-export, LAPSModel.save_pretrained / from_pretrained /
push_to_hub, and the refusal of bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.common import TINY_BERT, TINY_VIT
from laps.cli.export import main as export_main
from laps.inference import load_for_inference
from laps.models import LAPSModel
from laps.models.pretrained import PretrainedFormatError
from test_visualize import write_checkpoint

TINY_SWIN = [
    "backbone=swin", "backbone.pretrained=false", "backbone.embed_size=32", "backbone.image_size=64",
    "+backbone.vision.config_overrides.image_size=64", "+backbone.vision.config_overrides.embed_dim=16",
    "+backbone.vision.config_overrides.depths=[1,1]", "+backbone.vision.config_overrides.num_heads=[1,1]",
    "+backbone.vision.config_overrides.window_size=4",
]
ZIP_MAGIC = b"PK\x03\x04"


@pytest.fixture(params=["vit", "swin"])
def exported(request, make_cfg, tmp_path: Path):
    torch.manual_seed(0)
    vision = TINY_VIT if request.param == "vit" else TINY_SWIN
    cfg = make_cfg([*vision, *TINY_BERT], name=request.param)
    ckpt = write_checkpoint(cfg, tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = tmp_path / "hf"
    export_main([str(ckpt), "--out", str(out)])  # returns on success, exits 2 on an error
    return ckpt, out


def _inputs(model: LAPSModel, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    size = model.vision.image_size
    return (torch.randn(2, 3, size, size, generator=gen), torch.randint(5, vocab, (3, 7), generator=gen),
            torch.tensor([7, 6, 4]))


def _sims(model: LAPSModel, images, ids, lens) -> torch.Tensor:
    with torch.no_grad():
        return model.similarity(model.encode_image(images), model.encode_text(ids, lens), lens)


def test_export_reproduces_the_checkpoint_exactly(exported) -> None:
    ckpt, out = exported
    original = load_for_inference(ckpt, device="cpu").model
    loaded = LAPSModel.from_pretrained(out)
    inputs = _inputs(original, int(original.text.backbone.config.vocab_size))
    a, b = _sims(original, *inputs), _sims(loaded, *inputs)
    assert a.dtype == b.dtype and a.device == b.device
    assert torch.equal(a, b)
    config = json.loads((out / "config.json").read_text())
    assert config["laps_format_version"] == 1 and config["data"]["tokenizer"] == "."
    assert (out / "README.md").read_text().startswith("---")
    assert any(out.glob("vocab.txt")) or any(out.glob("tokenizer.json"))


def test_no_file_in_the_folder_is_a_pickle(exported) -> None:
    """Every file is UTF-8 text (JSON, vocabulary, card) or safetensors; none has a pickle's or
    torch's zip magic bytes."""
    from safetensors import safe_open

    _, out = exported
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert data[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and data[:4] != ZIP_MAGIC, path
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as weights:
                assert list(weights.keys())
        else:
            data.decode("utf-8")


def test_export_refuses_a_non_empty_folder(exported, capsys) -> None:
    ckpt, out = exported
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ckpt), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err


def _edit_config(out: Path, change) -> None:
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, match", [
    ("newer", "laps_format_version 99 is newer"),
    ("kind", "vision.kind 'keras' is not one of"),
    ("missing_config", "config.json: missing"),
])
def test_bad_config_is_refused(exported, case: str, match: str) -> None:
    _, out = exported
    if case == "newer":
        _edit_config(out, lambda c: c.update(laps_format_version=99))
    elif case == "kind":
        _edit_config(out, lambda c: c["vision"].update(kind="keras"))
    else:
        (out / "config.json").unlink()
    with pytest.raises(PretrainedFormatError, match=match):
        LAPSModel.from_pretrained(out)


@pytest.mark.parametrize("case, match", [
    ("missing", "tensor 'head.aggregation.scale' is missing"),
    ("extra", "unexpected tensor 'surprise'"),
    ("shape", "tensor 'head.aggregation.scale' has shape"),
    ("truncated", "damaged or truncated"),
])
def test_bad_weights_are_refused(exported, case: str, match: str) -> None:
    from safetensors.torch import load_file, save_file

    _, out = exported
    path = out / "model.safetensors"
    state = load_file(str(path))
    if case == "missing":
        del state["head.aggregation.scale"]
    elif case == "extra":
        state["surprise"] = torch.zeros(1)
    elif case == "shape":
        state["head.aggregation.scale"] = torch.zeros(3, 3)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        save_file(state, str(path))
    with pytest.raises(PretrainedFormatError, match=match):
        LAPSModel.from_pretrained(out)


def test_hub_id_offline_and_not_cached_is_one_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(PretrainedFormatError, match="someone/laps-model: not a folder"):
        LAPSModel.from_pretrained("someone/laps-model")


def test_push_to_hub_uploads_the_folder(exported, monkeypatch) -> None:
    """push_to_hub against a stand-in for the Hub client: it receives the folder our save_pretrained wrote."""
    from huggingface_hub import hub_mixin

    _, out = exported
    model = LAPSModel.from_pretrained(out)
    seen: dict[str, object] = {}

    class StandInApi:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs):
            seen["repo"] = repo_id
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id: str, folder_path, **kwargs):
            seen["files"] = sorted(p.relative_to(folder_path).as_posix()
                                   for p in Path(folder_path).rglob("*") if p.is_file())
            return "https://hub.invalid/commit"

    monkeypatch.setattr(hub_mixin, "HfApi", StandInApi)
    model.push_to_hub("someone/laps-tiny")
    assert seen["repo"] == "someone/laps-tiny"
    assert {"config.json", "model.safetensors", "README.md", "text/config.json"} <= set(seen["files"])


def test_load_for_inference_takes_the_folder(exported) -> None:
    """The folder gives the checkpoint's tokenizer, transform and similarities (laps-retrieve and
    laps-visualize load through load_for_inference)."""
    from PIL import Image

    ckpt, out = exported
    from_ckpt, from_dir = load_for_inference(ckpt, device="cpu"), load_for_inference(out, device="cpu")
    captions = ["a small red circle left of a big blue square", "two stars"]
    ids_a, lens_a = from_ckpt.tokenize(captions)
    ids_b, lens_b = from_dir.tokenize(captions)
    assert torch.equal(ids_a, ids_b) and torch.equal(lens_a, lens_b)
    size = from_ckpt.image_size
    picture = Image.new("RGB", (size + 5, size), (200, 30, 30))
    assert torch.equal(from_ckpt.load_image(picture), from_dir.load_image(picture))
    img_a, img_b = from_ckpt.encode_images([picture]), from_dir.encode_images([picture])
    cap_a, cap_b = from_ckpt.encode_captions(captions), from_dir.encode_captions(captions)
    assert torch.equal(from_ckpt.similarity(img_a, *cap_a), from_dir.similarity(img_b, *cap_b))
