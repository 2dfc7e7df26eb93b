"""What a verified checkpoint costs: the time to write one and the time to hash and verify it, in one run.

A full trainer of the recipe (synthetic inputs, one optimizer step so the Adam moments exist) saves a
real checkpoint (weights, Adam state, EMA, RNG) through `Trainer.save`, which writes the files, reads
them back to hash them and checks the state finite first. The hashing and verification are then timed
on their own against the same files: the overhead of checksums is their share of the save.

    .venv/bin/python benchmarks/checkpoint_save.py                     # DiT^DH-S
    .venv/bin/python benchmarks/checkpoint_save.py --recipe dit/ditdh_xl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config.recipes import load_config  # noqa: E402
from trainer.engine.checkpoint import file_checksums, verify_checkpoint  # noqa: E402
from trainer.tasks.training import build_trainer  # noqa: E402
from trainer.workflows.profile_steps import PROFILE_OVERRIDES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="dit/ditdh_s")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.recipe, [*PROFILE_OVERRIDES, f"run.output_dir={out}", "run.name=save",
                                        f"data.global_batch={args.batch}", "checkpoint.every_steps=0"])
        trainer = build_trainer(cfg)
        batch = next(iter(trainer.train_set.batches([list(range(trainer.per_rank))], 0)))
        trainer.train_step(*batch)
        trainer.read_metrics()
        t = time.perf_counter()
        path = trainer.save()
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        file_checksums(path)
        hash_s = time.perf_counter() - t
        t = time.perf_counter()
        assert verify_checkpoint(path) is None
        verify_s = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        trainer.close()
    print(json.dumps({"recipe": args.recipe, "checkpoint_gb": round(size / 1e9, 3), "save_s": round(save_s, 2),
                      "of_which_hashing_s": round(hash_s, 2), "hash_share": round(hash_s / save_s, 3),
                      "verify_s": round(verify_s, 2), "hash_gb_per_s": round(size / 1e9 / hash_s, 2)}, indent=1))


if __name__ == "__main__":
    main()
