"""Parallelism, applied in one place: DDP and FSDP2 (torch_strategy), DeepSpeed ZeRO (deepspeed_strategy),
per-block activation checkpointing and compilation (block_wrapping), the choice among them (strategy),
and whole weights of any checkpoint in one process (consolidate)."""
