"""``laps-import-official``: official checkpoints become laps checkpoints that ``laps-eval`` rebuilds into a
model reproducing the official outputs; hostile pickles are refused by every command that reads a file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, TINY_SYNTHETIC, compose_train, needs_fixtures
from helpers.common import rel_err
from helpers.pickles import unrestricted_unpickle
from helpers.standins import build_wordpiece_vocab, make_f30k_standin, read_lines, shared_data
from laps.cli import import_official
from laps.compat.serialization import safe_load
from laps.training.tasks import build_datamodule, build_module, checkpoint_file, evaluate, run_config

CASES = ["official_tiny", "official_tiny_swin"]
TOL = 1e-4


@pytest.fixture(scope="module")
def vocab1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WordPiece vocabulary of exactly 1,000 tokens (the fixtures' BERT vocabulary size)."""
    folder = build_wordpiece_vocab(
        read_lines(shared_data("f30k") / "test_caps.txt"), tmp_path_factory.mktemp("vocab1000"), vocab_size=1000
    )
    assert len(read_lines(folder / "vocab.txt")) == 1000
    return folder


@pytest.fixture(scope="module")
def f30k_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in F30K folder: the first 10 images (50 captions) of the real test split."""
    return make_f30k_standin(tmp_path_factory.mktemp("f30k"), "test", images=slice(0, 10))


@needs_fixtures
@pytest.mark.parametrize("name", CASES)
def test_imported_checkpoint_reproduces_official(name: str, vocab1000: Path, f30k_small: Path, tmp_path: Path) -> None:
    case = FIXTURES / name
    out = tmp_path / "imported.ckpt"
    import_official.main([str(case / "model_best.pth"), "--out", str(out), "--vision-config", str(case / "vision"),
                          "--text-config", str(case / "text"), "--tokenizer", str(vocab1000)])
    stored = safe_load(out)  # plain containers and tensors only
    assert set(stored) >= {"state_dict", "laps_config", "official"}
    assert stored["laps_config"]["backbone"]["pretrained"] is False  # nothing to download: weights are in the file
    assert stored["laps_config"]["dataset"]["tokenizer"] == str(vocab1000)

    # The eval path, as laps.training.tasks.evaluate builds it (laps-eval ckpt_path=... +overrides.dataset.root=...).
    cfg = compose_train([f"ckpt_path={out}", "trainer=cpu", f"+overrides.dataset.root={f30k_small}",
                         "+overrides.dataset.num_workers=0"], tmp_path / "eval", tmp_path, "eval")
    checkpoint = safe_load(checkpoint_file(cfg.ckpt_path, cfg.paths.output_dir))
    run_cfg = run_config(cfg, checkpoint)
    datamodule = build_datamodule(run_cfg)
    assert datamodule.vocab_size == 1000
    module = build_module(run_cfg, datamodule.vocab_size)
    module.load_state_dict(checkpoint["state_dict"])  # strict: every key fits
    net = module.net.eval()
    exp = torch.load(case / "expected.pt", weights_only=True)
    with torch.no_grad():
        sims = net(exp["images"], exp["captions"], exp["lengths"])
    assert sims.shape == exp["sims_eval"].shape
    assert rel_err(sims, exp["sims_eval"]) < TOL

    # Control: the same architecture without the file's weights is far off.
    fresh = build_module(run_cfg, datamodule.vocab_size).net.eval()
    with torch.no_grad():
        assert rel_err(fresh(exp["images"], exp["captions"], exp["lengths"]), exp["sims_eval"]) > 1e-2

    # And laps-eval runs on it end to end (10 images x 50 captions of the real test split).
    metrics = evaluate(cfg)
    assert {"test/rsum", "test/i2t_R@1", "test/t2i_R@1"} <= set(metrics)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/rsum"] == pytest.approx(
        metrics["test/rsum"])


@needs_fixtures
@pytest.mark.parametrize("name", CASES)
def test_import_as_a_hugging_face_folder(name: str, vocab1000: Path, tmp_path: Path) -> None:
    """``--format hf``: the folder loads with from_pretrained and scores as the official model does;
    nothing in it is a pickle."""
    from laps.models import LAPSModel

    case = FIXTURES / name
    out = tmp_path / "folder"
    import_official.main([str(case / "model_best.pth"), "--out", str(out), "--format", "hf",
                          "--vision-config", str(case / "vision"), "--text-config", str(case / "text"),
                          "--tokenizer", str(vocab1000)])
    assert {"model.safetensors", "config.json", "README.md", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert "the official checkpoint model_best.pth" in (out / "README.md").read_text()
    for file in out.rglob("*"):
        assert not file.is_file() or file.read_bytes()[:1] != b"\x80", f"{file} is a pickle"
    net = LAPSModel.from_pretrained(out).eval()
    exp = torch.load(case / "expected.pt", weights_only=True)
    with torch.no_grad():
        assert rel_err(net(exp["images"], exp["captions"], exp["lengths"]), exp["sims_eval"]) < TOL
    with pytest.raises(SystemExit) as refused:  # an existing folder is not replaced without --overwrite
        import_official.main([str(case / "model_best.pth"), "--out", str(out), "--format", "hf",
                              "--vision-config", str(case / "vision"), "--text-config", str(case / "text")])
    assert refused.value.code == 2


@needs_fixtures
def test_projection_between_equal_widths_is_kept(vocab1000: Path, tmp_path: Path) -> None:
    """An official file whose vision projection is a Linear although the backbone's width equals
    embed_size (where the official code has the identity): laps-import-official records
    ``projection: linear`` and the model rebuilt from the stored configuration scores as the file."""
    from hydra.utils import instantiate

    from laps.compat.official import load_official_checkpoint

    case = FIXTURES / "official_tiny"
    raw = safe_load(case / "model_best.pth")
    width, text_width, hidden, aggregated = 48, 40, 9, 39  # the tiny ViT's width becomes embed_size
    shapes = {
        "img_enc.vision_proj.weight": (width, width), "img_enc.vision_proj.bias": (width,),
        "txt_enc.fc.weight": (width, text_width), "txt_enc.fc.bias": (width,),
        "cross_net.aggr_net.weight.0.weight": (width,), "cross_net.aggr_net.weight.0.bias": (width,),
        "cross_net.aggr_net.weight.1.weight": (hidden, width), "cross_net.aggr_net.weight.1.bias": (hidden,),
        "cross_net.aggr_net.weight.3.weight": (aggregated, hidden),
    }
    g = torch.Generator().manual_seed(0)
    state = {**raw["model"], **{k: 0.1 * torch.randn(*shape, generator=g) for k, shape in shapes.items()}}
    opt = copy.copy(raw["opt"])
    opt.embed_size = width
    path = tmp_path / "model_best.pth"
    torch.save({**raw, "model": state, "opt": opt}, path)

    out = tmp_path / "imported.ckpt"
    import_official.main([str(path), "--out", str(out), "--vision-config", str(case / "vision"),
                          "--text-config", str(case / "text"), "--tokenizer", str(vocab1000)])
    stored = safe_load(out)
    backbone = stored["laps_config"]["backbone"]
    assert backbone["vision"]["projection"] == "linear" and backbone["text"].get("projection", "auto") == "auto"
    rebuilt = instantiate(stored["laps_config"]["model"]["net"]).eval()
    rebuilt.load_state_dict({k.removeprefix("net."): v for k, v in stored["state_dict"].items()})  # strict
    official = load_official_checkpoint(path, case / "vision", case / "text")
    exp = torch.load(case / "expected.pt", weights_only=True)
    with torch.no_grad():
        ours = rebuilt(exp["images"], exp["captions"], exp["lengths"])
        assert rel_err(ours, official(exp["images"], exp["captions"], exp["lengths"])) < 1e-6


# ------------------------------------------------------------------------------------------ hostile pickles
class _ShellPayload:
    """Unpickling runs ``touch target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def hostile_checkpoint(path: Path, target: Path) -> Path:
    """Shaped like an official checkpoint (and a Lightning one); its ``opt`` runs a shell command."""
    torch.save({"model": {}, "state_dict": {}, "opt": _ShellPayload(target), "epoch": 1}, path)
    return path


def test_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickling such a file without restriction does run the command."""
    target = tmp_path / "control_pwned"
    unrestricted_unpickle(hostile_checkpoint(tmp_path / "control.pth", target))
    assert target.exists()


def run_cli(module_main: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-c", f"from {module_main} import main; main()", *args],
                          check=False, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def assert_refused(result: subprocess.CompletedProcess[str], hostile: Path, target: Path) -> None:
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not target.exists(), "the pickle's code ran"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(hostile) in errors[0] and "posix.system" in errors[0], errors[0]


def test_import_official_refuses_hostile_pickle(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    hostile = hostile_checkpoint(tmp_path / "model_best.pth", target)
    out = tmp_path / "out" / "imported.ckpt"
    result = run_cli("laps.cli.import_official", [str(hostile), "--out", str(out)], tmp_path)
    assert_refused(result, hostile, target)
    assert not out.exists() and not out.with_suffix(".ckpt.tmp").exists()


def test_eval_refuses_hostile_pickle(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    hostile = hostile_checkpoint(tmp_path / "hostile.ckpt", target)
    result = run_cli("laps.cli.eval", [f"ckpt_path={hostile}", "trainer=cpu", f"paths.root_dir={tmp_path}"], tmp_path)
    assert_refused(result, hostile, target)
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("sims_test.pt"))


def test_train_resume_refuses_hostile_pickle(tmp_path: Path, synthetic_root: Path) -> None:
    target = tmp_path / "pwned"
    hostile = hostile_checkpoint(tmp_path / "hostile.ckpt", target)
    args = [f"ckpt_path={hostile}", *TINY_SYNTHETIC, f"paths.data_dir={synthetic_root}", "trainer=cpu",
            "logger=csv", f"paths.root_dir={tmp_path}"]
    result = run_cli("laps.cli.train", args, tmp_path)
    assert_refused(result, hostile, target)
    assert list(tmp_path.rglob("*.ckpt")) == [hostile]  # no checkpoint written
    assert not list(tmp_path.rglob("metrics.json"))


def test_every_official_backbone_has_its_config_option() -> None:
    """The official (vit_type, img_res) pairs map to the backbone options that load the same encoder."""
    from laps.compat.official import OFFICIAL_VISION_BACKBONES

    options = {key: import_official.backbone_option(name) for key, name in OFFICIAL_VISION_BACKBONES.items()}
    assert options == {("vit", 224): "vit", ("vit", 384): "vit_384", ("swin", 224): "swin", ("swin", 384): "swin_384"}
    with pytest.raises(ValueError, match="no backbone config"):
        import_official.backbone_option("google/not-a-backbone")
