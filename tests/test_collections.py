"""Several masks over one base in one folder or Hub repo: the base recorded once, one tensor
file per mask, a card listing them; any subset loads without reading the rest, under the same
checks as a single artifact."""

import json

import pytest
import timm
import torch
from hub_server import HubServer
from test_artifact import run_fresh
from test_hub import client_env

from popup_adapter import AdapterError, ArtifactError, PopupConfig, PopupModel, get_popup_model
from popup_adapter.artifact_schema import COLLECTION_NAME, CONFIG_NAME
from popup_adapter.hub import open_artifact

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _backbone():
    """Three adapters over one test_resnet, each with its own mask, BatchNorm statistics and
    head; "c" is served (bits only)."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    model = get_popup_model(net, k=0.3, adapter_name="a", modules_to_save=["fc"])
    for name, k in (("b", 0.5), ("c", 0.1)):
        model.add_adapter(name, PopupConfig(k=k, modules_to_save=["fc"]))
    for index, name in enumerate("abc"):
        model.set_adapter(name)
        model.train()
        with torch.no_grad():
            for _, layer in model.popup_layers():
                layer.popup_scores[name].normal_()
            model(X * (index + 1))
    model.serve_adapter("c")
    model.set_adapter("a")
    return model.eval()


def _outputs(model, adapters):
    results = {}
    with torch.no_grad():
        for name in adapters:
            model.set_adapter(name)
            results[name] = model(X)
    return results


def test_a_collection_holds_the_base_once_and_a_file_per_mask(tmp_path):
    model = _backbone()
    expected = _outputs(model, "abc")
    folder = model.save_pretrained(
        tmp_path, selected_adapters=["a", "b", "c"], metrics={"b": {"accuracy": 0.5}}
    )
    manifest = json.loads((folder / COLLECTION_NAME).read_text())
    assert list(manifest["adapters"]) == ["a", "b", "c"]
    assert "base" in manifest and "base_fingerprint" in manifest
    assert not any("base" in member for member in manifest["adapters"].values())
    tensors = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(tensors) == 3 and not (folder / CONFIG_NAME).exists()
    card = (folder / "README.md").read_text()
    assert all(f"| {name} |" in card for name in "abc") and "accuracy 0.5" in card

    loaded = PopupModel.from_pretrained(folder)  # every mask, the first active, served
    assert loaded.active_adapter == "a" and loaded.merged
    assert sorted(loaded.peft_config) == ["a", "b", "c"]
    assert loaded.peft_config["b"].k == 0.5
    for name, output in _outputs(loaded, "abc").items():
        assert torch.equal(output, expected[name]), name
    assert all(layer.is_served("b") for _, layer in loaded.popup_layers())

    trainable = PopupModel.from_pretrained(folder, adapters=["b"], is_trainable=True)
    assert list(trainable.peft_config) == ["b"] and not trainable.merged
    assert all(layer.popup_scores["b"].requires_grad for _, layer in trainable.popup_layers())


def test_a_subset_loads_without_the_rest(tmp_path):
    model = _backbone()
    expected = _outputs(model, "abc")
    folder = model.save_pretrained(tmp_path, selected_adapters=["a", "b", "c"])
    manifest = json.loads((folder / COLLECTION_NAME).read_text())
    (a_file,) = manifest["adapters"]["a"]["files"]
    (folder / a_file).unlink()  # never read below
    loaded = PopupModel.from_pretrained(folder, adapters=["c", "b"])
    assert loaded.active_adapter == "c" and list(loaded.peft_config) == ["c", "b"]
    for name, output in _outputs(loaded, "cb").items():
        assert torch.equal(output, expected[name]), name
    with pytest.raises(ArtifactError, match="does not exist"):
        PopupModel.from_pretrained(folder, adapters=["a"])
    # one member onto a backbone of one's own: load_adapter by its stored name
    other = PopupModel.from_pretrained(folder, adapters=["c"])
    other.load_adapter(folder, "b")
    assert torch.equal(_outputs(other, "b")["b"], expected["b"])


def test_collections_refuse_what_would_go_wrong(tmp_path):
    model = _backbone()
    folder = model.save_pretrained(tmp_path / "all", selected_adapters=["a", "b"])
    single = model.save_pretrained(tmp_path / "single")
    with pytest.raises(ArtifactError, match=r"asked for \['z'\], which it lacks"):
        PopupModel.from_pretrained(folder, adapters=["z"])
    with pytest.raises(ArtifactError, match="holds one mask, not a collection"):
        PopupModel.from_pretrained(single, adapters=["a"])
    with pytest.raises(AdapterError, match="keep their stored names"):
        PopupModel.from_pretrained(folder, adapter_name="mine")
    with pytest.raises(ArtifactError, match="lacks"):
        model.load_adapter(folder, "c")  # c is not in this collection
    with pytest.raises(AdapterError, match="no adapter_name"):
        model.save_pretrained(tmp_path / "x", adapter_name="a", selected_adapters=["a"])
    with pytest.raises(AdapterError, match="distinct"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["a", "a"])
    with pytest.raises(AdapterError, match="not selected"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["a"], metrics={"b": {}})
    with pytest.raises(AdapterError, match="unknown adapter 'q'"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["a", "q"])
    with pytest.raises(AdapterError, match="plain backbone"):
        model.add_adapter("__base__", PopupConfig(k=0.3, modules_to_save=["fc"]))
    assert not (tmp_path / "x").exists()  # nothing written by a refused save

    manifest = json.loads((folder / COLLECTION_NAME).read_text())
    bad = {**manifest, "format_version": 99}
    (folder / COLLECTION_NAME).write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="collection format version 99"):
        PopupModel.from_pretrained(folder)
    member = manifest["adapters"]["b"]
    bad = {**manifest, "adapters": {"b": {**member, "base": manifest["base"]}}}
    (folder / COLLECTION_NAME).write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="without the shared fields"):
        PopupModel.from_pretrained(folder)
    bad = {**manifest, "adapters": {"b": {**member, "config": {**member["config"], "k": 7}}}}
    (folder / COLLECTION_NAME).write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"adapter 'b'.*config"):
        PopupModel.from_pretrained(folder)
    (folder / COLLECTION_NAME).write_text(json.dumps(manifest))
    (weights,) = member["files"]
    (folder / weights).write_bytes((folder / weights).read_bytes()[:-3] + b"xyz")
    with pytest.raises(ArtifactError, match="corrupted or truncated"):
        PopupModel.from_pretrained(folder, adapters=["b"])


def test_a_folder_holds_an_artifact_or_a_collection(tmp_path):
    model = _backbone()
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    assert not (tmp_path / CONFIG_NAME).exists()  # the single artifact went with the commit
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    model.save_pretrained(tmp_path, adapter_name="b")
    assert not (tmp_path / COLLECTION_NAME).exists()
    assert PopupModel.from_pretrained(tmp_path).peft_config["default"].k == 0.5
    collection = model.save_pretrained(tmp_path / "collection", selected_adapters=["a"])
    with pytest.raises(ArtifactError, match="is a collection of masks"):
        open_artifact(collection)  # what reads one artifact says what this folder is


PUSH = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_collections import X, _backbone, _outputs
model = _backbone()
for name, output in _outputs(model, "abc").items():
    torch.save(output, f"{root}/{{name}}.pt")
model.push_to_hub("me/tasks", selected_adapters=["a", "b", "c"])
print(model.artifact_files(selected_adapters=["a"]).members["a"].weights_name)
"""

LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_collections import X, _outputs
from popup_adapter import PopupModel
model = PopupModel.from_pretrained("me/tasks", adapters=["b", "c"])
for name, output in _outputs(model, "bc").items():
    print(name, torch.equal(output, torch.load(f"{root}/{{name}}.pt")))
"""


def test_a_collection_on_the_hub_downloads_only_the_masks_asked_for(tmp_path):
    with HubServer() as hub:
        tests = str(__import__("pathlib").Path(__file__).parent)
        env = client_env(hub, tmp_path / "push")
        a_file = run_fresh(PUSH.format(tests=tests, root=tmp_path), env).split()[-1]
        commit = hub.state.repos["me/tasks"].resolve("main")
        assert {COLLECTION_NAME, "README.md", a_file} <= set(commit.files)
        assert commit.title == "Upload popup_adapter collection (3 masks)"
        before = len(hub.state.requests)
        out = run_fresh(LOAD.format(tests=tests, root=tmp_path), client_env(hub, tmp_path / "c"))
        fetched = " ".join(hub.state.requests[before:])
    assert out.split() == ["b", "True", "c", "True"]
    assert COLLECTION_NAME in fetched and a_file not in fetched


def test_the_first_collection_format_still_loads():
    """A collection written by the release that introduced them loads, every adapter to its
    saved outputs: a published collection is a promise (tests/data/collection_v1/README.md)."""
    from pathlib import Path

    from safetensors.torch import load_file

    golden = Path(__file__).parent / "data" / "collection_v1"
    io = load_file(golden / "conv2.io.safetensors")
    loaded = PopupModel.from_pretrained(golden / "conv2")
    assert list(loaded.peft_config) == ["t0", "t1", "t2"]
    with torch.no_grad():
        for name in loaded.peft_config:
            loaded.set_adapter(name)
            torch.testing.assert_close(
                loaded(io["input"]), io[f"output.{name}"], rtol=1e-5, atol=1e-5
            )
