import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch

from trainer.config.catalog import REPO_ROOT
from trainer.engine.tracking import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """The generated default dataset, small (16 per class at 32 px), shared by the whole session."""
    from data import ensure_default_dataset
    base = str(tmp_path_factory.getbasetemp().parent / "rectok-datasets")
    ensure_default_dataset(base, image_size=32, per_class_train=16, per_class_val=4)
    return base


@pytest.fixture
def micro(tmp_path, dataset_dir):
    """Overrides turning tiny_stage1 into a seconds-long run: 32 px with patch 8, 4x4 tokens, batch 8, 20 steps/epoch.

    Teacher, LPIPS-VGG16 and ConvNeXt-S run their real code with random weights: no weights can be
    downloaded here.
    """
    return micro_overrides(tmp_path, dataset_dir)


def micro_overrides(tmp_path, dataset_dir) -> list[str]:
    """The `micro` fixture's overrides, for fixtures of a wider scope."""
    return [
        f"run.output_dir={tmp_path}", "run.name=micro", "model.image_size=32", "model.patch_size=8",
        "model.latent_channels=8",
        "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16",
        "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32", "logging.progress=false",
        "logging.log_every=1", "eval.num_images=16", "eval.grid_images=4", "checkpoint.every_steps=0",
        "schedule.epochs=1", "schedule.warmup_epochs=0.1",
    ]


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory, dataset_dir):
    """A micro tokenizer checkpoint (2 steps: its weights are what matters here, not its quality)."""
    from trainer.config.recipes import load_config
    from trainer.tasks.training import train
    out = tmp_path_factory.mktemp("tok")
    cfg = load_config("rectok/tiny_stage1", [
        f"run.output_dir={out}", "run.name=tok", "model.image_size=32", "model.patch_size=8",
        "model.latent_channels=8", "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}",
        "data.default_per_class=16", "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32",
        "logging.progress=false", "eval.num_images=8", "eval.grid_images=2", "checkpoint.every_steps=0",
        "run.max_steps=2"])
    return train(cfg)["run_dir"]


def tokenizer_overrides(out, dataset_dir) -> list[str]:
    """The tiny stage 1 of the multi-rank tests (distributed, bf16, multi-node): the discriminator from step 0,
    global batch 8."""
    return [f"run.output_dir={out}", "model.image_size=32", "model.patch_size=8", "model.latent_channels=8",
            "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16",
            "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32", "loss.disc_start_epoch=0",
            "logging.progress=false", "logging.log_every=1", "eval.num_images=8", "eval.grid_images=2",
            "eval.every_epochs=0", "checkpoint.every_steps=0", "schedule.warmup_epochs=0.1"]


def dit_overrides(out, dataset_dir, tokenizer_run) -> list[str]:
    """The tiny DiT^DH of the multi-rank tests, on latents cached under `out`; global batch 16."""
    return [f"run.output_dir={out}", f"dit.tokenizer={tokenizer_run}", f"dit.cache_dir={out / 'cache'}",
            f"dit.stats={out / 'stats.json'}", "model.latent_channels=8", "model.patch_size=8",
            f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16", "data.global_batch=16",
            "logging.progress=false", "logging.log_every=1", "eval.num_images=16", "eval.grid_images=2",
            "eval.every_epochs=0", "sample.steps=2", "checkpoint.every_steps=0"]


MACHINE_DEPENDENT = ("img_per_s", "tflops", "mfu", "time/", "mem/")  # throughput: not compared across runs


def losses(run_dir: str) -> list[dict]:
    """The loss records of a run, without what depends on the machine."""
    return [{k: v for k, v in r.items() if k != "epoch" and not k.startswith(MACHINE_DEPENDENT)}
            for r in read_metrics(run_dir)
            if "total" in r]


def wait_until(check, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll `check()` until it returns something truthy; fail after `timeout_s` (no test waits for ever)."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(poll_s)


def wait_for(job, timeout_s: float = 240):
    """A submitit job's results with a deadline: a job that dies without a result would hang `results()`."""
    wait_until(job.done, timeout_s, f"job {job.job_id} finished")
    return job.results()


def assert_png(path, min_side: int = 50) -> None:
    """`path` is a PNG file of at least min_side pixels a side that decodes completely."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.format, im.size)
        im.load()  # decodes every byte: a truncated file fails here


# The real Slurm cluster of the launch tests (Debian's slurm-wlm and munge, started by scripts/slurm_cluster.sh
# once per session): two nodes, each its own network namespace, where namespaces can be made; one node where
# they cannot (the two-node tests then skip with the reason). Skipped only where Slurm is not installed or
# slurmd cannot run (not root); scripts/setup.sh installs it as root, so CI runs these.
CLUSTER = os.path.join(REPO_ROOT, "scripts", "slurm_cluster.sh")


@dataclass
class Cluster:
    folder: str
    nodes: int
    single_node_reason: str = ""  # why the cluster has one node
    start_s: float = 0.0

    def node(self, action: str, index: int) -> None:
        """node-down (every process of node `index` killed: a lost node) or node-up."""
        subprocess.run(["bash", CLUSTER, action, self.folder, str(index)], check=True, timeout=60)

    def require_nodes(self, n: int) -> None:
        if self.nodes < n:
            pytest.skip(f"needs a {n}-node cluster: {self.single_node_reason}")


def namespaces_possible() -> str:
    """'' when network namespaces can be made here, else why not."""
    name = f"rectok-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"network namespaces cannot be made here (`ip netns add`: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return ""


def queue_empty() -> bool:
    out = subprocess.run(["squeue", "-h", "-t", "pending,running,completing"], capture_output=True, text=True,
                         timeout=30)
    return out.returncode == 0 and not out.stdout.strip()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    daemons = [shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin") for d in ("slurmctld", "slurmd")]
    if shutil.which("sbatch") is None or None in daemons:
        pytest.skip("Slurm is not installed (scripts/setup.sh installs slurm-wlm and munge when run as root)")
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster on this machine needs root (slurmd starts the jobs)")
    folder = tmp_path_factory.mktemp("slurm")
    why_not = "" if shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin") else "no `ip` command"
    why_not = why_not or namespaces_possible()
    nodes = 1 if why_not else 2
    t0 = time.monotonic()
    started = subprocess.run(["bash", CLUSTER, "start", "--nodes", str(nodes), str(folder)], capture_output=True,
                             text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    cluster = Cluster(str(folder), nodes, why_not, time.monotonic() - t0)
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield cluster
    subprocess.run(["scancel", "--user=root"], capture_output=True, timeout=30)
    wait_until(queue_empty, 60, "the cluster's jobs end")  # so their step daemons can report and exit
    subprocess.run(["bash", CLUSTER, "stop", str(folder)], capture_output=True, timeout=60)
    if before is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def job_overrides(micro, monkeypatch):
    """The micro recipe as a Slurm job of one-CPU tasks, one torch thread each (jobs compared with each
    other compute the same numbers)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return [*micro, "run.device=cpu", "data.loader=pil", "slurm.executor=slurm", "slurm.nodes=1",
            "slurm.gpus_per_node=1", "slurm.cpus_per_task=1"]
