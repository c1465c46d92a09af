"""``laps-bench`` at tiny sizes: it runs, prints, and writes JSON with the documented fields."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from laps.cli.bench import main, run

TINY = [
    "--device", "cpu", "--batch", "5", "--tokens", "17", "--dim", "16", "--words", "7", "--min-words", "2",
    "--score-images", "6", "--score-captions", "7", "--memory-batch", "4", "--repeats", "1",
]


def test_tiny_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    result = run([*TINY, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["device"] == "cpu" and data["threads"] >= 1 and data["command"].startswith("laps-bench")
    assert data["config"]["tokens"] == 17 and data["config"]["lengths"] == "f30k"
    res = data["results"]
    train = res["head_train"]
    assert train["batch"] == 5 and train["pairs"] == 25
    for loss in ("hardest", "dense"):
        assert train[loss]["head_s"] > 0 and train[loss]["reference_s"] > 0
        assert train[loss]["speedup"] == pytest.approx(train[loss]["reference_s"] / train[loss]["head_s"])
    scoring = res["scoring"]
    assert (scoring["images"], scoring["captions"], scoring["pairs"]) == (6, 7, 42)
    assert scoring["head_s"] > 0 and scoring["reference_s"] > 0 and scoring["speedup"] > 0
    assert scoring["reference_captions_timed"] == 7 and scoring["head_pairs_per_s"] > 0
    memory = res["memory"]
    assert memory["batch"] == 4 and "RSS" in memory["method"]
    assert memory["head_bytes"] >= 0 and memory["reference_bytes"] >= 0 and memory["ratio"] >= 0
    printed = capsys.readouterr().out
    assert "scoring" in printed and "reference" in printed


def test_without_reference_and_uniform_lengths(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = run([*TINY, "--no-reference", "--no-memory", "--lengths", "uniform", "--no-cls",
                  "--sparse-ratio", "0.8", "--aggr-ratio", "0.6", "--out", str(out)])
    assert result["config"]["has_cls"] is False and result["config"]["lengths"] == "uniform"
    assert "reference_s" not in result["results"]["head_train"]["dense"]
    assert "speedup" not in result["results"]["scoring"]
    assert "memory" not in result["results"]


def test_cpu_gemm_choice_is_recorded_and_restored(capsys: pytest.CaptureFixture) -> None:
    from laps.models import gemm

    before = gemm.cpu_backend()
    # start from the other kernels where there are two, so that restoring them is not a no-op
    start = "onednn" if gemm._LINEAR is not None else "torch"
    gemm.set_cpu_backend(start)
    try:
        result = run([*TINY, "--no-reference", "--no-memory", "--cpu-gemm", "torch"])
        assert result["cpu_gemm"] == "torch"
        assert "head's CPU GEMMs: torch" in " ".join(capsys.readouterr().out.split())
        assert gemm.cpu_backend() == start
    finally:
        gemm.set_cpu_backend(before)


def test_full_training_step_tiny_backbones(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    result = run([
        "--device", "cpu", "--no-head-train", "--no-scoring", "--no-memory", "--train-step", "vit",
        "--batch", "3", "--dim", "16", "--words", "6", "--train-steps", "1", "--out", str(out),
        "--vision-override", "num_hidden_layers=1", "--vision-override", "hidden_size=32",
        "--vision-override", "num_attention_heads=2", "--vision-override", "intermediate_size=64",
        "--vision-override", "image_size=64",
        "--text-override", "num_hidden_layers=1", "--text-override", "hidden_size=32",
        "--text-override", "num_attention_heads=2", "--text-override", "intermediate_size=64",
    ])
    step = json.loads(out.read_text())["results"]["train_step"]
    assert step == result["results"]["train_step"]
    assert step["backbone"] == "vit" and step["batch"] == 3 and step["image_size"] == 64
    assert step["num_patches"] == 16 and step["amp"] == "off"
    assert step["step_s"] > 0 and step["pairs_per_s"] == pytest.approx(9 / step["step_s"])


def test_bad_arguments_exit_with_message(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--device", "cpu", "--words", "8", "--min-words", "9"])
    assert err.value.code == 2
    assert "--min-words" in capsys.readouterr().err


def test_console_script_help() -> None:
    exe = shutil.which("laps-bench")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "laps.cli.bench", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "--train-step" in res.stdout and "--out" in res.stdout
