"""``logger=wandb`` offline: the run on disk holds the resolved config, the losses, the learning
rates, the R@K curves and the final metrics table; nothing is uploaded unless asked for."""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from helpers.common import TINY_WIDTH32
from laps.training import callbacks as cb
from laps.training.tasks import train

TINY = ["backbone=tiny", *TINY_WIDTH32]


def read_wandb_records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file (wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, header = 32768, 7
    pos, pending, out = 7, b"", []
    while pos + header <= len(data):
        space = block - pos % block
        if space < header:  # the block's tail is padding
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:  # zero-filled end of a block
            pos += space - header
            continue
        if kind == 1:  # full
            raw = chunk
        elif kind == 2:  # first
            pending = chunk
            continue
        elif kind == 3:  # middle
            pending += chunk
            continue
        else:  # last
            raw, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def summarize_wandb_run(path: Path) -> dict[str, Any]:
    """config (key -> JSON), history (list of {key: JSON}), summary (key -> JSON), run name/group."""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, str] = {}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for r in read_wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"id": r.run.run_id, "name": r.run.display_name, "group": r.run.run_group}
            config.update({key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
    return {"config": config, "history": history, "summary": summary, "run": run}


@pytest.mark.slow
def test_wandb_offline_run_on_disk(make_cfg, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg([*TINY, "trainer=cpu", "logger=wandb", "trainer.max_epochs=2", "+trainer.limit_train_batches=2",
                    "trainer.log_every_n_steps=1"], name="wandb_run")
    assert cfg.logger.wandb.offline is True
    with caplog.at_level(logging.INFO, logger="laps"):
        metrics = train(cfg)

    import wandb

    assert wandb.run is None  # the job's run is finished: a next job starts its own
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_dir = runs[0]
    assert any(f"wandb sync {run_dir}" in m for m in caplog.messages), caplog.messages

    logged = summarize_wandb_run(next(run_dir.glob("run-*.wandb")))
    assert logged["run"]["name"] == f"train-{Path(cfg.paths.output_dir).name}"
    # The resolved config.
    assert logged["config"]["ratios"] == {"sparse_ratio": 0.5, "aggr_ratio": 0.4}
    assert logged["config"]["backbone"]["embed_size"] == 32
    # Losses every step, learning rates and R@K curves every epoch.
    series = {k: [row[k] for row in logged["history"] if k in row] for k in
              ("train/loss", "train/contrastive", "lr-AdamW/pg1", "val/rsum", "val/i2t_R@1", "val/t2i_R@10")}
    assert len(series["train/loss"]) == 4 and len(series["train/contrastive"]) == 4
    assert len(series["lr-AdamW/pg1"]) >= 1
    assert len(series["val/rsum"]) == len(series["val/i2t_R@1"]) == len(series["val/t2i_R@10"]) == 2
    # The final metrics: in the summary and as a table.
    for name in ("test/rsum", "test/i2t_R@1", "test/t2i_R@5", "val/rsum"):
        assert logged["summary"][f"final/{name}"] == pytest.approx(metrics[name])
    prefix = "final/metrics/"  # a table's summary entry: its file and shape, one nested key each
    table_meta = {k[len(prefix):]: v for k, v in logged["summary"].items() if k.startswith(prefix)}
    assert table_meta["_type"] == "table-file" and table_meta["nrows"] == 4
    table = json.loads((run_dir / "files" / table_meta["path"]).read_text())
    assert table["columns"] == ["split", "direction", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"]
    test_i2t = next(row for row in table["data"] if row[:2] == ["test", "i2t"])
    assert test_i2t[2] == pytest.approx(metrics["test/i2t_R@1"]) and test_i2t[7] == pytest.approx(metrics["test/rsum"])


def test_wandb_mode_never_uploads_by_surprise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline unless WANDB_MODE=online, an API key and a reachable server are all there."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cb.wandb_offline()  # nothing set
    monkeypatch.setenv("WANDB_MODE", "online")
    assert cb.wandb_offline()  # online asked, but no API key
    (tmp_path / "netrc").write_text("machine 127.0.0.1\n  login user\n  password k" + "0" * 39 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))

    with socket.socket() as server:  # a "server" that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        cb._reachable.cache_clear()
        assert not cb.wandb_offline()  # key from netrc, server up: online
    cb._reachable.cache_clear()
    assert cb.wandb_offline()  # the server went away: offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert cb.wandb_offline()
    cb._reachable.cache_clear()
