"""The command line: --dry-run on every shipped recipe, and user errors as one line, exit 2."""

import subprocess
import sys

import pytest
import yaml

from pretrain import recipe
from pretrain.run import main


@pytest.mark.parametrize(
    "name, expected",
    [
        ("demo.yaml", "vit_mu4, 212 k parameters, 65 tokens (8x8 grid + 1 [CLS]) at 32px"),
        ("vit_b16_i21k.yaml", "vit_b16, 103 M parameters, 197 tokens (14x14 grid + 1 [CLS]) at 224px"),
        ("vit_l16_i21k.yaml", "vit_l16, 327 M parameters"),
        ("vit_h14_jft.yaml", "forward: 335 GFLOPs per image (167 G multiply-adds"),
        ("vit_r50_b16_i21k.yaml", "vit_r50_b16, 115 M parameters"),
        ("finetune_384.yaml", "577 tokens (24x24 grid + 1 [CLS]) at 384px"),
    ],
)
def test_dry_run_prints_the_resolved_recipe_and_the_model(root, capsys, name, expected):
    assert main([str(root / "recipes" / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert expected in out
    resolved = yaml.safe_load(out)  # the summary lines are YAML comments
    assert resolved["model"]["name"] in out and "base" not in resolved


def test_overrides_reach_the_model(root, capsys):
    assert main([str(root / "recipes/vit_b16_i21k.yaml"), "model.image_size=384", "model.name=vit_l16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "vit_l16" in out and "24x24 grid" in out
    assert main([str(root / "recipes/vit_b16_i21k.yaml"), "--dry-run", "model.name=vit_l16"]) == 0  # after a flag
    assert "vit_l16" in capsys.readouterr().out


def test_dry_run_warns_of_a_run_that_is_all_warm_up(root, capsys):
    assert main([str(root / "recipes/demo.yaml"), "schedule.total_steps=100", "--dry-run"]) == 0
    assert capsys.readouterr().err == ""
    assert main([str(root / "recipes/demo.yaml"), "schedule.total_steps=20", "schedule.warmup_steps=20", "--dry-run"]) == 0
    assert capsys.readouterr().err == ("warning: schedule.warmup_steps 20 is not below schedule.total_steps 20: the run is "
                                       "all warm-up, its learning rate never decays and reaches optim.lr at the last "
                                       "step only; lower the warm-up\n")


def test_dry_run_warns_of_a_fine_tune_without_its_start(root, capsys):
    assert main([str(root / "recipes/demo_finetune.yaml"), "init_from=", "--dry-run"]) == 0
    assert capsys.readouterr().err.startswith("warning: stage: finetune needs init_from")



def test_slice_without_an_xla_dry_run_is_refused(root, capsys):
    for extra in (["--dry-run"], ["backend=xla"]):
        assert main([str(root / "recipes/vit_h14_jft.yaml"), "--slice", "v5p-128", *extra]) == 2
        assert capsys.readouterr().err == ("error: --slice plans the memory of a TPU slice, which takes --dry-run and "
                                           "backend=xla\n")

def test_user_errors_are_one_line_on_stderr(root):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.run", "recipes/demo.yaml", "optim.lrr=1", "--dry-run"],
        cwd=root, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: command line: unknown key 'optim.lrr'; did you mean 'optim.lr'?\n"


def test_an_override_in_the_recipes_place_and_a_zoo_name_spelled_otherwise_are_one_sentence(root, capsys):
    assert main(["optim.lr=1", str(root / "recipes/demo.yaml"), "--dry-run"]) == 2
    assert capsys.readouterr().err == ("error: 'optim.lr=1' is an override where the recipe goes; the recipe comes "
                                       "first: python -m pretrain.run RECIPE key=value ...\n")
    assert main([str(root / "recipes/demo.yaml"), "model.name=vit_mu04", "--dry-run"]) == 2
    assert "write the patch size without a leading zero, vit_mu4" in capsys.readouterr().err


def test_a_run_that_is_not_there_is_called_so_by_every_command(tmp_path, capsys):
    from pretrain import consolidate, evaluate, export

    missing = str(tmp_path / "runs" / "typo")
    for command in (lambda: consolidate.main([missing]), lambda: evaluate.main([missing, "data=shards/val"]),
                    lambda: export.main([missing, "--format", "onnx", str(tmp_path / "m.onnx")])):
        assert command() == 2
        assert capsys.readouterr().err == f"error: {missing} does not exist; give a run directory or a checkpoints/step_* folder\n"


def test_help_recipe_lists_documented_keys(capsys):
    assert main(["--help-recipe"]) == 0
    out = capsys.readouterr().out
    assert "optim.weight_decay" in out and "on weight matrices only" in out
    rows = out.splitlines()
    assert "[0.9, 0.999]" in next(row for row in rows if row.startswith("optim.betas "))  # YAML, not a Python tuple
    docs = [doc for _, _, _, doc in recipe.describe()]
    assert len(rows) == len(docs) and len({row.rindex(doc) for row, doc in zip(rows, docs)}) == 1, "not aligned"


LOUD = """
import sys
from pretrain.cli import command

@command
def main(argv):
    for i in range(200_000):  # far more than a pipe holds
        print(f"line {i}")

sys.exit(main(None))
"""


def test_a_reader_that_stops_early_ends_a_command_quietly(root):
    """`python -m pretrain.evaluate ... | head`: the closed pipe ends the command without a traceback."""
    result = subprocess.run(f"{sys.executable} -c '{LOUD}' | head -n 2", shell=True, cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == "line 0\nline 1\n" and result.stderr == ""
