"""Started by test_no_code_loading.py in a process of its own (DeepSpeed needs a process group: here a world
of one on gloo, which must not outlive the run). Not a test module itself.

usage: deepspeed_worker.py DIR STAGE HOSTILE RELATIVE_PATH...
Trains a tiny module one step under DeepSpeedStrategy (ZeRO-STAGE, fp32), saves a checkpoint in DIR and
its expected whole weights in DIR/expected.pt, loads the checkpoint into a fresh strategy and checks that
parameters, EMA and optimizer state (the next step) come back. Then, for each RELATIVE_PATH of DIR, puts
the file HOSTILE in its place, loads again and prints `REFUSED RELATIVE_PATH: message` (or `LOADED
RELATIVE_PATH`), and puts the original back.
"""
import os
import shutil
import sys

import torch
from torch import nn

from models.weights import UnreadableWeightsError
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import DistEnv, init_distributed
from trainer.engine.protocols import TrainedModule
from trainer.parallel.deepspeed_strategy import DeepSpeedStrategy


def strategy(stage: int, seed: int) -> tuple[DeepSpeedStrategy, nn.Module]:
    cfg = TrainConfig()
    cfg.parallel.strategy, cfg.parallel.zero_stage, cfg.data.global_batch = "deepspeed", stage, 2
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    s = DeepSpeedStrategy(cfg, DistEnv(), torch.device("cpu"), "foreach")
    s.setup([TrainedModule("generator", model)], model, 1e-2)
    return s, model


def step(s: DeepSpeedStrategy, model: nn.Module, x: torch.Tensor) -> None:
    s.backward(s.trained[0], model(x).square().sum(), accum=1, last_micro=True)
    s.step(s.trained[0], clip=1.0)


def main(directory: str, stage: str, hostile: str, *relative_paths: str) -> None:
    init_distributed(DistEnv(), torch.device("cpu"), need_group=True)
    s, model = strategy(int(stage), seed=0)
    step(s, model, torch.randn(2, 4))
    s.update_ema(model)
    s.save(directory)
    torch.save({"generator": {k: v.clone() for k, v in model.state_dict().items()},
                "ema": s.ema_model().state_dict()}, os.path.join(directory, "expected.pt"))
    fresh, fresh_model = strategy(int(stage), seed=1)
    fresh.load(directory)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[k], v), k
    for k, v in s.ema_model().state_dict().items():
        assert torch.equal(fresh.ema_model().state_dict()[k], v), k
    x = torch.randn(2, 4)
    step(s, model, x)  # the same next step on both: Adam's moments came back too
    step(fresh, fresh_model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[k], v), k
    print("ROUND TRIP OK", flush=True)

    for rel in relative_paths:
        path = os.path.join(directory, rel)
        shutil.move(path, path + ".orig")
        shutil.copy(hostile, path)
        try:
            strategy(int(stage), seed=2)[0].load(directory)
            print(f"LOADED {rel}", flush=True)
        except UnreadableWeightsError as e:
            print(f"REFUSED {rel}: {e}", flush=True)
        finally:
            shutil.move(path + ".orig", path)


if __name__ == "__main__":
    main(*sys.argv[1:])
