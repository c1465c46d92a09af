"""Damaged and wrong checkpoint files end in one ``error: <path>: ...`` line (exit 2), not a traceback:
truncated, empty, text, a pickle of something else, and a checkpoint of another model size."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.common import TINY_BERT, TINY_VIT
from laps.compat.serialization import DamagedCheckpointError, check_state_shapes, safe_load
from test_visualize import write_checkpoint

DAMAGES = {
    "truncated": ("truncated or damaged", lambda good, bad: bad.write_bytes(good.read_bytes()[:2000])),
    "empty": ("empty file (0 bytes)", lambda good, bad: bad.write_bytes(b"")),
    "text": ("neither a torch zip archive nor a pickle", lambda good, bad: bad.write_text("epoch: 3\n")),
    "other-pickle": ("not a checkpoint (a pickle", lambda good, bad: bad.write_bytes(pickle.dumps({1, 2}))),
}


@pytest.fixture
def good_ckpt(make_cfg, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return write_checkpoint(make_cfg([*TINY_VIT, *TINY_BERT], name="good"), tmp_path / "good.ckpt")


def _damaged(good: Path, kind: str) -> Path:
    bad = good.with_name(f"{kind}.ckpt")
    DAMAGES[kind][1](good, bad)
    return bad


@pytest.mark.parametrize("kind", DAMAGES)
def test_safe_load_names_the_damage(good_ckpt: Path, kind: str) -> None:
    bad = _damaged(good_ckpt, kind)
    before = bad.read_bytes()
    with pytest.raises(DamagedCheckpointError, match=re.escape(DAMAGES[kind][0])) as info:
        safe_load(bad)
    assert str(info.value).startswith(str(bad))
    assert bad.read_bytes() == before  # nothing on disk changed


@pytest.mark.parametrize("kind", DAMAGES)
def test_visualize_says_it_in_one_line(good_ckpt: Path, kind: str, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from laps.cli.visualize import main

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(_damaged(good_ckpt, kind)), "--image", str(image), "--caption", "a dog",
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and DAMAGES[kind][0] in err[0], err


def test_another_model_size_names_the_parameter_and_both_shapes(good_ckpt: Path) -> None:
    state = safe_load(good_ckpt)["state_dict"]
    key = next(k for k in state if k.endswith("aggregation.mlp.3.weight"))
    other = dict(state)
    other[key] = torch.zeros(other[key].shape[0] + 1, other[key].shape[1])
    with pytest.raises(DamagedCheckpointError, match=rf"another architecture: tensor '{key}' has shape "
                                                     rf"\({other[key].shape[0]}, .*\) in the checkpoint"):
        check_state_shapes(good_ckpt, state, other)


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"from laps.cli.{module} import main; main()", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


def _one_error_line(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and err[-1].startswith("error: ") and needle in err[-1], err[-5:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_eval_and_resume_say_it_in_one_line(good_ckpt: Path, kind: str, tmp_path: Path, synthetic_root) -> None:
    bad = _damaged(good_ckpt, kind)
    _one_error_line(_cli("eval", [f"ckpt_path={bad}", f"paths.root_dir={tmp_path}"], tmp_path), DAMAGES[kind][0])
    resume = _cli("train", ["experiment=demo", f"ckpt_path={bad}", f"paths.root_dir={tmp_path}",
                            f"paths.data_dir={synthetic_root}"], tmp_path)
    _one_error_line(resume, DAMAGES[kind][0])


def test_empty_caption_or_query_is_refused(good_ckpt: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from laps.cli.visualize import main
    from laps.inference import load_for_inference

    with pytest.raises(ValueError, match="caption 2 of 2 is empty"):
        load_for_inference(good_ckpt, device="cpu").encode_captions(["a dog", "   "])
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(good_ckpt), "--image", str(image), "--caption", "", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "caption 1 of 1 is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
