"""Bad input to the Python API fails at the call with an error naming the argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfe
from kfe import diagnostics as D
from kfe.registry import PluginError


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _opt(model: nn.Module, registry: kfe.Registry, **kw: object) -> kfe.KFEOptimizer:
    settings = {"lr": 0.1, "factor_every": 1, "basis_every": 1, "lambda_every": 1, **kw}
    return kfe.KFEOptimizer(model, registry=registry, **settings)


X = torch.randn(16, 4)
Y = torch.randint(0, 3, (16,))


def _stepped(registry: kfe.Registry) -> tuple[nn.Sequential, kfe.KFEOptimizer]:
    model = _model()
    opt = _opt(model, registry)
    F.cross_entropy(model(X), Y).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


# -- sample_fisher ------------------------------------------------------------------


def test_sample_fisher_cross_entropy_needs_class_dim(registry) -> None:
    model = _model()
    opt = _opt(model, registry, fisher="true")
    out = model(X)
    with pytest.raises(ValueError, match=r"output: kind 'cross_entropy' needs .* shape \(16,\)"):
        opt.sample_fisher(out[:, 0], "cross_entropy")


def test_sample_fisher_detached_output(registry) -> None:
    model = _model()
    opt = _opt(model, registry, fisher="true")
    out = model(X)
    with pytest.raises(ValueError, match="output: does not require grad"):
        opt.sample_fisher(out.detach(), "cross_entropy")


def test_sample_fisher_unrelated_output(registry) -> None:
    model = _model()
    opt = _opt(model, registry, fisher="true")
    model(X)
    other = torch.randn(16, 3, requires_grad=True)
    with pytest.raises(ValueError, match="output: does not depend on any tracked layer"):
        opt.sample_fisher(other, "cross_entropy")


def test_sample_fisher_twice_in_a_step(registry) -> None:
    model = _model()
    opt = _opt(model, registry, fisher="true")
    out = model(X)
    opt.sample_fisher(out, "cross_entropy")
    with pytest.raises(RuntimeError, match="already called"):
        opt.sample_fisher(out, "cross_entropy")


# -- step -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["2", True, torch.tensor([2.0, 3.0]), "abc"])
def test_loss_scale_of_wrong_type(registry, scale: object) -> None:
    model = _model()
    opt = _opt(model, registry)
    F.cross_entropy(model(X), Y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="loss_scale: must be a positive finite number"):
        opt.step(loss_scale=scale)  # type: ignore[arg-type]
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_loss_scale_one_element_tensor_accepted(registry) -> None:
    model = _model()
    opt = _opt(model, registry)
    F.cross_entropy(model(X), Y).backward()
    opt.step(loss_scale=torch.tensor(2.0))  # type: ignore[arg-type]
    assert opt.steps_taken == 1


def test_model_cast_after_first_step(registry) -> None:
    model, opt = _stepped(registry)
    model.double()
    F.cross_entropy(model(X.double()), Y).backward()
    with pytest.raises(TypeError, match=r"layer '0': its gradient is torch.float64 .*float32"):
        opt.step()


# -- construction ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["model", None, [nn.Linear(2, 2)]])
def test_model_not_a_module(registry, model: object) -> None:
    with pytest.raises(TypeError, match=r"model: must be a torch\.nn\.Module"):
        kfe.KFEOptimizer(model, registry=registry)  # type: ignore[arg-type]


def test_duplicate_params_refused(registry) -> None:
    model = _model()
    params = [model[0].weight, model[0].weight, model[0].bias]
    with pytest.raises(ValueError, match="params: a parameter of shape \\(8, 4\\) is listed"):
        kfe.KFEOptimizer(model, params=params, registry=registry)


def test_group_without_params(registry) -> None:
    with pytest.raises(KeyError, match="params: parameter group 0 has no 'params'"):
        kfe.KFEOptimizer(_model(), params=[{"lr": 0.1}], registry=registry)


def test_single_tensor_params(registry) -> None:
    model = _model()
    with pytest.raises(TypeError, match="params: must be an iterable"):
        kfe.KFEOptimizer(model, params=model[0].weight, registry=registry)


def test_params_generator(registry) -> None:
    model = _model()
    opt = kfe.KFEOptimizer(model, params=(p for p in model.parameters()), registry=registry)
    assert [b.name for b in opt.blocks] == ["0", "2"]


# -- inspection -------------------------------------------------------------------------


def test_dense_max_params_type(registry) -> None:
    _, opt = _stepped(registry)
    with pytest.raises(TypeError, match="max_params: must be an int"):
        kfe.inspect_layer(opt, "0").dense(max_params="10")  # type: ignore[arg-type]


def test_unknown_layer_names_tracked(registry) -> None:
    model, opt = _stepped(registry)
    with pytest.raises(KeyError, match="tracked: 0, 2"):
        kfe.inspect_layer(opt, nn.Linear(4, 8))
    with pytest.raises(KeyError, match="tracked: 0, 2"):
        opt.block(model[1])
    big = nn.Sequential(nn.Linear(100, 100))
    opt_big = kfe.KFEOptimizer(big, registry=registry)
    big(torch.randn(4, 100)).sum().backward()
    opt_big.step()
    with pytest.raises(ValueError, match="max_params=4096"):
        kfe.inspect_layer(opt_big, "0").kronecker()


# -- diagnostics ----------------------------------------------------------------------


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


@pytest.mark.parametrize("mc", [0, -1])
def test_layer_gradients_mc_samples(registry, mc: int) -> None:
    model, opt = _stepped(registry)
    with pytest.raises(ValueError, match="mc_samples: must be at least 1"):
        D.layer_gradients(
            opt, model, _ce, (X, Y), ["0"], fisher="true", loss_kind="cross_entropy", mc_samples=mc
        )


def test_layer_gradients_layers_str(registry) -> None:
    model, opt = _stepped(registry)
    with pytest.raises(TypeError, match="layers: must be a list of module names"):
        D.layer_gradients(opt, model, _ce, (X, Y), "0")


def test_layer_gradients_kind_does_not_fit_output(registry) -> None:
    model, opt = _stepped(registry)
    flat = nn.Sequential(model, nn.Flatten(0))
    with pytest.raises(ValueError, match="output: kind 'cross_entropy' needs"):
        D.layer_gradients(opt, flat, _ce, (X, Y), ["0"], fisher="true", loss_kind="cross_entropy")


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"loss_kind": "nll", "fisher": "true"}, ValueError, "loss_kind: must be one of"),
        ({"loss_kind": "mse", "fisher": "true", "reduction": "x"}, ValueError, "reduction:"),
        ({"fisher": "ggn"}, ValueError, "fisher must be 'empirical' or 'true'"),
        ({"loss_kind": "mse", "fisher": "true", "mc_samples": 0}, ValueError, "mc_samples"),
        ({"loss_kind": "mse", "fisher": "true", "mc_samples": 1.5}, TypeError, "mc_samples"),
    ],
)
def test_curvature_diagnostics_checks_at_construction(
    registry, tmp_path: Path, kw: dict[str, object], error: type[Exception], match: str
) -> None:
    model, opt = _stepped(registry)
    with pytest.raises(error, match=match):
        D.CurvatureDiagnostics(
            opt,
            model,
            _ce,
            (X, Y),
            ["0"],
            1,
            tmp_path / "c.jsonl",
            **kw,  # type: ignore[arg-type]
        )


def test_curvature_diagnostics_layers_str(registry, tmp_path: Path) -> None:
    model, opt = _stepped(registry)
    with pytest.raises(TypeError, match="layers:"):
        D.CurvatureDiagnostics(opt, model, _ce, (X, Y), "0", 1, tmp_path / "c.jsonl")


# -- registry -------------------------------------------------------------------------


def test_load_registry_refuses_a_str() -> None:
    with pytest.raises(TypeError, match="plugins: must be a list of plugin objects"):
        kfe.load_registry("kfe_plugins")  # type: ignore[arg-type]


@pytest.mark.parametrize("plugin", [object(), None])
def test_load_registry_refuses_object_without_hooks(plugin: object) -> None:
    with pytest.raises(PluginError, match=r"plugins\[0\]: .* implements no kfe hook"):
        kfe.load_registry([plugin])
