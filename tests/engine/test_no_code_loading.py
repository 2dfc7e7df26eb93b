"""No file a user hands over or finds in a run directory runs code when it is read (issue 22).

Each hostile file holds a pickle that, once unpickled, creates a marker file (any code could run in its
place): Inception and teacher weights, a DCP checkpoint's .metadata and its entries (non-tensor and tensor),
DeepSpeed's model and optimizer files and our EMA files. Each must fail with UnreadableWeightsError naming
the file and the refused global, and the marker must not exist. Real files of each kind still load.
"""
import dataclasses
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from models.teachers import Teacher
from models.weights import (
    UnreadableWeightsError,
    read_checkpoint,
    restricted_unpickle,
    weights_only_loading,
)
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import DistEnv
from trainer.engine.protocols import TrainedModule
from trainer.evaluation.fidelity import Inception
from trainer.parallel.deepspeed_strategy import load_deepspeed_weights
from trainer.parallel.torch_strategy import DCP_METADATA_GLOBALS, TorchStrategy, load_dcp_weights, save_dcp_weights

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
REFUSED = "stores Python objects besides tensors"


class Payload:
    """Unpickled, it runs code: here it creates `marker`, so a test can tell whether it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does run when nothing stops it
    assert (tmp_path / "control").exists()
    yield path
    assert not path.exists(), "the hostile pickle ran"


# -- the primitives -----------------------------------------------------------------------------------

@pytest.mark.quick
def test_weights_only_loading_forces_weights_only_and_names_the_file(tmp_path, marker):
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(UnreadableWeightsError, match=rf"some library: {path} {REFUSED} \(exec\)"):
        with weights_only_loading("some library"):
            torch.load(path, weights_only=False)  # what DeepSpeed, DCP and torch-fidelity pass
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # restored on the way out
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "g": torch.Generator()}, good)
    with weights_only_loading("x", [torch.Generator]):
        with weights_only_loading("x", [torch.Generator]):
            pass
        assert torch.equal(torch.load(good, weights_only=False)["w"], torch.ones(2))  # the inner one left it allowed
    assert torch.Generator not in torch.serialization.get_safe_globals()
    # import-official's explicit opt-in still reads a file with other objects (here a harmless one).
    assert isinstance(read_checkpoint(str(good), "x", trust_pickle=True)["g"], torch.Generator)
    with pytest.raises(UnreadableWeightsError, match="Generator.*only `rectok import-official --trust-pickle`"):
        read_checkpoint(str(good), "x")


@pytest.mark.quick
def test_restricted_unpickle_calls_nothing_outside_its_list(tmp_path, marker):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"size": torch.Size([2, 3]), "x": [Payload(marker)]}))
    with open(path, "rb") as f, pytest.raises(UnreadableWeightsError, match=rf"{path} {REFUSED} \(builtins.exec\)"):
        restricted_unpickle(f, {"torch.Size"}, "test", str(path))
    path.write_bytes(pickle.dumps({"size": torch.Size([2, 3]), "n": (1, 2.0, "a", None)}))
    with open(path, "rb") as f:
        assert restricted_unpickle(f, {"torch.Size"}, "test", str(path)) == {"size": (2, 3), "n": (1, 2.0, "a", None)}


# -- Inception weights ----------------------------------------------------------------------------------

@pytest.mark.quick
def test_inception_weights_with_code_are_refused(tmp_path, marker):
    sd = Inception("random").net.state_dict()
    path = tmp_path / "inception.pt"
    torch.save({**sd, "fc.hostile": Payload(marker)}, path)
    with pytest.raises(UnreadableWeightsError, match=rf"eval.inception_weights.*{path} {REFUSED} \(exec\)"):
        Inception(str(path))
    torch.save(sd, path)  # the real layout still loads, through our reader
    assert torch.equal(Inception(str(path)).net.state_dict()["fc.weight"], sd["fc.weight"])


@pytest.mark.quick
def test_teacher_weights_with_code_are_refused(tmp_path, marker):
    """The teacher, LPIPS-VGG16 and ConvNeXt-S weights share load_state_dict_file: one of them stands for all."""
    path = tmp_path / "dinov3.pth"
    torch.save({"model": {**Teacher("dinov3-micro", "random").net.state_dict(), "x": Payload(marker)}}, path)
    with pytest.raises(UnreadableWeightsError, match=rf"teacher dinov3-micro: {path} {REFUSED} \(exec\)"):
        Teacher("dinov3-micro", str(path))


# -- DCP checkpoints (DDP / FSDP2) ----------------------------------------------------------------------

def torch_strategy(seed: int) -> tuple[TorchStrategy, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model.register_buffer("counts", torch.arange(3, dtype=torch.int64))
    s = TorchStrategy(TrainConfig(), DistEnv(), torch.device("cpu"), "foreach")
    s.setup([TrainedModule("generator", model)], model, 1e-2)
    return s, model


def trained_checkpoint(directory) -> tuple[TorchStrategy, nn.Module]:
    """A world-of-one DDP checkpoint after one step: model, EMA and AdamW state (moments, step, groups)."""
    s, model = torch_strategy(0)
    model(torch.randn(2, 4)).square().sum().backward()
    s.step(s.trained[0], clip=1.0)
    s.update_ema(model)
    s.save(str(directory))
    return s, model


@pytest.mark.quick
def test_dcp_checkpoint_round_trips_model_optimizer_and_ema(tmp_path):
    s, model = trained_checkpoint(tmp_path)
    fresh, fresh_model = torch_strategy(1)
    fresh.load(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[k], v), k
    for k, v in s.ema_model().state_dict().items():
        assert torch.equal(fresh.ema_model().state_dict()[k], v), k
    want, got = s.optimizers["generator"].state_dict(), fresh.optimizers["generator"].state_dict()
    assert got["param_groups"] == want["param_groups"]  # the non-tensor entries, read weights-only
    for i, st in want["state"].items():
        assert all(torch.equal(got["state"][i][k], v) for k, v in st.items())
    whole = load_dcp_weights(str(tmp_path), {"modules", "ema"})
    assert torch.equal(whole["modules"]["generator"]["0.weight"], model[0].weight)


@pytest.mark.quick
def test_dcp_metadata_with_code_is_refused(tmp_path, marker):
    trained_checkpoint(tmp_path)
    path = tmp_path / "state" / ".metadata"
    with open(path, "rb") as f:
        metadata = restricted_unpickle(f, DCP_METADATA_GLOBALS, "test", str(path))
    metadata.storage_meta.checkpoint_id = Payload(marker)  # real metadata, one field hostile
    path.write_bytes(pickle.dumps(metadata))
    message = rf"DCP checkpoint: {path} {REFUSED} \(builtins.exec\)"
    with pytest.raises(UnreadableWeightsError, match=message):
        torch_strategy(1)[0].load(str(tmp_path))  # resuming
    with pytest.raises(UnreadableWeightsError, match=message):
        load_dcp_weights(str(tmp_path), {"modules", "ema"})  # sampling, export, evaluation
    path.write_bytes(pickle.dumps(Payload(marker)))  # the whole file hostile
    with pytest.raises(UnreadableWeightsError, match=message):
        load_dcp_weights(str(tmp_path), {"ema"})


@pytest.mark.quick
def test_dcp_entries_with_code_are_refused(tmp_path, marker):
    """DCP stores values that are not tensors (optimizer hyper-parameters) as torch.save'd entries and
    reads them with weights_only=False: a checkpoint written with a hostile entry must not run it."""
    s, _ = trained_checkpoint(tmp_path)
    state = s._state()
    state["optimizers"]["generator"]["param_groups"][0]["lr"] = Payload(marker)
    state["ema"]["hostile"] = Payload(marker)
    hostile = tmp_path / "hostile"
    save_dcp_weights(str(hostile), state)  # DCP's own writer, as for any checkpoint
    distcp = hostile / "state" / "__0_0.distcp"
    with pytest.raises(UnreadableWeightsError, match=rf"DCP checkpoint: {distcp} \(entry optimizers.generator."
                                                     rf"param_groups.0.lr\) {REFUSED} \(exec\)"):
        torch_strategy(1)[0].load(str(hostile))
    with pytest.raises(UnreadableWeightsError, match=rf"{distcp} \(entry ema.hostile\) {REFUSED}"):
        load_dcp_weights(str(hostile), {"modules", "ema"})


@pytest.mark.quick
def test_dcp_tensor_entry_with_code_is_refused(tmp_path, marker):
    """A tensor entry replaced by a hostile pickle (appended to the .distcp file, the metadata pointing at it)."""
    trained_checkpoint(tmp_path)
    state = tmp_path / "state"
    with open(state / ".metadata", "rb") as f:
        metadata = restricted_unpickle(f, DCP_METADATA_GLOBALS, "test", "")
    index = next(i for i in metadata.storage_data if i.fqn == "ema.0.weight")
    stored = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    with open(state / stored.relative_path, "ab") as f:
        offset = f.tell()
        f.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(stored, offset=offset, length=len(blob.getvalue()))
    (state / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnreadableWeightsError, match=rf"DCP checkpoint: {state} {REFUSED} \(exec\)"):
        torch_strategy(1)[0].load(str(tmp_path))
    with pytest.raises(UnreadableWeightsError, match=rf"DCP checkpoint: {state} {REFUSED} \(exec\)"):
        load_dcp_weights(str(tmp_path), {"ema"})


# -- DeepSpeed checkpoints ------------------------------------------------------------------------------

def test_deepspeed_checkpoint_round_trips_and_refuses_code(tmp_path, marker):
    """ZeRO-2 in fp32 writes all three objects DeepSpeed's files hold besides tensors (LossScaler,
    ZeroStageEnum, fragment_address): the round trip shows the allow-list suffices, the hostile files that
    nothing else is allowed, on the resume path (DeepSpeed's engine, our EMA file) and the consolidating
    one (zero_to_fp32)."""
    ckpt, hostile = tmp_path / "ckpt", tmp_path / "hostile.pt"
    torch.save({"module": Payload(marker)}, hostile)
    model_states = "deepspeed/generator/mp_rank_00_model_states.pt"
    optim_states = "deepspeed/generator/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    files = (model_states, optim_states, "ema/full.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # the tree under test, whatever the installed package points at
           "PYTHONPATH": os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "deepspeed_worker.py"), str(ckpt), "2", str(hostile),
                           *files], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ROUND TRIP OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rel in files:
        what = "EMA of a checkpoint" if rel.startswith("ema") else "DeepSpeed checkpoint"
        assert f"REFUSED {rel}: {what}: {ckpt / rel} {REFUSED} (exec)" in proc.stdout, proc.stdout

    expected = torch.load(ckpt / "expected.pt", weights_only=True)
    whole = load_deepspeed_weights(str(ckpt))
    for k, v in expected["generator"].items():
        assert torch.equal(whole["modules"]["generator"][k], v), k
    for k, v in expected["ema"].items():
        assert torch.equal(whole["ema"][k], v), k
    for rel in files:
        original = (ckpt / rel).read_bytes()
        (ckpt / rel).write_bytes(hostile.read_bytes())
        with pytest.raises(UnreadableWeightsError, match=rf"{ckpt / rel} {REFUSED} \(exec\)"):
            load_deepspeed_weights(str(ckpt))
        (ckpt / rel).write_bytes(original)
