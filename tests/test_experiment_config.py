"""Bad experiment configs are refused before anything runs, in-process through
``kfe.cli.main``: exit code 2, one line per problem naming the field as the user writes
it (no union tags) and the allowed values, no traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch
import yaml
from pydantic import BaseModel, Field, ValidationError

from kfe.cli import main
from kfe.experiment.config import TASK_LOSSES, format_validation_error, load_experiment
from kfe.experiment.setup import loss_function
from tests.tiny import TINY_RUN as TINY


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, str]:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TINY))
    sets = [a for o in overrides for a in ("--set", o)]
    rc = main(["train", str(config), "--out", str(tmp_path / "run"), *sets])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # the tag of the rule union is not part of the path the user wrote
        ("optimizer.rule.decay=2", "optimizer.rule.decay: Input should be less than 1"),
        ("optimizer.rule.bogus=1", "optimizer.rule.bogus: unknown field"),
        ("optimizer.basis.bogus=1", "optimizer.basis.name: missing"),
        ("optimizer.rule=adamax", "optimizer.rule: unknown rule 'adamax'; registered rules:"),
        # non-finite numbers anywhere: experiment, optimizer, rule fields
        ("optimizer.lr=.inf", "optimizer.lr: Input should be a finite number"),
        ("optimizer.damping=.inf", "optimizer.damping: Input should be a finite number"),
        (
            "optimizer.rule={name: adam, beta1: .nan}",
            "optimizer.rule.beta1: Input should be a finite",
        ),
        # torch baselines: what torch.optim would refuse mid-run is refused here
        ("optimizer={type: torch, name: adam, betas: [1.5, 0.9]}", "optimizer.betas.0: Input"),
        ("optimizer={type: torch, name: sgd, nesterov: true}", "optimizer.nesterov: needs"),
        # a loss that does not fit the model's task
        ("loss=bce", "loss: 'bce' does not fit model 'mlp' (task classify); allowed: auto,"),
        ("name=../escape", "name: String should match pattern"),
        ("name=..", "name: String should match pattern"),
        ("optimizer.lr=[1,", "--set 'optimizer.lr=[1,': the value is not valid YAML"),
        # into a list or a number: refused, not silently replaced by a section
        ("model.hidden.0=4", "'model.hidden.0': model.hidden is not a section (it holds [16])"),
        ("epochs.x=3", "'epochs.x': epochs is not a section (it holds 1)"),
    ],
)
def test_bad_config_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, line: str
) -> None:
    rc, err = run(tmp_path, capsys, override)
    assert rc == 2, err
    assert f"  {line}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_text_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00bad")
    assert main(["train", str(config)]) == 2
    assert "binary.yaml: not a UTF-8 text file" in capsys.readouterr().err


def test_mse_targets_follow_the_task() -> None:
    """``mse`` regresses on the one-hot label for a classifier, on the input for the
    auto-encoder, and on ``y`` itself otherwise (summed over outputs, batch mean)."""
    out = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([2, 1])
    one_hot = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    want = {
        "classify": (out - one_hot).square().sum() / 2,
        "reconstruct": (out - x).square().sum() / 2,
        None: (out - x).square().sum() / 2,  # regression: y is the target as given
    }
    for task, expected in want.items():
        target = x if task is None else y
        got = loss_function("mse", task)(out, x, target)
        torch.testing.assert_close(got, expected)


def test_mse_trains_a_classifier_and_the_auto_encoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both train with ``mse``; the classifier still reports its accuracy."""
    adam = "optimizer={type: torch, name: adam, lr: 0.01}"
    rc, err = run(tmp_path, capsys, "loss=mse", adam)
    assert rc == 0, err
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    (tmp_path / "ae").mkdir()
    rc, err = run(tmp_path / "ae", capsys, "loss=mse", adam, "model=autoencoder", "max_steps=1")
    assert rc == 0, err
    rows = [
        json.loads(r) for r in (tmp_path / "ae" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(r["test_accuracy"] is None for r in rows)


@pytest.mark.parametrize(("model", "task"), [("mlp", "classify"), ("autoencoder", "reconstruct")])
def test_every_loss_a_task_allows_validates(model: str, task: str) -> None:
    for loss in ("auto", *TASK_LOSSES[task]):
        config = load_experiment(TINY, [f"model={model}", f"loss={loss}"])
        assert config.model_section.task == task


def test_a_union_tag_is_dropped_from_the_path_but_not_a_field_after_it() -> None:
    """A plugin rule with a tuple field: ``optimizer.rule.betas.1``, not
    ``optimizer.rule.lion.betas.1`` nor ``optimizer.rule.1``."""

    class Lion(BaseModel):
        name: Literal["lion"]
        betas: tuple[float, float]

    class Sign(BaseModel):
        name: Literal["sign"]

    class Section(BaseModel):
        rule: Annotated[Lion | Sign, Field(discriminator="name")]

    class Experiment(BaseModel):
        optimizer: Section

    with pytest.raises(ValidationError) as err:
        Experiment.model_validate({"optimizer": {"rule": {"name": "lion", "betas": [0.9, "x"]}}})
    assert format_validation_error(err.value).startswith("optimizer.rule.betas.1: Input should")
