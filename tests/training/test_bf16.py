"""parallel.precision=bf16 under every strategy (DDP, FSDP2, HSDP, ZeRO-1/2/3), on 2-process gloo groups.

CPUs run bf16 autocast, so the bf16 paths are checked here: the first steps' losses agree with DDP's within
bf16 rounding; the flow time t, the fixed Fourier weights, the position embedding and the RoPE tables stay
fp32 in the trained module; the residual stream between blocks has DDP's dtypes; the EMA stays fp32 and
averages the optimizer's fp32 master weights, not their bf16 copies. One torchrun runs every case
(bf16_worker.py); the tests read its record.
"""
import json
import os

import pytest
from test_distributed import (
    HERE,
    STRATEGIES,
    TOKENIZER_STRATEGIES,
    check,
    dit_overrides,
    tokenizer_overrides,
    torchrun,
)

from trainer.cli import main

pytestmark = pytest.mark.distributed

BF16_STRATEGIES = {**{k: v for k, v in STRATEGIES.items() if k in ("ddp", "fsdp", "zero1", "zero2", "zero3")},
                   "hsdp": ["parallel.strategy=fsdp", "parallel.replicate_degree=2"]}
# The DiT under every strategy; the tokenizer (about 7 s a case) under DDP, FSDP2 and ZeRO-3, as in
# test_distributed.py: the suite's time budget is 15 minutes.
CASES = [f"{task}/{s}" for task in ("dit", "tokenizer") for s in BF16_STRATEGIES
         if task == "dit" or s in TOKENIZER_STRATEGIES]
# bf16 rounding of the same computation in another order (sharded gathers, bf16 parameters where DDP's
# autocast casts fp32 ones): up to 3e-3 seen (the tokenizer's GAN terms). The DiT's losses hardly depend
# on the model in its first two steps (its output starts at zero, and Adam's first step is the gradient's
# sign): the dtypes recorded in the forward are what shows a bf16 t or Fourier table there.
LOSS_RTOL = 1e-2
# fp32 rounding of one lerp; averaging bf16 copies of the weights leaves about (1 - decay) * 2^-9 = 4e-5.
EMA_RTOL = 1e-6


@pytest.fixture(scope="module")
def bf16_record(tmp_path_factory, dataset_dir, tokenizer_run):
    out = tmp_path_factory.mktemp("bf16")
    dit = dit_overrides(out, dataset_dir, tokenizer_run)
    assert main(["cache-latents", "dit/tiny_dit", *dit]) == 0
    spec = {"cases": [c.split("/") for c in CASES],
            "recipes": {"dit": "dit/tiny_dit", "tokenizer": "rectok/tiny_stage1"},
            # The loader does not matter here: PIL spares each process FFCV's numba compilation.
            "overrides": {"dit": dit, "tokenizer": [*tokenizer_overrides(out, dataset_dir), "data.loader=pil"]},
            "strategies": BF16_STRATEGIES}
    spec_path, record = out / "spec.json", out / "record.json"
    spec_path.write_text(json.dumps(spec))
    check(torchrun(2, [os.path.join(HERE, "bf16_worker.py"), str(spec_path), str(record)]))
    return json.loads(record.read_text())


def facts(record: dict, case: str) -> dict:
    assert "error" not in record[case], record[case]["error"]  # the worker went on with the other cases
    return record[case]


def _others():
    return [c for c in CASES if not c.endswith("/ddp")]


@pytest.mark.parametrize("case", _others())
def test_bf16_losses_match_ddp(case, bf16_record):
    got, want = facts(bf16_record, case)["losses"], facts(bf16_record, case.split("/")[0] + "/ddp")["losses"]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=LOSS_RTOL, abs=1e-4), (k, g[k], w[k])


@pytest.mark.parametrize("case", CASES)
def test_bf16_time_fourier_weights_position_embedding_and_rope_stay_fp32(case, bf16_record):
    seen = facts(bf16_record, case)["seen"]
    if case.startswith("dit/"):
        assert (seen["t"], seen["fourier_W"], seen["pos_embed"]) == ("float32",) * 3, seen
    assert seen["rope_tables"] == ["float32"], seen
    blocks = {k: v for k, v in seen.items() if k.startswith("block_")}
    assert blocks and all(rope == "float32" for _, rope in blocks.values()), blocks  # as the blocks receive them


@pytest.mark.parametrize("case", _others())
def test_bf16_residual_stream_has_ddps_dtypes(case, bf16_record):
    """The stream between blocks: fp32 where DDP's is (fp32 parameters under autocast add fp32 residuals)."""
    def stream(c):
        return {k: v[0] for k, v in facts(bf16_record, c)["seen"].items() if k.startswith("block_")}
    assert stream(case) == stream(case.split("/")[0] + "/ddp")


@pytest.mark.parametrize("case", CASES)
def test_bf16_ema_averages_fp32_master_weights(case, bf16_record):
    f = facts(bf16_record, case)
    assert f["master_dtypes"] == ["float32"]
    assert f["ema_param_dtypes"] == ["float32"] and f["ema_buffer_dtypes"] == ["float32"], f
    assert f["ema_gap"] < EMA_RTOL, f["ema_gap"]
    assert f["ema_fixed_moved"] == []  # fixed tensors: the EMA keeps its own fp32 copy
