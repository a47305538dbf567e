"""Recipes: base: inheritance, overrides, and one clear sentence for every mistake."""

import pytest
import yaml

from pretrain import recipe
from pretrain.config import Config
from pretrain.errors import RecipeError


def write(path, text):
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads(root):
    for path in sorted((root / "recipes").glob("*.yaml")):
        config = recipe.load(path)
        assert isinstance(config, Config)


def test_paper_values(root):
    b16 = recipe.load(root / "recipes/vit_b16_i21k.yaml")
    assert (b16.optim.name, b16.optim.betas, b16.optim.weight_decay) == ("adamw", (0.9, 0.999), 0.03)
    assert (b16.data.batch_size, b16.schedule.warmup_steps, b16.schedule.decay) == (4096, 10_000, "linear")
    assert (b16.optim.clip_grad_norm, b16.model.image_size, b16.model.dropout) == (1.0, 224, 0.1)
    h14 = recipe.load(root / "recipes/vit_h14_jft.yaml")
    assert (h14.model.name, h14.optim.weight_decay, h14.model.dropout) == ("vit_h14", 0.1, 0.0)
    ft = recipe.load(root / "recipes/finetune_384.yaml")
    assert (ft.stage, ft.optim.name, ft.optim.momentum, ft.data.batch_size) == ("finetune", "sgd", 0.9, 512)
    assert (ft.optim.weight_decay, ft.optim.clip_grad_norm, ft.schedule.decay) == (0.0, 1.0, "cosine")
    assert (ft.model.image_size, ft.model.head) == (384, "linear")


def test_base_chain_and_overrides(root, tmp_path):
    l16 = recipe.load(root / "recipes/vit_l16_i21k.yaml")
    assert l16.model.name == "vit_l16" and l16.model.num_classes == 21843 and l16.optim.lr == 1e-3
    child = write(tmp_path / "child.yaml", f"base: {root / 'recipes/vit_l16_i21k.yaml'}\noptim:\n  lr: 5.0e-4\n")
    config = recipe.load(child, ["optim.betas=[0.9, 0.95]", "run_dir=/tmp/some where", "model.dropout=0", "seed=7"])
    assert config.optim.lr == 5e-4 and config.optim.betas == (0.9, 0.95)
    assert config.run_dir == "/tmp/some where" and config.model.dropout == 0.0 and config.seed == 7
    assert config.model.name == "vit_l16" and config.optim.weight_decay == 0.03


def test_numbers_without_a_dot_and_dotted_keys(tmp_path):
    path = write(tmp_path / "r.yaml", "optim.lr: 3e-4\nschedule: {total_steps: 1_000, warmup_steps: 1e2}\n")
    config = recipe.load(path, ["optim.weight_decay=1e-2", "checkpoint.every=2.0e+3"])
    assert config.optim.lr == 3e-4 and config.schedule.total_steps == 1000 and config.optim.weight_decay == 0.01
    assert config.schedule.warmup_steps == 100 and config.checkpoint.every == 2000
    assert all(type(v) is int for v in (config.schedule.warmup_steps, config.checkpoint.every))


def test_resolved_recipe_round_trips(root, tmp_path):
    config = recipe.load(root / "recipes/vit_r50_b16_i21k.yaml", ["optim.lr=2e-4"])
    recipe.save(config, tmp_path / "config.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recipe.load(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("optim:\n  lrr: 0.1\n", [], "r.yaml: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("lr: 0.1\n", [], "r.yaml: unknown key 'lr'; did you mean 'optim.lr'?"),
        ("model:\n  nmae: vit_b16\n", [], "unknown key 'model.nmae'; did you mean 'model.name'?"),
        ("optim:\n  lr: fast\n", [], "r.yaml: 'optim.lr' must be a number, got 'fast'"),
        ("schedule:\n  total_steps: 1.5\n", [], "r.yaml: 'schedule.total_steps' must be an integer, got 1.5"),
        ("model: vit_b16\n", [], "r.yaml: 'model' is a section of keys (e.g. model.name), not 'vit_b16'"),
        ("optim:\n  name: adam\n", [], "r.yaml: 'optim.name' must be one of adamw, sgd; got 'adam' (did you mean 'adamw'?)"),
        ("optim:\n  betas: 0.9\n", [], "r.yaml: 'optim.betas' must be a list of 2 values like [float, float], got 0.9"),
        ("model:\n  posemb_align_corners: 1\n", [], "'model.posemb_align_corners' must be true or false, got 1"),
        ("", ["optim.lrr=1"], "command line: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("", ["optim.lr"], "command line: override 'optim.lr' is not of the form key=value"),
        ("", ["seed=two"], "command line: 'seed' must be an integer, got 'two'"),
        ("", ["optim.lr.max=1"], "command line: 'optim.lr' has no sub-keys; unknown key 'optim.lr.max'"),
        ("data:\n  batch_size: 0\n", [], "r.yaml: 'data.batch_size' must be at least 1, got 0"),
        ("", ["log.every=0"], "command line: 'log.every' must be at least 1, got 0"),
        ("", ["model.dropout=1"], "command line: 'model.dropout' must be at least 0 and below 1, got 1"),
        ("", ["loss.label_smoothing=1"], "'loss.label_smoothing' must be at least 0 and below 1, got 1"),
        ("", ["seed=-1"], "command line: 'seed' must be between 0 and 9223372036854775807, got -1"),
        ("", ["run_dir="], "command line: 'run_dir' is empty; give it a value, or leave it out for its default"),
        ("", ["checkpoint.resume="], "'checkpoint.resume' is empty; give it a value, or leave it out for its default"),
        ("", ["model.patch_size=8"], "unknown key 'model.patch_size'; the patch size is part of model.name (vit_b16: 16)"),
        ("", ["schedule.epochs=3"], "unknown key 'schedule.epochs'; schedule.total_steps counts steps (epochs x samples"),
        ("", ["optim.name=SGD"], "'optim.name' must be one of adamw, sgd; got 'SGD' (did you mean 'sgd'?)"),
        ("", ["deepspeed.zero_stage='2'"], "got '2' (write it without quotes: deepspeed.zero_stage=2)"),
        ("", ["data.workers=-1"], "command line: 'data.workers' must be at least 0, got -1"),
        ("", ["optim.lr=.nan"], "command line: 'optim.lr' must be a finite number, got nan"),
        ("", ["optim.weight_decay=inf"], "command line: 'optim.weight_decay' must be a finite number, got 'inf'"),
        ("", ["base=recipes/demo.yaml"], "command line: base: belongs in a recipe file; give recipes/demo.yaml as the recipe"),
        ("", ["optim.lr="], "command line: 'optim.lr' must be a number, got an empty value"),
        ("optim:\n  lr: 0.1\noptim.lr: 0.2\n", [], "r.yaml: optim.lr is given twice (nested and as a dotted key)"),
        ("", ["optim.grad_accum=3"], "r.yaml with the overrides: data.batch_size 4096 does not divide into "
                                     "optim.grad_accum 3 micro-batches; make it a multiple of 3"),
        ("", ["optim.betas=[2, -1]"], "command line: 'optim.betas' must be at least 0 and below 1, got [2.0, -1.0]"),
        ("", ["model.norm_eps=0"], "command line: 'model.norm_eps' must be above 0, got 0.0"),
        ("", ["optim.lr=0.002", "schedule.final_lr=0.01"],
         "r.yaml with the overrides: schedule.final_lr 0.01 is above optim.lr 0.002, the peak the schedule decays from"),
        ("model: [unclosed\n", [], "r.yaml: not valid YAML at line 2"),
        ("- a\n- b\n", [], "r.yaml: a recipe is a mapping of keys to values, not a list"),
        ("model:\n  name: vit_b16\nmodel:\n  name: vit_l16\n", [],
         "r.yaml: not valid YAML at line 3 ('model' is given twice in one mapping)"),
        ("seed: 1e100x\n", [], "r.yaml: 'seed' must be an integer, got '1e100x'"),
        ("", ["precision=bfloat16"], "'precision' must be one of fp32, bf16, float8; got 'bfloat16' (did you mean 'bf16'?)"),
        ("base:\n", [], "r.yaml: base: names no recipe; give the path of one (base: demo.yaml) or remove the line"),
        ("base: .\n", [], "' is a folder; fix the base: line (it is the path of a YAML file, relative to the recipe"),
        ("", ["init_from=runs/b16"], "r.yaml with the overrides: init_from=runs/b16 is read by stage: finetune only"),
        ("", ["run_dir=gs://bucket/runs/x"], "run_dir gs://bucket/runs/x is a URL, and checkpoints are made atomic"),
        ("", ["log.fewshot_every=10", "data.val=null"], "log.fewshot_every needs a few-shot test set; set data.fewshot_val"),
        ("", ["backend=deepspeed", "deepspeed.zero_stage=3", "log.fewshot_every=10", "data.val=v"],
         "log.fewshot_every probes the model on rank 0 alone"),
    ],
)
def test_mistakes_give_one_clear_sentence(tmp_path, text, overrides, message):
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        recipe.load(path, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_file_that_is_no_text_is_one_sentence(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xc5\x00\xff" * 100)  # a run's weights given as the recipe
    with pytest.raises(RecipeError, match=r"model.safetensors' is not a text file \(not UTF-8\); pass the path of a YAML"):
        recipe.load(tmp_path / "model.safetensors")


def test_null_leaves_a_text_setting_empty(tmp_path):
    """data.val=null means no validation set, as YAML's null says, not a folder named 'null'."""
    assert recipe.load(write(tmp_path / "r.yaml", "data:\n  val: null\n  train: ~\n")).data.val == ""
    assert recipe.load("recipes/demo.yaml", ["data.val=null", "init_from=~", "log.fewshot_every=0"]).data.val == ""
    assert recipe.load("recipes/demo.yaml", ["optim.lr=0.1", "optim.lr=0.2"]).optim.lr == 0.2  # the last one
    for key in ("run_dir", "checkpoint.resume"):  # no empty setting: the current folder is no default
        with pytest.raises(RecipeError, match=f"'{key}' must be a string, got an empty value"):
            recipe.load("recipes/demo.yaml", [f"{key}=null"])


def test_a_saved_recipe_is_read_as_it_was(tmp_path):
    """What a recipe about to run may not contradict, a finished run's saved recipe may: it is evaluated as it was."""
    values = {"optim": {"lr": 1e-5}, "schedule": {"final_lr": 1e-4}}
    assert recipe.from_dict(values, "state.json").schedule.final_lr == 1e-4
    with pytest.raises(RecipeError, match="schedule.final_lr 0.0001 is above optim.lr 1e-05"):
        recipe.load(write(tmp_path / "r.yaml", yaml.safe_dump(values)))


def test_missing_base_and_loops(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nope.yaml\n")
    with pytest.raises(RecipeError, match=r"child.yaml: base recipe '.*nope.yaml' does not exist; fix the base: line"):
        recipe.load(child)
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="the base: chain loops"):
        recipe.load(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe 'missing.yaml' does not exist"):
        recipe.load("missing.yaml")
    write(tmp_path / "c.yaml", "seed: 1\n")
    with pytest.raises(RecipeError, match=r"is a folder \(it holds a.yaml, b.yaml, c.yaml, child.yaml\); pass one YAML file"):
        recipe.load(tmp_path)


def test_error_in_a_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  weight_dcay: 0.1\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    with pytest.raises(RecipeError, match=r"base.yaml: unknown key 'optim.weight_dcay'; did you mean 'optim.weight_decay'"):
        recipe.load(child)


def test_every_field_is_documented():
    rows = recipe.describe()
    assert len(rows) > 20
    assert all(doc for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc]
