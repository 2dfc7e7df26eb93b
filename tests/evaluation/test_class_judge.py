"""The class judge: a classifier trained on the real training images that scores whether samples show
their class (trainer/evaluation/classifier.py, trainer/tasks/class_judge.py)."""
import pytest
import torch
from safetensors.torch import save_file

from data import default_split, load_batch, open_images, to_model_range
from models.weights import MissingWeightsError, UnreadableWeightsError
from trainer.config.recipes import load_config
from trainer.config.tree import ConfigError
from trainer.evaluation.classifier import class_accuracy, load_judge, save_judge, train_judge
from trainer.tasks.class_judge import judge_path, load_class_judge, prepare_class_judge

pytestmark = pytest.mark.quick


def test_class_accuracy_overall_and_per_class():
    scores = class_accuracy(torch.tensor([0, 1, 1, 2, 0, 0]), torch.tensor([0, 1, 2, 2, 1, 0]))
    assert scores["class_accuracy"] == pytest.approx(4 / 6)
    assert scores["per_class"] == {0: 1.0, 1: 0.5, 2: 0.5} and scores["samples"] == 6


def test_judge_learns_the_dataset_round_trips_and_refuses_damaged_files(tmp_path, dataset_dir):
    """Trained on the 160 training images of the test dataset, it tells the 40 held-out ones apart far
    above chance; saved and loaded it predicts the same; a truncated or foreign file is refused by name."""
    train = open_images(default_split(dataset_dir, "train", "ffcv", 32, 16), "ffcv", 32)
    val = open_images(default_split(dataset_dir, "val", "ffcv", 32, 16), "ffcv", 32)
    model, info = train_judge(train, val, 10, torch.device("cpu"), epochs=8, batch=32)
    assert info["held_out_accuracy"] >= 0.6 and info["val_images"] == 40 and info["train_images"] == 160
    x, y = load_batch(val, range(len(val)))
    x = to_model_range(x, torch.device("cpu"))
    path = save_judge(str(tmp_path / "judge.safetensors"), model, info)
    again, saved = load_judge(path)
    assert saved == info and torch.equal(again.predict(x), model.predict(x))
    assert class_accuracy(model.predict(x), y)["class_accuracy"] == pytest.approx(info["held_out_accuracy"])
    # 256 px inputs are brought to 64 px: the judge works at the paper's resolution, cheaply
    assert model.predict(torch.zeros(2, 3, 256, 256)).shape == (2,)
    data = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableWeightsError, match="cut.safetensors"):
        load_judge(str(tmp_path / "cut.safetensors"))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UnreadableWeightsError, match="not a class judge"):
        load_judge(str(tmp_path / "other.safetensors"))
    with pytest.raises(MissingWeightsError, match="missing.safetensors"):
        load_judge(str(tmp_path / "missing.safetensors"))


def test_judge_is_kept_beside_the_training_split_and_checked_against_the_run(tmp_path, dataset_dir):
    over = [f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16", "dit.tokenizer=unused",
            f"eval.classifier={tmp_path / 'judge.safetensors'}"]
    cfg = load_config("dit/tiny_dit", over)
    assert load_config("dit/ditdh_xl", []).eval.classifier == "none"  # the paper recipes judge nothing unasked
    auto = load_config("dit/tiny_dit", over[:3])
    assert judge_path(auto) == default_split(dataset_dir, "train", "ffcv", 32, 16) + ".class_judge_32px.safetensors"
    assert judge_path(load_config("dit/tiny_dit", over + ["eval.classifier=none"])) is None
    prepare_class_judge(cfg, torch.device("cpu"))  # trained once, then found
    mtime = (tmp_path / "judge.safetensors").stat().st_mtime_ns
    prepare_class_judge(cfg, torch.device("cpu"))
    judge, info = load_class_judge(cfg, torch.device("cpu"))
    assert (tmp_path / "judge.safetensors").stat().st_mtime_ns == mtime and info["num_classes"] == 10
    with pytest.raises(ConfigError, match="10 classes, the run has 3"):
        load_class_judge(load_config("dit/tiny_dit", over + ["dit.num_classes=3"]), torch.device("cpu"))
