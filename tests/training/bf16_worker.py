"""Started by test_bf16.py under torchrun (2 CPU processes, gloo). Not a test module itself.

usage: bf16_worker.py SPEC_JSON OUT_JSON
SPEC_JSON: {"cases": [[task, strategy], ...], "recipes": {task: recipe}, "overrides": {task: [...]},
"strategies": {strategy: [...]}}. For each case in turn, in this one process: builds the trainer in
parallel.precision=bf16, records what the trained module sees during its first forward (the dtypes of t,
the Fourier weights, the position embedding, the RoPE tables and each block's input), takes two steps
and records their losses, the EMA's dtypes and, after the first step, the largest gap between the EMA
and decay * initial + (1 - decay) * fp32 master weights. Rank 0 writes {"task/strategy": facts} to OUT_JSON.
"""
import json
import os
import sys
import time
import traceback

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from data import rank_batches
from models.blocks import Block
from models.dit import DiTDH
from trainer.config.recipes import load_config
from trainer.engine.distributed import env_from_launcher
from trainer.tasks.training import build_trainer


def whole(t: torch.Tensor) -> torch.Tensor:
    """A whole fp32 copy of a tensor: FSDP2 shards are gathered (a collective)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def fp32_masters(strategy, module: nn.Module) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights of `module`: DeepSpeed's own (gathered), else the parameters."""
    if strategy.cfg.parallel.strategy == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param  # only here: heavy, and DeepSpeed runs only
        return {k: safe_get_full_fp32_param(p).clone() for k, p in module.named_parameters() if p.requires_grad}
    return {k: whole(p) for k, p in module.named_parameters() if p.requires_grad}


def dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else "none"


def watch(model: nn.Module, facts: dict) -> list:
    """Forward pre-hooks recording the dtypes of the first forward (the hooks run after FSDP2's, which
    unshard and cast the parameters: what the computation sees)."""
    handles = []
    seen = facts.setdefault("seen", {})

    def once(key, value):
        seen.setdefault(key, value)

    if isinstance(model, DiTDH):
        def at_time(module, args):
            once("t", dtype(args[0]))
            once("fourier_W", dtype(module.W))
            once("pos_embed", dtype(model.pos_embed))
            once("rope_tables", sorted({dtype(model.enc_feat_rope), dtype(model.dec_feat_rope)}))
        handles.append(model.t_embedder.register_forward_pre_hook(at_time))
    else:
        def at_rope(module, args):
            once("rope_tables", sorted({dtype(m.rope) for m in model.modules() if hasattr(m, "rope")
                                        and isinstance(m.rope, torch.Tensor)}))
        handles.append(model.register_forward_pre_hook(at_rope))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for i, blk in enumerate(blocks):
        def at_block(module, args, kwargs, i=i):
            rope = kwargs.get("rope", args[-1] if len(args) > 1 else None)
            once(f"block_{i:02d}", [dtype(args[0]), dtype(rope)])
        handles.append(blk.register_forward_pre_hook(at_block, with_kwargs=True))
    return handles


def one_case(env, spec: dict, task: str, strategy: str, out_dir: str) -> dict:
    over = [*spec["overrides"][task], f"run.output_dir={out_dir}", f"run.name={task}_{strategy}",
            "parallel.precision=bf16", "run.max_steps=2", *spec["strategies"][strategy]]
    trainer = build_trainer(load_config(spec["recipes"][task], over, env.world), env)
    try:
        s, model = trainer.strategy, trainer.task.model
        facts: dict = {}
        handles = watch(model, facts)
        init = {k: whole(v) for k, v in s.ema_model().state_dict().items()}
        batches = rank_batches(len(trainer.train_set), trainer.per_rank, trainer.cfg.run.seed, 0, env.rank, env.world)
        losses = []
        for step, (batch, labels, ids) in enumerate(trainer.train_set.batches(batches[:2], 0)):
            metrics = trainer.train_step(batch, labels, ids) or trainer.read_metrics()
            losses.append({k: v for k, v in metrics.items() if k != "lr" and not k.startswith("grad_norm")})
            if step == 0:
                for h in handles:
                    h.remove()
                ema = s.ema_model()
                decay = trainer.cfg.ema.decay
                master = fp32_masters(s, model)
                after = {k: whole(v) for k, v in ema.state_dict().items()}
                # Relative to the tensor's scale: bf16-rounded sources would leave about (1 - decay) * 2^-9.
                facts["ema_gap"] = max(
                    ((after[k] - (decay * init[k] + (1 - decay) * m)).abs().max()
                     / torch.maximum(init[k].abs().max(), m.abs().max()).clamp_min(1e-12)).item()
                    for k, m in master.items())
                facts["master_dtypes"] = sorted({dtype(m) for m in master.values()})
                facts["ema_param_dtypes"] = sorted({dtype(p) for p in ema.parameters()})
                facts["ema_buffer_dtypes"] = sorted({dtype(b) for b in ema.buffers()})
                facts["ema_fixed_moved"] = [k for k in init if k not in master and not torch.equal(after[k], init[k])]
        facts["losses"] = losses
        return facts
    finally:
        trainer.close()


def main(spec_path: str, out_path: str) -> None:
    env = env_from_launcher()
    with open(spec_path) as f:
        spec = json.load(f)
    results = {}
    for task, strategy in spec["cases"]:
        t0 = time.perf_counter()
        try:
            results[f"{task}/{strategy}"] = one_case(env, spec, task, strategy,
                                                     os.path.join(os.path.dirname(out_path), "runs"))
        except Exception as e:  # the same on every rank: the other cases still run, the tests show this one
            results[f"{task}/{strategy}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
        if env.main:
            print(f"bf16 case {task}/{strategy}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if env.main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
