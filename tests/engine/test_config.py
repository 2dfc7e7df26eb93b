"""The config tree: YAML + overrides resolve once, strictly; errors name the key."""
import os

import pytest
import yaml

from trainer.config.recipes import config_docs, dump_config, load_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError

pytestmark = pytest.mark.quick


def test_defaults_are_the_paper_recipe():
    c = TrainConfig()
    assert (c.model.name, c.model.latent_channels, c.teacher.name) == ("RecTok-BB", 128, "dinov3-l16")
    assert c.optim.betas == (0.9, 0.95) and c.optim.weight_decay == 1e-4 and c.optim.grad_clip == 3.0
    assert c.optim.base_lr * c.data.global_batch / 256 == pytest.approx(4e-4)
    assert (c.schedule.epochs, c.schedule.warmup_epochs, c.ema.decay) == (200, 50, 0.999)
    assert (c.loss.kl_weight, c.loss.gan_weight, c.loss.disc_start_epoch) == (1e-6, 0.1, 100)
    assert (c.tokenizer.gamma, c.tokenizer.mask_ratio_min, c.tokenizer.mask_ratio_max) == (1.0, -0.1, 0.4)


@pytest.mark.parametrize("c,teacher", [(16, "dinov2-l14"), (32, "dinov2-l14"), (64, "dinov3-l16"),
                                       (128, "dinov3-l16")])
def test_stage1_recipes(c, teacher):
    cfg = load_config(f"rectok/stage1_d{c}")
    assert cfg.model.latent_channels == c and cfg.teacher.name == teacher
    assert cfg.data.global_batch == 1024 and cfg.tokenizer.stage == 1


def test_stage2_recipe():
    cfg = load_config("rectok/stage2_decoder_ft")
    assert cfg.tokenizer.stage == 2 and cfg.tokenizer.gamma == 0
    assert cfg.loss.kl_weight == 0 and cfg.loss.semantic_weight == 0 and cfg.loss.disc_start_epoch == 0
    assert cfg.optim.base_lr * 1024 / 256 == pytest.approx(2e-4)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (100, 5)


def test_overrides_are_typed():
    cfg = load_config("rectok/tiny_stage1", ["optim.base_lr=3e-4", "optim.betas=[0.8,0.9]", "run.name=007",
                                             "data.hflip=false", "tokenizer.t_schedule=lognorm",
                                             "teacher.weights=null"])
    assert cfg.optim.base_lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.run.name == "007" and cfg.data.hflip is False and cfg.teacher.weights is None


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "optimizer"),
    ("optim.base_lr=fast", "optim.base_lr"),
    ("data.global_batch=1.5", "data.global_batch"),
    ("data.hflip=maybe", "data.hflip"),
    ("tokenizer.t_schedule=cubic", "tokenizer.t_schedule"),
    ("tokenizer.stage=3", "tokenizer.stage"),
    ("model.latent_channels=0", "model.latent_channels"),
    ("model.latent_channels=-16", "model.latent_channels"),
    ("model.image_size=30", "model.image_size"),
    ("model.name=RecTok-ZZ", "model.name"),
    ("teacher.name=dinov2-l14", "teacher.name"),  # a 16x16 grid against the tiny 8x8 tokenizer
    ("data.micro_batch=5", "data.micro_batch"),
    ("schedule.warmup_epochs=9", "schedule.warmup_epochs"),
    ("ema.decay=1.0", "ema.decay"),
    ("tokenizer.mask_ratio_max=1.5", "tokenizer.mask_ratio_max"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("rectok/tiny_stage1", [override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean optim\.base_lr"):
        load_config("rectok/tiny_stage1", ["optim.base_rl=1"])


def test_world_size_must_divide_global_batch():
    with pytest.raises(ConfigError, match=r"data\.global_batch.*world size 3"):
        load_config("rectok/tiny_stage1", [], world_size=3)
    assert load_config("rectok/tiny_stage1", [], world_size=4).data.global_batch == 32


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("_base_: " + str(load_config.__globals__["CONFIG_DIR"]) + "/rectok/tiny_stage1.yaml\n"
                 "model:\n  latent_chanels: 8\n")
    with pytest.raises(ConfigError, match=r"model\.latent_chanels"):
        load_config(str(p))


def test_stage2_needs_init_from():
    with pytest.raises(ConfigError, match=r"tokenizer\.init_from"):
        load_config("rectok/tiny_stage2", ["tokenizer.init_from=null"])


def test_dump_round_trips(tmp_path):
    cfg = load_config("rectok/tiny_stage1", ["optim.base_lr=1e-3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p)) == cfg
    assert yaml.safe_load(dump_config(cfg))["optim"]["base_lr"] == 1e-3


def test_every_field_is_documented():
    for line in config_docs().splitlines():
        assert line.split(": ", 1)[1].strip(), line


@pytest.mark.parametrize("override,world,message", [
    ("parallel.zero_stage=4", 1, r"parallel\.zero_stage"),
    ("parallel.replicate_degree=3", 2, r"parallel\.replicate_degree.*world size 2"),
    ("parallel.replicate_degree=2", 2, r"HSDP.*strategy fsdp"),
    ("parallel.strategy=zero", 1, r"parallel\.strategy"),
])
def test_parallel_settings_are_checked(override, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config("rectok/tiny_stage1", [override], world)


@pytest.mark.parametrize("recipe", ["rectok/stage1_d128", "rectok/tiny_stage1", "rectok/stage2_decoder_ft",
                                    "dit/ditdh_xl", "dit/tiny_dit"])
def test_dumped_config_reads_back_to_the_same_text(recipe):
    """Defaults are canonicalised like given values, so a saved config is a fixed point (submitted jobs,
    resume checks and checkpoints compare the text)."""
    from trainer.config.recipes import dump_config, parse_saved_config
    text = dump_config(load_config(recipe))
    assert dump_config(parse_saved_config(text)) == text


# Issue 22: every bad value refused up front, naming its key (inf and nan included: they pass or slip
# through plain comparisons and then train on as nan weights or a schedule that never ends).
# Checked against the DiT recipe (keys a tokenizer run ignores, or a schedule only DiT recipes use).
DIT_ONLY = ("dit.time_shift=inf", "dit.time_shift=-1", "dit.num_classes=0", "dit.cache_shard_size=0",
            "schedule.decay_end_epoch=inf")


@pytest.mark.parametrize("override,key", [
    ("optim.base_lr=inf", "optim.base_lr"),
    ("optim.base_lr=nan", "optim.base_lr"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.base_lr=-1e-4", "optim.base_lr"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.betas=[-0.1,0.95]", "optim.betas"),
    ("optim.betas=[0.9,nan]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,0.95,0.99]", "optim.betas"),
    ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.eps=inf", "optim.eps"),
    ("optim.weight_decay=-0.01", "optim.weight_decay"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.grad_clip=nan", "optim.grad_clip"),
    ("schedule.min_lr=-1e-5", "schedule.min_lr"),
    ("schedule.min_lr=inf", "schedule.min_lr"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("checkpoint.milestone_every_epochs=-1", "checkpoint.milestone_every_epochs"),
    ("run.max_steps=-5", "run.max_steps"),
    ("eval.every_epochs=-1", "eval.every_epochs"),
    ("eval.num_images=-1", "eval.num_images"),
    ("eval.grid_images=0", "eval.grid_images"),
    ("eval.fid_images=-10", "eval.fid_images"),
    ("logging.log_every=0", "logging.log_every"),
    ("logging.peak_tflops=-1", "logging.peak_tflops"),
    ("data.default_per_class=0", "data.default_per_class"),
    ("data.micro_batch=-8", "data.micro_batch"),
    ("model.image_size=0", "model.image_size"),
    ("slurm.mem_gb=-1", "slurm.mem_gb"),
    ("sample.steps=1", "sample.steps"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("sample.scale=inf", "sample.scale"),
    ("loss.kl_weight=-1e-6", "loss.kl_weight"),
    ("loss.gan_weight=nan", "loss.gan_weight"),
    ("loss.disc_start_epoch=-1", "loss.disc_start_epoch"),
    ("tokenizer.gamma=inf", "tokenizer.gamma"),
    ("parallel.timeout_min=0", "parallel.timeout_min"),
    *((o, o.split("=")[0]) for o in DIT_ONLY),
])
def test_out_of_range_numbers_fail_naming_the_key(override, key):
    recipe = "dit/tiny_dit" if override in DIT_ONLY else "rectok/tiny_stage1"
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
        load_config(recipe, [override])


def test_zero_keeps_its_documented_meaning():
    """0 means 'the whole schedule', 'only at the end', 'all' or 'off' for these keys: still accepted."""
    cfg = load_config("rectok/tiny_stage1", ["run.max_steps=0", "checkpoint.every_steps=0", "eval.every_epochs=0",
                                             "eval.num_images=0", "eval.fid_images=0", "optim.weight_decay=0",
                                             "optim.grad_clip=0", "optim.betas=[0,0.999]", "slurm.mem_gb=0"])
    assert (cfg.run.max_steps, cfg.checkpoint.every_steps, cfg.optim.betas) == (0, 0, (0.0, 0.999))


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/../../b", "/tmp/abs", "x..y", "a//b", "a/", "./a"])
def test_run_name_cannot_leave_the_output_dir(name):
    with pytest.raises(ConfigError, match=r"^run\.name: .*run\.output_dir/run\.name"):
        load_config("rectok/tiny_stage1", [f"run.name={name}"])


def test_run_name_may_nest_inside_the_output_dir():
    """`rectok sweep` names its variants <sweep>/<variant>: still inside run.output_dir."""
    assert load_config("rectok/tiny_stage1", ["run.name=latent_dims/latent_channels=16"]).run.name == \
        "latent_dims/latent_channels=16"
    with pytest.raises(ConfigError, match=r"^run\.name: '' must be a folder name"):
        load_config("rectok/tiny_stage1", ["run.name="])


@pytest.mark.parametrize("override", ["optim.base_lr=inf", "run.max_steps=-5", "run.name=../escaped"])
def test_cli_refuses_a_bad_value_before_writing_anything(tmp_path, capsys, override):
    from trainer.cli import main
    out = tmp_path / "runs"
    assert main(["train", "rectok/tiny_stage1", f"run.output_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and override.split("=")[0] in err[0], err
    assert os.listdir(tmp_path) == []  # no run directory, inside run.output_dir or out of it


def test_auto_parallel_options_and_workers_parse_and_old_booleans_load(monkeypatch):
    """compile / activation_checkpointing / num_workers default to auto; true, false and numbers still parse,
    and a config saved with the old booleans and 8 workers reads back (issue 23)."""
    from data.folder import workers_per_rank
    from trainer.config.recipes import parse_saved_config
    c = load_config("rectok/stage1_d128")
    assert (c.parallel.compile, c.parallel.activation_checkpointing, c.data.num_workers) == ("auto",) * 3
    c = load_config("rectok/stage1_d128", ["parallel.compile=true", "parallel.activation_checkpointing=false",
                                           "data.num_workers=3", "parallel.gpu_memory_gb=40"])
    assert (c.parallel.compile, c.parallel.activation_checkpointing, c.data.num_workers) == (True, False, 3)
    text = dump_config(c)
    assert parse_saved_config(text).parallel.compile is True and dump_config(parse_saved_config(text)) == text
    old = yaml.safe_load(dump_config(TrainConfig()))
    old["parallel"].pop("gpu_memory_gb")
    old["parallel"].update(compile=False, activation_checkpointing=False)
    old["data"]["num_workers"] = 8
    saved = parse_saved_config(yaml.safe_dump(old))
    assert (saved.parallel.compile, saved.data.num_workers) == (False, 8)
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config("rectok/stage1_d128", ["parallel.compile=sometimes"])
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config("rectok/stage1_d128", ["data.num_workers=-1"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert workers_per_rank("auto") == 2 and workers_per_rank(5) == 5 and workers_per_rank(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert workers_per_rank("auto") == 1


def test_recipes_are_listed_by_rectok_recipes_and_train_help_and_an_unknown_name_lists_them(capsys):
    """`rectok recipes` and `rectok train --help` list the bundled recipes with one line each (the help
    lists training recipes only, with examples); a misspelt name lists them; building the parser still
    imports no torch, so `rectok --help` stays fast."""
    import glob
    import subprocess
    import sys

    from trainer.cli import main
    from trainer.config.catalog import CONFIG_DIR, REPO_ROOT, bundled_recipes
    files = {os.path.relpath(p, CONFIG_DIR)[:-len(".yaml")] for p in glob.glob(os.path.join(CONFIG_DIR, "*", "*.yaml"))}
    recipes = bundled_recipes()
    assert set(recipes) == files and all(recipes.values())
    assert recipes["dit/tiny_dit"].startswith("Tiny CPU recipe")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}  " in out for name in files) and "sweeps (rectok sweep)" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "rectok/tiny_stage1" in help_text and "dit/ditdh_xl" in help_text and "torchrun" in help_text
    assert "sweeps/latent_dims" not in help_text
    with pytest.raises(ConfigError, match=r"rectok/tiny_stage1, .*dit/tiny_dit.*`rectok recipes`"):
        load_config("rectok/tiny_stage")
    probe = "import sys; from trainer.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
