"""Artifacts as a careful user and an attacker meet them: saves that are torn by an exception, a
SIGKILL at each step or a concurrent writer; hostile configs (a ReDoS regex, a memory bomb,
every malformed field); and what the command line prints for them."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.numpy import load_file, save

import popup_adapter.storage as storage
from popup_adapter import (
    AdapterError,
    ArtifactError,
    BaseMismatchError,
    PopupError,
    PopupModel,
    get_popup_model,
)
from popup_adapter.artifact import read_artifact
from popup_adapter.artifact_schema import CONFIG_NAME, is_artifact_file, weights_name
from popup_adapter.convnets import create_conv_net

X_CONV = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
X_RESNET = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def conv_model(k: float) -> PopupModel:
    return get_popup_model(create_conv_net("conv2", width=0.25), k=k).eval()


def resnet_model() -> PopupModel:
    model = get_popup_model(timm.create_model("test_resnet", pretrained=False, num_classes=10))
    model.train()
    model(X_RESNET)  # BatchNorm statistics move away from their initial values
    return model.eval()


def output(folder: Path, x: torch.Tensor = X_CONV) -> torch.Tensor:
    with torch.no_grad():
        return PopupModel.from_pretrained(folder)(x)


def artifact_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def forge(folder: Path, meta_edit=None, tensors_edit=None) -> None:
    """Rewrite an artifact as an attacker would: edited, yet self-consistent (the tensor file's
    name, size and sha256 recorded anew), so that only the checks under test can refuse it."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    (name,) = meta["files"]
    tensors = load_file(folder / name)
    if tensors_edit is not None:
        tensors_edit(tensors)
    blob = save(tensors, metadata={"format": f"popup_adapter/{meta['format_version']}"})
    record_tensor_file(folder, meta, name, blob)
    if meta_edit is not None:
        meta_edit(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def record_tensor_file(folder: Path, meta: dict, old_name: str, blob: bytes) -> None:
    """Replace the tensor file ``old_name`` by ``blob``, named as the artifact's format names it,
    and record its size and hash in ``meta`` (the caller writes the config)."""
    sha = hashlib.sha256(blob).hexdigest()
    (folder / old_name).unlink()
    name = weights_name(meta["format_version"], sha)
    (folder / name).write_bytes(blob)
    meta["files"] = {name: {"sha256": sha, "size": len(blob)}}


@pytest.fixture(scope="module")
def two_conv_artifacts(tmp_path_factory):
    """Two different masks over one base, as encoded files, with the outputs each gives."""
    root = tmp_path_factory.mktemp("two")
    files, outputs = {}, {}
    for name, k in (("a", 0.3), ("b", 0.6)):
        model = conv_model(k)
        files[name] = model.artifact_files()
        with torch.no_grad():
            outputs[name] = model(X_CONV)
        files[name].write(root / name)
    return root, files, outputs


def loads_to_one_of(folder: Path, outputs: dict) -> str:
    out = output(folder)
    matches = [name for name, expected in outputs.items() if torch.equal(out, expected)]
    assert len(matches) == 1, "the folder loads to neither artifact"
    return matches[0]


# -- all-or-nothing saves
def test_a_save_that_raises_leaves_the_previous_artifact_whole(two_conv_artifacts, tmp_path):
    _, files, outputs = two_conv_artifacts
    files["a"].write(tmp_path)
    before = artifact_names(tmp_path)
    model = conv_model(0.6)
    with pytest.raises(ArtifactError, match=r"metrics\['acc'\] is list"):
        model.save_pretrained(tmp_path, metrics={"acc": [0.9]})
    assert artifact_names(tmp_path) == before and loads_to_one_of(tmp_path, outputs) == "a"


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_a_disk_error_at_any_write_leaves_the_previous_artifact(
    two_conv_artifacts, tmp_path, monkeypatch, failing_call
):
    _, files, outputs = two_conv_artifacts
    files["a"].write(tmp_path)
    calls, real = [], storage.atomic_write

    def failing(path, data):
        calls.append(path)
        if len(calls) == failing_call:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(storage, "atomic_write", failing)
    with pytest.raises(OSError, match="disk full"):
        files["b"].write(tmp_path)
    # before the config's rename (call 2) the old artifact stands; after it, the new one
    expected = "a" if failing_call <= 2 else "b"
    assert loads_to_one_of(tmp_path, outputs) == expected
    monkeypatch.setattr(storage, "atomic_write", real)
    files["b"].write(tmp_path)
    assert len(artifact_names(tmp_path)) == 3 and loads_to_one_of(tmp_path, outputs) == "b"


def test_numpy_and_tensor_metrics_save_and_nan_is_strict_json(tmp_path):
    model = conv_model(0.3)
    metrics = {"acc": np.float32(0.5), "n": np.int64(3), "t": torch.tensor(0.25), "loss": np.nan}
    model.save_pretrained(tmp_path, metrics=metrics)
    strict = json.loads(
        (tmp_path / CONFIG_NAME).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")
    )
    assert strict["metrics"] == {"acc": 0.5, "n": 3, "t": 0.25, "loss": "NaN"}
    assert "| loss | NaN |" in (tmp_path / "README.md").read_text()


def _save_killed_at(files, folder: Path, kill_before: int) -> int:
    """Fork a process that writes ``files`` into ``folder`` and SIGKILLs itself right before
    its ``kill_before``-th file-system call (os.open, os.fsync, os.replace, os.unlink,
    os.close); returns the number of such calls a whole save makes (when not killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain Python I/O, nothing threaded
        os.close(read)
        count = [0]
        for name in ("open", "fsync", "replace", "unlink", "close"):
            real = getattr(os, name)

            def counted(*args, _real=real, **kwargs):
                count[0] += 1
                if count[0] == kill_before:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(*args, **kwargs)

            setattr(os, name, counted)
        files.write(folder)
        total = count[0]
        os.write(write, str(total).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    reported = os.read(read, 64).decode()
    os.close(read)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    return int(reported)


def test_a_sigkill_at_each_step_of_a_save_leaves_one_whole_artifact(two_conv_artifacts, tmp_path):
    _, files, outputs = two_conv_artifacts
    files["a"].write(tmp_path / "count")
    total = _save_killed_at(files["b"], tmp_path / "count", kill_before=0)
    assert total > 5
    seen = set()
    for step in range(1, total + 1):
        folder = tmp_path / f"kill{step}"
        files["a"].write(folder)
        assert _save_killed_at(files["b"], folder, kill_before=step) == -1
        seen.add(loads_to_one_of(folder, outputs))  # never a mix, never unloadable
        files["b"].write(folder)  # the next save cleans what the killed one left
        assert artifact_names(folder) == artifact_names(tmp_path / "count")
    assert seen == {"a", "b"}  # killed both before and after the commit


def test_concurrent_saves_to_one_folder_never_mix(two_conv_artifacts, tmp_path):
    _, files, outputs = two_conv_artifacts
    folders = [tmp_path / f"f{i}" for i in range(10)]
    start = time.time() + 0.5
    children = []
    for name in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            while time.time() < start:
                pass
            for _ in range(3):
                for folder in folders:
                    files[name].write(folder)
            os._exit(0)
        children.append(pid)
    shas = {name: next(iter(f.meta["files"].values()))["sha256"] for name, f in files.items()}
    reads, alive = 0, set(children)
    while alive:
        for folder in folders:
            if (folder / CONFIG_NAME).exists():  # a reader during the saves sees whole artifacts
                artifact = read_artifact(folder)
                assert next(iter(artifact.meta["files"].values()))["sha256"] in shas.values()
                reads += 1
        alive = {pid for pid in alive if os.waitpid(pid, os.WNOHANG) == (0, 0)}
    assert reads > 0
    for folder in folders:
        loads_to_one_of(folder, outputs)
        assert len(artifact_names(folder)) == 3 and all(map(is_artifact_file, os.listdir(folder)))


def test_saving_a_merged_or_unloaded_model_is_refused(tmp_path):
    for undo in ("merge_and_unload", "unload"):
        model = conv_model(0.3)
        getattr(model, undo)()
        with pytest.raises(AdapterError, match=r"merge_and_unload\(\) or unload\(\)"):
            model.save_pretrained(tmp_path / undo)
        assert not (tmp_path / undo).exists()


# -- hostile artifacts: bounded
REDOS = r"([\w.]+)+Z"  # exponential backtracking on any long name without a Z


def test_a_redos_regex_in_an_artifact_never_runs(tmp_path):
    """main matched an artifact's target_modules against every module name in load_adapter:
    this pattern takes minutes on BERT's names. Loading must take well under a second."""
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_bert
from popup_adapter import PopupModel, get_popup_model
model = get_popup_model(tiny_bert(), k=0.3)
model.save_pretrained({str(tmp_path / "evil")!r})
import json, pathlib
path = pathlib.Path({str(tmp_path / "evil")!r}) / "popup_config.json"
meta = json.loads(path.read_text())
meta["config"]["target_modules"] = {REDOS!r}
path.write_text(json.dumps(meta))
start = time.perf_counter()
loaded = PopupModel.from_pretrained(path.parent)
loaded.load_adapter(path.parent, "second")
print(f"seconds {{time.perf_counter() - start:.3f}}")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split("seconds")[-1]) < 1.0


MEMORY_BOMB = f"""
import json, pathlib, resource, sys, timm
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_artifact_safety import forge
from popup_adapter import PopupError, PopupModel, get_popup_model
folder = pathlib.Path(sys.argv[1])
get_popup_model(timm.create_model("test_resnet", pretrained=False, num_classes=10), k=0.3) \\
    .save_pretrained(folder)
def bomb(meta):
    meta["base"]["kwargs"]["num_classes"] = int(sys.argv[2])
    if sys.argv[3] == "consistent":  # the layer list agrees: only the memory check can refuse
        meta["config"]["k"] = 1.0
        for layer in meta["layers"].values():
            layer.update(kept=__import__("math").prod(layer["shape"]), encoding="all")
        meta["layers"]["fc"]["shape"][0] = int(sys.argv[2])
        meta["layers"]["fc"]["kept"] = int(sys.argv[2]) * meta["layers"]["fc"]["shape"][1]
def empty_masks(tensors):
    for key in [k for k in tensors if k.startswith("mask.")]:
        tensors[key] = tensors[key][:0]
forge(folder, bomb, empty_masks if sys.argv[3] == "consistent" else None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    PopupModel.from_pretrained(folder, check_structure=sys.argv[3] != "consistent")
    print("loaded")
except PopupError as error:
    print(type(error).__name__, str(error)[:200].replace(chr(10), " "))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(f"grew_mib {{grown / 1024:.0f}}")
"""


@pytest.mark.parametrize(
    "classes, kind, error",
    [
        (3_000_000, "spec only", "BaseMismatchError"),  # main: over 1 GiB before refusing
        (10**9, "consistent", "ArtifactError .*needs about .* GiB to load, more than"),
    ],
)
def test_a_memory_bomb_is_refused_before_allocating(tmp_path, classes, kind, error):
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_BOMB, str(tmp_path / "bomb"), str(classes), kind],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import re

    assert re.search(error, done.stdout), done.stdout
    assert int(done.stdout.split("grew_mib")[-1]) < 100


# -- every malformed field is a named error
def _layer(meta):
    return next(iter(meta["layers"].values()))


MALFORMED = {
    "missing base": (lambda m: m.pop("base"), None, r"field 'base' is missing"),
    "no layers": (lambda m: m.update(layers={}), None, r"'layers' is empty.*merge_and_unload"),
    "kept > numel": (lambda m: _layer(m).update(kept=10**9), None, r"keeps 1000000000 of"),
    "k against counts": (lambda m: m["config"].update(k=0.9), None, r"but k=0.9 keeps"),
    "invalid regex": (
        lambda m: m["config"].update(target_modules="("),
        None,
        r"'config'.*not a valid regex",
    ),
    "seed too large": (lambda m: m["config"].update(seed=2**70), None, r"seed must be an int in"),
    "shape of strings": (lambda m: _layer(m).update(shape=["x"]), None, r"'layers\..*\.shape'"),
    "unknown encoding": (lambda m: _layer(m).update(encoding="zip"), None, r"encoding 'zip'"),
    "unknown library": (lambda m: m["base"].update(library="evil"), None, r"'base.library'"),
    "hf-hub name": (
        lambda m: m["base"].update(library="timm", architecture="hf-hub:evil/model", kwargs={}),
        None,
        r"not a timm model name",
    ),
    "timm loading argument": (
        lambda m: m["base"].update(
            library="timm", architecture="resnet18", kwargs={"checkpoint_path": "/x.pth"}
        ),
        None,
        r"\['checkpoint_path'\].*loads files",
    ),
    "unknown transformers class": (
        lambda m: m["base"].update(library="transformers", **{"class": "Evil"}, config={}),
        None,
        r"has no model class 'Evil'",
    ),
    "own class other than ConvNet": (
        lambda m: m["base"].update(**{"class": "Popen"}),
        None,
        r"'base.class'",
    ),
    "path as tensor file": (
        lambda m: m.update(files={"../x.safetensors": {"sha256": "0" * 64, "size": 1}}),
        None,
        r"field 'files' names '../x.safetensors'",
    ),
    "version as string": (lambda m: m.update(format_version="3"), None, r"format version '3'"),
    "float mask": (
        None,
        lambda t: t.update({k: v.astype(np.float32) for k, v in t.items() if "mask" in k}),
        r"is float32 of shape",
    ),
    "extra tensor": (None, lambda t: t.update(evil=np.zeros(3)), r"unexpected \['evil'\]"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_field_is_a_named_error(tmp_path, case):
    meta_edit, tensors_edit, message = MALFORMED[case]
    conv_model(0.3).save_pretrained(tmp_path)
    forge(tmp_path, meta_edit, tensors_edit)
    with pytest.raises(ArtifactError, match=message):
        PopupModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[" * 5000 + "]" * 5000, r"nests deeper than 32|corrupted or truncated"),
        ('{"format_version": 3, "config": {"seed": ' + "9" * 5000 + "}}", "corrupted"),
        ("\xff\xfe", "corrupted or truncated"),
        ('["a list"]', "format version None"),
    ],
    ids=["deep nesting", "5000-digit seed", "not UTF-8", "not an object"],
)
def test_unparseable_configs_are_named_errors(tmp_path, raw, message):
    conv_model(0.3).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(raw.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message):
        PopupModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "stat, value, message",
    [
        ("running_var", -1.0, "negative BatchNorm variance"),
        ("running_mean", float("nan"), "NaN or infinite BatchNorm statistics"),
        ("running_var", "float64", "is torch.float64, which does not hold"),
    ],
)
def test_stored_batchnorm_statistics_are_validated(tmp_path, stat, value, message):
    resnet_model().save_pretrained(tmp_path)
    key = next(k for k in load_file(read_artifact(tmp_path).weights_path) if k.endswith(stat))

    def edit(tensors):
        if value == "float64":  # 0.1 is not a float32: the cast would change it silently
            tensors[key] = np.full(tensors[key].shape, 0.1, dtype=np.float64)
        else:
            tensors[key] = tensors[key].copy()
            tensors[key][0] = value

    forge(tmp_path, None, edit)
    with pytest.raises(ArtifactError, match=message):
        PopupModel.from_pretrained(tmp_path)


def test_a_folder_with_a_revision_is_a_named_error(tmp_path):
    conv_model(0.3).save_pretrained(tmp_path)
    with pytest.raises(ArtifactError, match=r"revision='v1' applies to Hub repos"):
        PopupModel.from_pretrained(tmp_path, revision="v1")


def test_the_command_line_prints_one_error_line_never_a_traceback(tmp_path):
    conv_model(0.3).save_pretrained(tmp_path / "bad")
    forge(tmp_path / "bad", MALFORMED["missing base"][0])
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / CONFIG_NAME).write_text("[" * 100_000)
    for folder, extra in ((tmp_path / "bad", []), (tmp_path / "deep", []), (tmp_path, ["--debug"])):
        done = subprocess.run(
            [sys.executable, "-m", "popup_adapter", *extra, "inspect", str(folder)],
            capture_output=True,
            text=True,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and lines[-1].startswith("error: ")
        assert ("Traceback" in done.stderr) == bool(extra), done.stderr
        assert len(lines) == 1 or extra


def test_every_error_is_a_popup_error_subclass():
    assert issubclass(ArtifactError, PopupError) and issubclass(BaseMismatchError, PopupError)
