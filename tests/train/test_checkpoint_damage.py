"""Checkpoints that do not fit or are damaged: one sentence naming the one to resume from instead; a checkpoint that
a run in progress prunes while it is read is read as that run's newest."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from test_training import losses, overrides, run

from pretrain import checkpoint
from pretrain.errors import UserError


@pytest.fixture(scope="module")
def two_checkpoints(small_shards, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (no data workers: what is tested is reading them)."""
    run_dir = tmp_path_factory.mktemp("two_checkpoints")
    result = run(overrides(small_shards, run_dir, **DAMAGE_STEPS))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


DAMAGE_STEPS = {"schedule.total_steps": 4, "checkpoint.every": 2, "data.workers": 0}


def test_resuming_with_another_model_is_one_sentence(small_shards, two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    files = checkpoint.find(tmp_path).iterdir()
    assert len({stat.S_IMODE(f.stat().st_mode) for f in files}) == 1  # the weights as readable as the rest
    longer = {**DAMAGE_STEPS, "schedule.total_steps": 6}
    wrong = run(overrides(small_shards, tmp_path, **longer, **{"model.name": "vit_mu4"}))
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("error: checkpoint ") and "is of model vit_mu8, the recipe builds vit_mu4" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    other_grid = run(overrides(small_shards, tmp_path, **longer, **{"model.image_size": 48}))
    assert other_grid.returncode == 2 and len(other_grid.stderr.strip().splitlines()) == 1
    assert "does not fit this recipe's model or optimizer (size mismatch for pos_embed: copying a param with shape " \
           "torch.Size([1, 17, 64]) from checkpoint, the shape in current model is torch.Size([1, 37, 64])" \
           in other_grid.stderr


@pytest.mark.parametrize("damage", ["model.safetensors", "model.safetensors gone", "state.json", "optimizer.pt",
                                    "optimizer.pt gone"])
def test_a_damaged_checkpoint_is_one_sentence_naming_the_one_before(small_shards, two_checkpoints, tmp_path, damage):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    newest, before = checkpoint.find(tmp_path), tmp_path / "checkpoints" / "step_000000002"
    if damage.endswith(" gone"):  # a backend=torch checkpoint, so not ZeRO-3's missing weights
        damage = damage.removesuffix(" gone")
        (newest / damage).unlink()
    else:
        (newest / damage).write_bytes((newest / damage).read_bytes()[:1000])  # torch.load of a cut one: RuntimeError
    longer = {**DAMAGE_STEPS, "schedule.total_steps": 6}
    resumed = run(overrides(small_shards, tmp_path, **longer))
    assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr[-2000:]
    assert resumed.stderr.startswith(f"error: checkpoint {newest} is damaged (")
    assert f"checkpoint.resume={before}" in resumed.stderr
    if damage != "optimizer.pt":  # evaluate and export read the weights and the recipe, and take a path
        with pytest.raises(UserError, match=f"checkpoint {newest} is damaged") as refused:
            checkpoint.load_model(tmp_path)
        assert str(refused.value).endswith(f"; give the one before it, {before}")
    if damage == "model.safetensors":  # the advice works (the same for every kind of damage)
        resumed = run(overrides(small_shards, tmp_path, **longer, **{"checkpoint.resume": str(before)}))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "at step 2" in resumed.stdout and max(losses(tmp_path)) == 6


def test_a_checkpoint_pruned_while_it_is_read_is_read_as_its_runs_newest(two_checkpoints, tmp_path, monkeypatch):
    """evaluate, export and init_from of a run in progress: it writes a checkpoint and prunes the one being read
    (checkpoint.keep_last), here at the moment its recipe has been read."""
    root, read = tmp_path / "checkpoints", checkpoint.saved_config

    def run_goes_on(folder, *args):
        config = read(folder, *args)
        if folder == root / "step_000000004":
            shutil.copytree(folder, root / "step_000000006")
            (root / checkpoint.LATEST).write_text("step_000000006")
            shutil.rmtree(folder)
        return config

    names = set(checkpoint.init_weights(two_checkpoints, "vit_mu8"))
    monkeypatch.setattr(checkpoint, "saved_config", run_goes_on)
    for read_it in (lambda: checkpoint.load_model(tmp_path)[0].state_dict(),
                    lambda: checkpoint.init_weights(tmp_path, "vit_mu8")):
        shutil.rmtree(tmp_path, ignore_errors=True)
        shutil.copytree(two_checkpoints, tmp_path)
        assert set(read_it()) == names
        assert checkpoint.find(tmp_path).name == "step_000000006" and not (root / "step_000000004").exists()
    shutil.rmtree(tmp_path)
    shutil.copytree(two_checkpoints, tmp_path)
    with pytest.raises(UserError, match=f"checkpoint {root / 'step_000000004'} was removed while it was read .*; "
                                        f"give the run directory, which reads the newest"):
        checkpoint.load_model(root / "step_000000004")  # given the folder itself: no newer one to read




def test_weights_that_do_not_fit_their_own_recipe_are_one_sentence_for_evaluate_and_export(two_checkpoints, tmp_path):
    """A checkpoint folder whose model.safetensors was replaced (another run's, an export's): no traceback."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    newest = checkpoint.find(tmp_path)
    weights = load_file(newest / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "cls_token"}, newest / "model.safetensors")
    with pytest.raises(UserError, match=r"weights do not fit the vit_mu8 its config.yaml describes \(Missing key"):
        checkpoint.load_checkpoint(newest)
