"""The training engine: the loop and what it is made of (checkpoints, process group, optimizer and
schedule, EMA, kernels, precision, throughput, tracking, preemption, pre-flight checks), written
against the protocols of protocols.py."""
