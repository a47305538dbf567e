"""checkpoint.resume=PATH: a run goes back to an earlier checkpoint (past a loss spike) or starts from another run's,
once; the same command run again (after a preemption, by a requeued job) goes on from the run's own checkpoints."""

from __future__ import annotations

import json

from test_training import overrides, run

from pretrain import checkpoint


def test_going_back_to_an_earlier_checkpoint_sets_the_later_ones_aside_and_a_rerun_goes_on(small_shards, tmp_path):
    steps = {"data.workers": 0, "checkpoint.every": 4, "checkpoint.keep_last": 2}
    first = run(overrides(small_shards, tmp_path, **steps, **{"schedule.total_steps": 12, "checkpoint.keep_every": 4}))
    assert first.returncode == 0, first.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000000004", "step_000000008", "step_000000012"]

    back = {**steps, "checkpoint.resume": str(root / "step_000000004"), "optim.lr": 1e-4}
    went_back = run(overrides(small_shards, tmp_path, **back, **{"schedule.total_steps": 8}))
    assert went_back.returncode == 0, went_back.stderr[-2000:]
    assert f"resumed from {root / 'step_000000004'} at step 4" in went_back.stdout
    assert f"note: moved step_000000008, step_000000012, of the steps this run went back from, to " \
           f"{root / 'abandoned'}" in went_back.stdout  # at its first checkpoint, before that replaced the old step 8
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000000004", "step_000000008"]
    assert sorted(p.name for p in (root / "abandoned").iterdir()) == ["step_000000008", "step_000000012"]
    assert json.loads((root / "step_000000008" / "state.json").read_text())["origin"] == str(root / "step_000000004")

    again = run(overrides(small_shards, tmp_path, **back, **{"schedule.total_steps": 10}))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {root / 'step_000000008'} at step 8" in again.stdout, "the run's own, not step 4 again"
    assert "the run went on from checkpoint.resume=" in again.stdout and "to go back there again, move" in again.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 11))  # one timeline, no repeats
    done = run(overrides(small_shards, tmp_path, **back, **{"schedule.total_steps": 10}))
    assert done.returncode == 0 and "is complete" in done.stdout + done.stderr, done.stdout + done.stderr



def test_going_back_again_keeps_what_an_earlier_going_back_set_aside(tmp_path, capsys):
    for name in ("step_000000004", "step_000000008", "step_000000012", "abandoned/step_000000012"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "state.json").write_text(name)
    checkpoint._set_aside_later(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000004"]
    aside = {p.name: (p / "state.json").read_text() for p in (tmp_path / "abandoned").iterdir()}
    assert aside == {"step_000000008": "step_000000008", "step_000000012": "abandoned/step_000000012",
                     "step_000000012.2": "step_000000012"}
    assert "note: moved step_000000008, step_000000012.2, of the steps this run went back from" in capsys.readouterr().out
