"""The search space: parsing, the errors a user gets, conditional sampling, grids and the baseline."""

from __future__ import annotations

import optuna
import pytest

from seektune.config import validate_config
from seektune.errors import UserError
from seektune.tune.space import apply_values, config_values, grid_space, parse_space, space_signature, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cfg(space: dict, **sections):
    raw = {"tune": {"enabled": True, "space": space}, **sections}
    return validate_config(raw)


def test_space_forms_parse_into_distributions():
    params = parse_space(
        _cfg(
            {
                "train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                "train.batch_size": {"type": "int", "low": 4, "high": 16, "step": 4},
                "method.lora.r": [8, 16, 32],
                "method.lora.target_modules": ["auto", "all-linear", ["q_a_proj", "o_proj"]],
            }
        )
    )
    lr, batch, rank, modules = params
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-3, True)
    assert (batch.type, batch.low, batch.high, batch.step) == ("int", 4, 16, 4)
    assert rank.choices == (8, 16, 32)
    assert modules.labels() == ["auto", "all-linear", '["q_a_proj", "o_proj"]']  # lists as JSON text
    assert modules.value_of('["q_a_proj", "o_proj"]') == ["q_a_proj", "o_proj"]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "tune.space is empty"),
        (
            {"train.learnin_rate": [1e-3]},
            "no config key 'train.learnin_rate' (did you mean 'learning_rate'?)",
        ),
        ({"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, "low (0.001) is above high"),
        (
            {"train.learning_rate": {"type": "float", "low": 0, "high": 1e-3, "log": True}},
            "log scale needs low",
        ),
        ({"train.learning_rate": {"type": "flot", "low": 0, "high": 1}}, "type must be one of float, int"),
        ({"train.learning_rate": {"low": 1e-4, "high": 1e-3, "lo": 1}}, "unknown field 'lo'"),
        ({"method.lora.r": {"type": "int", "low": 0, "high": 8}}, "0 does not fit the config: "),
        ({"method.lora.r": {"type": "int", "low": 1.5, "high": 8}}, "low must be an integer (got 1.5)"),
        ({"train.optimizer": ["adamw", "lion"]}, "'lion' does not fit the config"),
        ({"method.lora.r": []}, "needs a non-empty list of choices"),
        ({"method.lora.r": [8, 8]}, "the choices repeat a value"),
        ({"model.name_or_path": ["a", "b"]}, "model cannot be searched: a different model or tokenizer"),
        ({"data.max_length": [128, 256]}, "only what acts on the training split is searchable in data"),
        ({"train": [1]}, "train is a section; search one of its keys"),
        (
            {"method.prefix.num_virtual_tokens": [8, 16]},
            "acts only with method.name prefix, but method.name is",
        ),
        (
            {"method.lora.r": {"type": "int", "low": 4, "high": 8, "when": {"method.nam": "lora"}}},
            "tune.space.method.lora.r.when: no config key 'method.nam'",
        ),
    ],
)
def test_a_bad_space_is_one_clear_error(space, message):
    with pytest.raises(UserError) as caught:
        parse_space(_cfg(space))
    assert message in str(caught.value)
    if space:
        assert str(caught.value).startswith("tune.space.")


def test_data_mixing_ratios_are_searchable_by_source_index(tmp_path):
    # Whole-number weights (2:1): one source's weight moves alone (shares would have to add up to 1).
    sources = [
        {"path": str(tmp_path / "a.jsonl"), "ratio": 2},
        {"path": str(tmp_path / "b.jsonl"), "ratio": 1},
    ]
    data = {"sources": sources, "mix": {"strategy": "ratio"}}
    cfg = _cfg({"data.sources.1.ratio": {"type": "int", "low": 1, "high": 4}}, data=data)
    (param,) = parse_space(cfg)
    assert apply_values(cfg, {param.key: 3}).data.sources[1].ratio == 3
    with pytest.raises(UserError, match=r"no config key 'data.sources.2.ratio'; data.sources has: 0, 1"):
        parse_space(_cfg({"data.sources.2.ratio": [1, 2]}, data=data))


def _sample(cfg, seed: int) -> list[dict]:
    params = parse_space(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    samples = []
    for _ in range(12):
        trial = study.ask()
        values = suggest(trial, params, cfg)
        samples.append(values)
        study.tell(trial, 0.0)
        assert set(trial.params) == set(values)  # Optuna sees exactly the parameters that exist
    return samples


def test_method_sections_exist_only_in_trials_of_their_method():
    cfg = _cfg(
        {
            "method.name": ["lora", "prefix"],
            "method.lora.r": [4, 8],
            "method.prefix.num_virtual_tokens": {"type": "int", "low": 4, "high": 12},
            "train.learning_rate": {
                "type": "float",
                "low": 1e-4,
                "high": 1e-3,
                "when": {"method.name": ["prefix"]},
            },
        }
    )
    samples = _sample(cfg, seed=0)
    assert {s["method.name"] for s in samples} == {"lora", "prefix"}
    for values in samples:
        if values["method.name"] == "lora":
            assert set(values) == {"method.name", "method.lora.r"}
        else:
            assert set(values) == {"method.name", "method.prefix.num_virtual_tokens", "train.learning_rate"}
            assert (
                apply_values(cfg, values).method.prefix.num_virtual_tokens
                == values["method.prefix.num_virtual_tokens"]
            )


def test_grid_needs_finite_values_and_lists_them():
    cfg = _cfg(
        {
            "train.learning_rate": {"type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
            "method.lora.r": {"type": "int", "low": 4, "high": 12, "step": 4},
            "method.lora.target_modules": ["auto", ["o_proj"]],
        }
    )
    assert grid_space(parse_space(cfg)) == {
        "train.learning_rate": [0.001, 0.002, 0.003],
        "method.lora.r": [4, 8, 12],
        "method.lora.target_modules": ["auto", '["o_proj"]'],
    }
    continuous = _cfg({"train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}})
    with pytest.raises(UserError, match=r"tune\.space\.train\.learning_rate is continuous on a log scale"):
        grid_space(parse_space(continuous))


def test_baseline_takes_the_configs_own_values_inside_the_space():
    cfg = _cfg(
        {
            "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3},  # default 2e-4: inside
            "train.warmup_ratio": {"type": "float", "low": 0.1, "high": 0.2},  # default 0.03: outside
            "method.lora.target_modules": ["all-linear", "auto"],
            "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "when": {"seed": 7}},  # seed 42
        },
        method={"name": "lora"},
    )
    params = parse_space(cfg)
    assert config_values(cfg, params) == {"train.learning_rate": 2e-4, "method.lora.target_modules": "auto"}
    # The signature changes with the space (a study refuses another one under its name).
    other = parse_space(_cfg({"train.learning_rate": {"type": "float", "low": 1e-4, "high": 2e-3}}))
    assert space_signature(params) != space_signature(other)
