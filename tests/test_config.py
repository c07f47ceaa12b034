import re
from pathlib import Path

import pytest

from seektune.config import SeektuneConfig, config_schema, config_to_yaml, load_config, validate_config
from seektune.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_cover_every_section():
    cfg = load_config(None)
    for section in ("data", "model", "method", "train", "tune", "eval", "compress", "serve", "registry"):
        assert hasattr(cfg, section)
    assert cfg.model.name_or_path == "tiny-deepseek-v3"


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(SeektuneConfig)


def test_unknown_key_names_file_dotted_key_and_allowed(tmp_path):
    path = write(tmp_path, "train:\n  learnin_rate: 1e-4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.learnin_rate: unknown key" in message
    assert "did you mean 'learning_rate'?" in message
    assert "batch_size" in message  # the allowed keys are listed


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(UserError, match=r"train\.batch_size: .*integer.*many"):
        load_config(path)


def test_nested_unknown_key_in_a_list(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - pth: x.jsonl\n")
    with pytest.raises(UserError, match=r"data\.sources\.0\.pth: unknown key \(did you mean 'path'"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "train:\n  - : [\n"))
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_set_overrides_are_validated_like_the_file(tmp_path):
    cfg = load_config(None, ["train.learning_rate=2e-5", "method.lora.target_modules=[q_proj, o_proj]"])
    assert cfg.train.learning_rate == 2e-5
    assert cfg.method.lora.target_modules == ["q_proj", "o_proj"]
    with pytest.raises(UserError, match=r"train\.learning_rate"):
        load_config(None, ["train.learning_rate=fast"])
    with pytest.raises(UserError, match=r"dotted\.key=value"):
        load_config(None, ["train.learning_rate"])
    with pytest.raises(UserError, match="unknown key"):
        load_config(None, ["train.nope=1"])


def test_cross_field_rule():
    with pytest.raises(UserError, match="validation_ratio \\+ test_ratio"):
        load_config(None, ["data.validation_ratio=0.5", "data.test_ratio=0.5"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7", "method.name=dora"])
    again = load_config(write(tmp_path, config_to_yaml(cfg)))
    assert again == cfg


def test_schema_describes_sections():
    schema = config_schema()
    assert {"data", "model", "method", "train", "eval"} <= set(schema["properties"])
    assert "description" in schema["$defs"]["TrainConfig"]["properties"]["learning_rate"]


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name


def test_empty_section_means_defaults_and_home_is_expanded(tmp_path):
    cfg = load_config(write(tmp_path, "eval:\noutput_dir: ~/seektune-runs\n"))
    assert cfg.eval.max_new_tokens == 64
    assert cfg.output_dir == Path.home() / "seektune-runs"


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"path": "a", "ratio": 0.7}, {"path": "b", "ratio": 0.2}], "add up to 0.9"),
        ([{"path": "a", "ratio": 7}, {"path": "b"}], "missing on b"),
        ([{"path": "a", "ratio": 1}, {"path": "t", "split": "test", "ratio": 1}], "remove its ratio"),
    ],
)
def test_mixing_ratios_must_make_sense(sources, message):
    with pytest.raises(UserError, match=message):
        validate_config({"data": {"sources": sources, "mix": {"strategy": "ratio"}}})


def test_whole_number_weights_and_shares_are_both_accepted():
    for ratios in ((7, 2, 1), (1, 1, 1), (0.5, 0.3, 0.2)):
        sources = [{"path": f"s{i}", "ratio": r} for i, r in enumerate(ratios)]
        validate_config({"data": {"sources": sources, "mix": {"strategy": "ratio"}}})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.fairness.attribute=gender", "'source' or 'metadata.<key>' (e.g. metadata.gender)"),
        ("eval.primary_metric=bleu", "eval.primary_metric bleu is not in eval.metrics"),
        ("eval.metrics=[rouge_l, rouge_l]", "lists a metric twice"),
        ("eval.robustness.noise_rates=[0.1, 1.5]", "noise rates must lie in (0, 1]"),
        ("eval.scorecard.weights={accuracy: -1}", "cannot be negative"),
        ("eval.scorecard.weights={accuracy: 0, robustness: 0, efficiency: 0, explainability: 0, "
         "fairness: 0, adaptability: 0}", "must not all be 0"),
        ("train.best_metric=task_metric", "needs train.task_metric"),
    ],
)  # fmt: skip
def test_evaluation_settings_are_checked_with_the_key_named(override, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        load_config(None, [override])


def test_eval_primary_metric_defaults_to_the_first_answer_metric():
    assert load_config(None, ["eval.metrics=[perplexity, bleu, rouge_l]"]).eval.primary() == "bleu"
    assert load_config(None, ["eval.metrics=[perplexity]"]).eval.primary() == "perplexity"
