"""Every `seektune registry` command, through the CLI (the registry is the test's own, from
SEEKTUNE_REGISTRY_URL; see tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from registry_runs import make_run
from seektune.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def registered(tmp_path, capsys):
    for seed in (0, 1):
        code, out, err = cli(
            capsys, "registry", "add", str(make_run(tmp_path, seed=seed)), "--tag", f"t{seed}"
        )
        assert code == 0, err
    assert "registered legal@1.1.0+int8-dynamic (quantised)" in out
    return tmp_path


def test_add_list_and_show(registered, capsys):
    code, out, _ = cli(capsys, "registry", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["ref"] for r in rows][:3] == [
        "legal@1.0.0",
        "legal@1.0.0+int8-dynamic",
        "legal@1.0.0+merged",
    ]
    code, out, _ = cli(capsys, "registry", "list", "legal")
    assert code == 0 and "legal@1.1.0+int8-dynamic" in out and "registered versions" in out
    code, out, _ = cli(capsys, "registry", "show", "legal@t1", "--config")
    assert code == 0 and "legal@1.1.0" in out and "sha256" in out and "lora:" in out
    code, out, _ = cli(capsys, "registry", "show", "legal@1.0.0", "--json")
    assert json.loads(out)["children"] == ["legal@1.0.0+merged"]


def test_lineage_shows_base_adapter_merged_quantised(registered, capsys):
    code, out, _ = cli(capsys, "registry", "lineage", "legal@1.0.0+int8-dynamic")
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert "tiny-deepseek-v3" in lines[0] and "base model" in lines[0]
    order = [next(i for i, line in enumerate(lines) if key in line) for key in (
        "legal@1.0.0  adapter", "legal@1.0.0+merged  merged", "legal@1.0.0+int8-dynamic  quantised"
    )]  # fmt: skip
    assert order == sorted(order) and order[0] > 0
    code, out, _ = cli(capsys, "registry", "lineage", "legal", "--json")
    assert len(json.loads(out)["trees"]) == 2  # one per trained release


def test_tag_promote_and_compare(registered, capsys):
    assert cli(capsys, "registry", "tag", "legal@1.1.0", "candidate")[0] == 0
    code, _, err = cli(capsys, "registry", "tag", "legal@1.0.0", "candidate")
    assert code == 2 and "--move" in err and len(err.strip().splitlines()) == 1
    assert cli(capsys, "registry", "promote", "legal@1.0.0", "production")[0] == 0
    code, out, _ = cli(capsys, "registry", "promote", "legal@candidate", "production", "--reason", "A/B won")
    assert code == 0 and "legal@1.0.0 (production until now) is archived" in out
    code, out, _ = cli(capsys, "registry", "list", "--stage", "production", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["legal@1.1.0"]
    code, out, _ = cli(capsys, "registry", "compare", "legal@1.0.0", "legal@1.1.0")
    assert code == 0 and "perplexity" in out and "different test data" in out and "+    r: 9" in out
    code, out, _ = cli(capsys, "registry", "compare", "legal@1.0.0", "legal@1.0.0", "--json")
    assert json.loads(out)["config_diff"] == []


def test_export_and_gc(registered, capsys, tmp_path):
    code, out, _ = cli(capsys, "registry", "export", "legal@1.0.0", str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert cli(capsys, "registry", "gc")[1].strip() == "nothing to remove"
    cli(capsys, "registry", "promote", "legal@1.0.0+merged", "archived")
    code, out, _ = cli(capsys, "registry", "gc", "--dry-run")
    assert code == 0 and "legal@1.0.0+merged" in out and "would remove 1 folder(s)" in out
    code, _, err = cli(capsys, "registry", "gc")  # no terminal here to confirm on
    assert code == 2 and "--yes" in err
    code, out, _ = cli(capsys, "registry", "gc", "--yes")
    assert code == 0 and "removed 1 folder(s)" in out
    code, _, err = cli(capsys, "registry", "export", "legal@1.0.0+merged", str(tmp_path / "out2"))
    assert code == 2 and "removed by seektune registry gc" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["registry", "show", "legal@9.0.0"], "has no version or tag '9.0.0'"),
        (["registry", "show", "bad name@1"], "is not a registered model name"),
        (["registry", "list", "--stage", "live"], "--stage 'live' is not one of"),
        (["registry", "add", "/no/such/run"], "does not exist"),
        (["registry", "promote", "legal@1.0.0", "staging", "--url", "not a url"], "is not a database URL"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(registered, capsys, args, expected):
    code, _, err = cli(capsys, *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
