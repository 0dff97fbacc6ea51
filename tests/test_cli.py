"""`python -m placement plan` as a user runs it: real subprocess, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

USER_CONFIG = """\
summarizer:
  provider: huggingface
  model: unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit
buffer_agent:
  provider: huggingface
  model: unsloth/medgemma-27b-text-it-unsloth-bnb-4bit
"""


def run_plan(tmp_path: Path, config_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "model_configs.yaml"
    config.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "placement", "plan", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path)},
    )


def test_users_config_as_json_puts_27b_on_gpu1(tmp_path: Path) -> None:
    # No files are cached in this HOME: sizes come from the names, and the plan says so.
    result = run_plan(tmp_path, USER_CONFIG, "--gpus", "2x24GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    by_role = {m["role"]: m for m in plan["models"]}
    assert by_role["buffer_agent"]["gpu_indices"] == [1]
    assert by_role["summarizer"]["gpu_indices"] == [0]
    assert by_role["buffer_agent"]["estimate"]["source"] == "name_guess"
    assert any("GUESSED" in w for w in plan["warnings"])
    assert [g["index"] for g in plan["gpus"]] == [0, 1]


def test_table_output_names_models_gpus_and_reasons(tmp_path: Path) -> None:
    config = (
        USER_CONFIG.replace("unsloth-bnb-4bit\nbuffer", "unsloth-bnb-4bit\n  memory_gb: 3.5\nbuffer").rstrip()
        + "\n  memory_gb: 17\n"
    )
    result = run_plan(tmp_path, config, "--gpus", "2x24GB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("buffer_agent", "summarizer", "cuda:1", "cuda:0", "memory_gb", "headroom", "17.00 GiB"):
        assert text in out, text


def test_infeasible_plan_exits_1_and_names_the_model(tmp_path: Path) -> None:
    config = "huge:\n  model: org/huge\n  memory_gb: 60\nsmall:\n  model: org/small\n  memory_gb: 2\n"
    result = run_plan(tmp_path, config, "--gpus", "2x24GB")
    assert result.returncode == 1
    assert "huge needs 60.00 GiB" in result.stdout + result.stderr
    assert "split: true" in result.stdout + result.stderr


def test_split_allowed_makes_it_feasible(tmp_path: Path) -> None:
    config = "huge:\n  model: org/huge\n  memory_gb: 30\n  split: true\n"
    result = run_plan(tmp_path, config, "--gpus", "2x24GB", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["gpu_indices"] == [0, 1]


def test_no_gpus_runs_on_cpu(tmp_path: Path) -> None:
    config = "tiny:\n  model: org/tiny\n  memory_gb: 0.5\n"
    result = run_plan(tmp_path, config, "--gpus", "none", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["device"] == "cpu"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("summarizer:\n  model: a\n  gpuu: 1\n", "model_configs.yaml:3: `summarizer.gpuu`: unknown field"),
        ("summarizer:\n  provider: huggingface\n", "`summarizer.model`: Field required"),
        ("summarizer:\n  model: [a\n", "malformed YAML"),
        ("summarizer:\n  model: a\n  gpu: -1\n", "`summarizer.gpu`"),
        ("- just\n- a list\n", "expected a mapping of role name"),
    ],
)
def test_bad_config_exits_2_naming_file_line_and_key(tmp_path: Path, config: str, expected: str) -> None:
    result = run_plan(tmp_path, config, "--gpus", "2x24GB")
    assert result.returncode == 2
    assert expected in result.stdout + result.stderr


def test_bad_gpu_spec_exits_2(tmp_path: Path) -> None:
    result = run_plan(tmp_path, USER_CONFIG, "--gpus", "2xlots")
    assert result.returncode == 2
    assert "cannot read memory size" in result.stdout + result.stderr


def test_ray_start_args_declares_one_slot_per_gpu() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "placement", "ray-start-args", "--gpus", "2", "--label", "zone=a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "--head",
        "--num-gpus=2",
        '--resources={"gpu_slot_0":1,"gpu_slot_1":1}',
        "--labels=zone=a",
    ]
