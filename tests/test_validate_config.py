"""What a user mistypes on the command line is one line naming the key, before anything is built."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_train
from laps.cli.common import user_error
from laps.training.tasks import train, validate_config


@pytest.mark.parametrize("key", ["model.optimizer.lr", "model.margin", "model.ratio_weight"])
def test_a_word_where_a_number_belongs_names_the_key(make_cfg, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key} must be a number, got 'abc'"):
        validate_config(make_cfg([f"{key}=abc"]))


def test_numbers_pass(make_cfg) -> None:
    validate_config(make_cfg(["model.optimizer.lr=1e-3", "model.margin=0.3"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_gpu_trainer_without_a_gpu_says_what_to_use(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu but this machine has no CUDA GPU: "
                                         r"use trainer=cpu or trainer=default"):
        validate_config(make_cfg(["trainer=gpu"]))


def test_a_batch_of_one_is_refused_before_any_data_is_read(tmp_path) -> None:
    """The data module's check (the one place it is made) comes before its missing folder is looked at."""
    cfg = compose_train(["dataset=f30k", "dataset.root=/nonexistent/f30k", "dataset.batch_size=1", "backbone=tiny"],
                        tmp_path / "run", tmp_path / "data")
    with pytest.raises(Exception) as info:
        train(cfg)
    cause = user_error(info.value)
    assert cause is not None
    assert str(cause) == "dataset.batch_size must be at least 2 (the contrastive loss needs negatives), got 1"
