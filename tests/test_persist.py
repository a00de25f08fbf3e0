"""sparsefx.save / sparsefx.load: safetensors + JSON, rebuilt by replaying the removal, never unpickled."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import BertModel

import sparsefx
from sparsefx.capture.compare import check_reference, first_tensor
from sparsefx.capture.models import load_model
from sparsefx.channels.persist import PersistError
from sparsefx.cli.main import main
from sparsefx.errors import SparsefxError
from sparsefx.io import DESCRIPTION, WEIGHTS
from tests import persist_models

MODELS_FILE = Path(persist_models.__file__)

# Loads each saved model in a fresh interpreter with every unpickling entry point made to fail.
LOADER = """
import json, pickle, sys
import safetensors.torch, torch
import sparsefx
from sparsefx.capture.compare import first_tensor

def refuse(*args, **kwargs):
    raise AssertionError("pickle used while loading")

class Refused:
    def __init__(self, *args, **kwargs):
        refuse()

pickle.load = pickle.loads = torch.load = refuse
pickle.Unpickler = Refused
for case in json.loads(sys.argv[1]):
    model = sparsefx.load(case["dir"], model=case["model"])
    inputs = safetensors.torch.load_file(case["inputs"])
    with torch.no_grad():
        output = first_tensor(model(*[inputs[str(i)] for i in range(len(inputs))]))
    safetensors.torch.save_file({"output": output.contiguous()}, case["output"])
print("tvm imported" if "tvm" in sys.modules else "tvm not imported")
"""


def _vit_pruned():
    model, inputs = persist_models.vit()
    pruned = sparsefx.prune(model, inputs, 0.5)
    heads = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention.q_proj")
    assert heads.out_features < 64 and heads.out_features % 16 == 0  # whole heads of width 16 went
    return pruned, inputs, f"{MODELS_FILE}:vit"


def _bert_pruned():
    model, inputs = persist_models.bert()
    return sparsefx.prune(model, inputs, 0.5), inputs, f"{MODELS_FILE}:bert"


def _resnet_pruned():
    model, _ = load_model("torchvision:resnet18")
    inputs = (torch.randn(1, 3, 64, 64),)
    return sparsefx.prune(model, inputs, 0.5), inputs, "torchvision:resnet18"


def _block_sparse():
    """Pruned, then the classifier block-sparse (BSR 4x1) and one conv 2:4 (N:M); spec stored in the file."""
    model, _ = load_model("torchvision:resnet18")
    inputs = (torch.randn(1, 3, 64, 64),)
    pruned = sparsefx.prune(model, inputs, 0.3, round_to=8)
    sparse = sparsefx.sparsify(pruned, {"fc": sparsefx.Sparsity(0.25, "block", (4, 1)),
                                        "layer4.0.conv1": sparsefx.Sparsity(0.5, "nm", m=4)})
    return sparse, inputs, None


CASES = {"resnet18": _resnet_pruned, "vit": _vit_pruned, "bert": _bert_pruned, "block_sparse": _block_sparse}


def test_round_trip_in_a_fresh_process_is_bitwise_equal_and_never_unpickles(tmp_path):
    cases, expected = [], {}
    for name, make in CASES.items():
        model, inputs, spec = make()
        expected[name] = check_reference(model, inputs)
        sparsefx.save(model, tmp_path / name, spec="torchvision:resnet18" if spec is None else None)
        safetensors.torch.save_file({str(i): x for i, x in enumerate(inputs)}, tmp_path / f"{name}.in")
        cases.append({"dir": str(tmp_path / name), "model": spec, "inputs": str(tmp_path / f"{name}.in"),
                      "output": str(tmp_path / f"{name}.out")})
    run = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tvm not imported" in run.stdout  # a pruned-model file never needs the compiler
    for name in CASES:
        loaded = safetensors.torch.load_file(tmp_path / f"{name}.out")["output"]
        assert torch.equal(loaded, expected[name]), name


def test_loaded_model_is_the_pruned_architecture_and_prunes_again(tmp_path):
    model, inputs = load_model("default")
    twice = sparsefx.prune(sparsefx.prune(model, inputs, 0.3), inputs, 0.3)
    assert len(twice.sparsefx_removal["steps"]) == 2
    sparsefx.save(twice, tmp_path / "twice", spec="default")
    loaded = sparsefx.load(tmp_path / "twice")  # the stored spec builds the architecture
    assert sparsefx.count_params(loaded) == sparsefx.count_params(twice) < sparsefx.count_params(model)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), check_reference(twice, inputs))
    sparsefx.save(loaded, tmp_path / "twice")  # saving over an earlier save replaces it
    assert sparsefx.count_params(sparsefx.load(tmp_path / "twice", model="default")) == sparsefx.count_params(twice)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = load_model("default")
    path = tmp_path_factory.mktemp("saved") / "pruned"
    sparsefx.save(sparsefx.prune(model, inputs, 0.5), path, spec="default")
    return path


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Every refusal must come before a weight is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the file was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def _edited(saved: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(saved, copy)
    description = json.loads((copy / DESCRIPTION).read_text())
    edit(description)
    (copy / DESCRIPTION).write_text(json.dumps(description))
    return copy


def _refused(path: Path, match: str, model: object = None) -> None:
    with pytest.raises(PersistError, match=match) as error:
        sparsefx.load(path, model=model)
    assert "\n" not in str(error.value)


def _out_of_range(description: dict) -> None:
    entry = description["removal"][0]["kept"][0]
    entry["kept"][-1] = entry["size"] + 3


def _coupled_differently(description: dict) -> None:
    """One layer keeps another (valid) channel than the layers it is coupled to."""
    entry = description["removal"][0]["kept"][1]
    dropped = min(set(range(entry["size"])) - set(entry["kept"]))
    entry["kept"] = sorted([dropped, *entry["kept"][1:]])


def _newer(description: dict) -> None:
    description["format_version"] += 1


def _shape_lie(description: dict) -> None:
    name = next(iter(description["tensors"]))
    description["tensors"][name]["shape"][0] += 1


def _wrong_type(description: dict) -> None:
    next(iter(description["tensors"].values()))["dtype"] = "float99"


@pytest.mark.parametrize(("edit", "match"), [
    (_out_of_range, "not sorted, distinct and within"),
    (_wrong_type, "fields of the wrong type"),
    (_coupled_differently, "cut coupled layers differently"),
    (_newer, "newer than this sparsefx reads"),
    (_shape_lie, "does not hold the weights"),
])
def test_edited_json_is_refused_before_any_weight_is_read(saved, tmp_path, no_weight_reads, edit, match):
    _refused(_edited(saved, tmp_path, edit), match)


def test_another_architecture_is_refused(saved, no_weight_reads):
    _refused(saved, "was saved from a TinyResNet", model=persist_models.vit()[0])


def test_missing_or_mismatched_weights_are_refused(saved, tmp_path, no_weight_reads):
    missing = _edited(saved, tmp_path, lambda d: None)
    (missing / WEIGHTS).unlink()
    _refused(missing, f"has no {WEIGHTS}")
    model, inputs = load_model("default")
    other = tmp_path / "other"
    sparsefx.save(sparsefx.prune(model, inputs, 0.25), other)
    shutil.copy(other / WEIGHTS, missing / WEIGHTS)  # weights of another pruning
    _refused(missing, "does not hold the weights")


@pytest.mark.parametrize(("spec", "match"), [
    ("torchvision:resnet81", "cannot be built: unknown torchvision model"),
    ("nowhere.py:build", "cannot be built: model file"),
])
def test_a_spec_that_cannot_be_built_is_refused(saved, no_weight_reads, spec, match):
    _refused(saved, match, model=spec)


def test_a_stored_file_spec_is_not_run_unasked(saved, tmp_path, no_weight_reads):
    edited = _edited(saved, tmp_path, lambda d: d["model"].update(spec=f"{MODELS_FILE}:vit"))
    _refused(edited, "which runs code")


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, inputs = load_model("default")
    pruned = sparsefx.prune(model, inputs, 0.5)
    (tmp_path / "taken").write_text("not a model")
    with pytest.raises(PersistError, match="is not a sparsefx save"):
        sparsefx.save(pruned, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a model"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        sparsefx.save(pruned, tmp_path / "pruned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_masked_training_must_end_before_saving(tmp_path):
    model, inputs = load_model("default")
    sparsefx.apply_masks(model, sparsefx.compute_masks(model, {"fc": sparsefx.Sparsity(0.5)}))
    with pytest.raises(PersistError, match="to_sparse"):
        sparsefx.save(model, tmp_path / "masked")
    assert not (tmp_path / "masked").exists()


def test_a_dense_model_saves_and_loads(tmp_path):
    model, inputs = persist_models.vit()
    with pytest.warns(UserWarning, match="nothing to prune"):
        unchanged = sparsefx.prune(model, inputs, {"heads": 0.0})  # a copy with its attention split
    for dense in (model, unchanged):
        sparsefx.save(dense, tmp_path / "dense")
        loaded = sparsefx.load(tmp_path / "dense", model=persist_models.vit()[0])
        with torch.no_grad():
            assert torch.equal(first_tensor(loaded(*inputs)), check_reference(dense, inputs))


def test_a_model_made_sparse_without_pruning_saves_and_loads_on_its_dense_architecture(tmp_path):
    model, inputs = load_model("default")
    plan = {"stages.1.0.conv2": sparsefx.Sparsity(0.5, "block", (4, 1)), "fc": sparsefx.Sparsity(0.5, "nm", m=4)}
    sparsefx.apply_masks(model, sparsefx.compute_masks(model, plan))
    sparse = sparsefx.to_sparse(model)  # masked training ended: BSR conv, 2:4 linear, no removal record
    sparsefx.save(sparse, tmp_path / "sparse", spec="default")
    loaded = sparsefx.load(tmp_path / "sparse")  # a fresh dense TinyResNet, the sparse layers swapped in
    assert [(n, m.format) for n, m in loaded.named_modules() if isinstance(m, sparsefx.SparseLinear | sparsefx.SparseConv2d)] \
        == [("stages.1.0.conv2", "bsr"), ("fc", "nm")]
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), check_reference(sparse, inputs))


class Versioned(torch.nn.Module):
    """A module whose loading reads the state_dict's per-module version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:  # noqa: ANN001
        if local_metadata.get("version") != 2:
            raise ValueError("version should be set to 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_modules_that_read_their_state_dict_version_load(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 8, 8),)
    pruned = sparsefx.prune(Versioned().eval(), inputs, ratio=0.5)
    sparsefx.save(pruned, tmp_path / "v")
    loaded = sparsefx.load(tmp_path / "v", model=Versioned().eval())
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), check_reference(pruned, inputs))


def test_bert_with_evenly_pruned_mlps_keeps_save_pretrained(tmp_path):
    model, inputs = persist_models.bert()
    pruned = sparsefx.prune(model, inputs, {"encoder.layer.0.intermediate": 0.5, "encoder.layer.1.intermediate": 0.5})
    assert pruned.config.intermediate_size == 64 and model.config.intermediate_size == 128  # the input keeps its own
    pruned.save_pretrained(tmp_path / "hf")
    loaded = BertModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).last_hidden_state, check_reference(pruned, inputs))


def test_a_file_goes_to_the_compiled_artifact_loader_and_nothing_is_refused_plainly(tmp_path):
    (tmp_path / "model.sfx").write_bytes(b"not a tar")
    with pytest.raises(SparsefxError, match="is not a sparsefx compiled model"):
        sparsefx.load(tmp_path / "model.sfx")
    with pytest.raises(PersistError, match="nothing at"):
        sparsefx.load(tmp_path / "missing")


def test_half_precision_comes_back_in_half_precision(tmp_path):
    model, inputs = load_model("default")
    pruned = sparsefx.prune(model, inputs, 0.5).half()
    sparsefx.save(pruned, tmp_path / "half", spec="default")
    loaded = sparsefx.load(tmp_path / "half")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    half_inputs = tuple(x.half() for x in inputs)
    with torch.no_grad():
        assert torch.equal(loaded(*half_inputs), pruned(*half_inputs))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_cli_finetunes_a_saved_model_into_a_saved_model(tmp_path, capsys):
    spec = f"{MODELS_FILE}:lenet"
    assert main(["prune", spec, "--repeat", "2", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["finetune", str(tmp_path / "pruned"), "--epochs", "1", "--train-limit", "256",
                 "--out", str(tmp_path / "tuned")]) == 2  # the stored spec is a file: it runs only when named
    assert "which runs code" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "pruned"), "--arch", spec, "--epochs", "1", "--train-limit", "256",
                 "--out", str(tmp_path / "tuned")]) == 0
    pruned, tuned = (sparsefx.load(tmp_path / name, model=spec) for name in ("pruned", "tuned"))
    assert sparsefx.count_params(tuned) == sparsefx.count_params(pruned) < sparsefx.count_params(persist_models.lenet()[0])
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, pruned.state_dict()[n])]
    assert changed  # the fine-tuned weights were saved


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_cli_finetunes_a_pickled_model_into_a_saved_model_and_pickles_only_when_asked(tmp_path, capsys, monkeypatch):
    from sparsefx.cli import main as cli
    from sparsefx.recovery.data import fashion_mnist

    monkeypatch.setattr(cli, "fashion_mnist", lambda train_limit: fashion_mnist(train_limit=train_limit, test_limit=100))
    spec = f"{MODELS_FILE}:lenet"
    model, inputs = persist_models.lenet()
    torch.save(sparsefx.prune(model, inputs, 0.5), tmp_path / "pruned.pt")  # the removal record rides along
    assert main(["finetune", str(tmp_path / "pruned.pt"), "--arch", spec, "--epochs", "1", "--train-limit", "64",
                 "--out", str(tmp_path / "tuned")]) == 0
    assert "no pickle involved" in capsys.readouterr().out
    tuned = sparsefx.load(tmp_path / "tuned", model=spec)
    assert sparsefx.count_params(tuned) < sparsefx.count_params(model)
    assert main(["finetune", str(tmp_path / "pruned.pt"), "--epochs", "1", "--train-limit", "64",
                 "--out", str(tmp_path / "tuned.pt")]) == 0
    assert "a pickle" in capsys.readouterr().err  # never pickled without saying so
    assert sparsefx.count_params(torch.load(tmp_path / "tuned.pt", weights_only=False)) == sparsefx.count_params(tuned)
