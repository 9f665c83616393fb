"""A small fuzzer over artifacts: mutate valid ones (JSON fields, raw bytes, tensors) and require
that every load ends in success or a named error (a PopupError), within a time bound.

The mutations are drawn from a fixed seed, so a failure names a mutation that reproduces.
``POPUP_FUZZ_MUTATIONS`` raises their number for a longer run, ``POPUP_FUZZ_FIRST`` starts at
another seed (CI runs the default: 500 from seed 0).
"""

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
from test_artifact_safety import conv_model, forge, record_tensor_file

from popup_adapter import PopupError, PopupModel, get_popup_model
from popup_adapter.__main__ import inspect_artifact
from popup_adapter.artifact import read_artifact
from popup_adapter.artifact_schema import CONFIG_NAME

MUTATIONS = int(os.environ.get("POPUP_FUZZ_MUTATIONS", "500"))
#: the first mutation's seed: another value runs other mutations
FIRST = int(os.environ.get("POPUP_FUZZ_FIRST", "0"))
#: a load of these tiny models takes milliseconds; a mutation may not make it take seconds
SECONDS_PER_LOAD = 5.0
GOLDEN = Path(__file__).parent / "data"
VALUES = [
    None, True, False, -1, 0, 1, 3, 2**31, 2**63, 2**70, 1e308, -0.5, 0.5, float("nan"), "", "x",
    "x" * 5000, "hf-hub:evil/model", "local-dir:/etc", "../../etc/passwd", "popup_model",
    [], [1, 2, 3], [[[]]], {}, {"a": 1}, {"library": "timm"}, json.loads("[" * 30 + "]" * 30),
]  # fmt: skip


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid artifacts to mutate: format 3 (a CNN without and one with BatchNorm and a head to
    save) and the golden formats 1 and 2 (a timm CNN, a BERT with a saved head)."""
    root = tmp_path_factory.mktemp("seeds")
    conv_model(0.3).save_pretrained(root / "conv")
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    get_popup_model(resnet, k=0.5, modules_to_save=["fc"]).save_pretrained(root / "resnet")
    for name in ("format_v1/test_resnet", "format_v1/bert", "format_v2/gelu_resnet"):
        shutil.copytree(GOLDEN / name, root / name.replace("/", "_"))
    return sorted(p for p in root.iterdir() if p.is_dir())


def _paths(value, prefix=()):
    """Every path into a JSON value."""
    yield prefix
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
    else:
        items = ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate_field(rng: random.Random):
    def edit(meta):
        path = rng.choice([p for p in _paths(meta) if p])
        *parents, leaf = path
        parent = meta
        for key in parents:
            parent = parent[key]
        action = rng.random()
        if action < 0.2 and isinstance(parent, dict):
            del parent[leaf]
        elif action < 0.3 and isinstance(parent[leaf], (int, float)) and parent[leaf] is not True:
            parent[leaf] = parent[leaf] * rng.choice([-1, 2, 1000, 10**12]) + rng.choice([0, 1])
        else:
            parent[leaf] = rng.choice(VALUES)
        return f"field {'.'.join(map(str, path))}"

    return edit


def _mutate_tensors(rng: random.Random):
    def edit(tensors):
        key = rng.choice(sorted(tensors))
        value = tensors[key]
        action = rng.randrange(5)
        if action == 0:
            del tensors[key]
        elif action == 1:
            tensors[key] = value.astype(rng.choice([np.float32, np.float64, np.int64, np.int8]))
        elif action == 2:
            tensors[key] = value.reshape(-1)[: max(0, value.size - rng.randrange(1, 9))].copy()
        elif action == 3:
            flat = value.reshape(-1).copy()
            if flat.size:
                flat.view(np.uint8)[rng.randrange(flat.nbytes)] ^= 1 << rng.randrange(8)
            tensors[key] = flat.reshape(value.shape)
        else:
            tensors[f"state.{rng.choice(['x', 'fc.weight', 'bn1.running_var'])}"] = np.ones(3)

    return edit


def _mutate_bytes(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(rng.randrange(1, 4)):
        action, at = rng.randrange(3), rng.randrange(len(data))
        if action == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif action == 1:
            del data[at:]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        if not data:
            break
    path.write_bytes(bytes(data))


def mutate(folder: Path, rng: random.Random) -> str:
    """Apply one random mutation to an artifact folder; returns what it did."""
    kind = rng.choice(["field", "field", "tensors", "config bytes", "tensor bytes"])
    if kind == "field":
        described = []
        forge(folder, lambda meta: described.append(_mutate_field(rng)(meta)))
        return described[0]
    if kind == "tensors":
        forge(folder, None, _mutate_tensors(rng))
    elif kind == "config bytes":
        _mutate_bytes(folder / CONFIG_NAME, rng)
    else:  # past the sha256 check only if the config is told the new hash: half the time
        weights = read_artifact(folder).weights_path
        _mutate_bytes(weights, rng)
        if rng.random() < 0.5:
            _record_hash(folder, weights)
    return kind


def _record_hash(folder: Path, weights: Path) -> None:
    """Tell the config the tensor file's new size and hash (renamed as its format names it)."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    record_tensor_file(folder, meta, weights.name, weights.read_bytes())
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_mutated_artifacts_load_or_fail_with_a_named_error(seeds, tmp_path):
    outcomes = {"loaded": 0, "refused": 0, "not applied": 0}
    slowest = 0.0
    for index in range(MUTATIONS):
        rng = random.Random(FIRST + index)
        seed = seeds[index % len(seeds)]
        folder = tmp_path / str(index)
        shutil.copytree(seed, folder)
        try:
            what = mutate(folder, rng)
        except (ValueError, KeyError, IndexError, TypeError, OSError):
            outcomes["not applied"] += (
                1  # forge could not write it (a config that no longer parses)
            )
            continue
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inspect_artifact(str(folder))
                PopupModel.from_pretrained(folder)
            outcomes["loaded"] += 1
        except PopupError:
            outcomes["refused"] += 1
        except Exception as error:
            pytest.fail(f"mutation {index} ({seed.name}: {what}) raised {error!r}")
        elapsed = time.perf_counter() - start
        slowest = max(slowest, elapsed)
        assert elapsed < SECONDS_PER_LOAD, f"mutation {index} ({seed.name}: {what}): {elapsed}s"
        shutil.rmtree(folder)
    print(f"{MUTATIONS} mutations: {outcomes}, slowest load {slowest:.2f} s")
    assert outcomes["not applied"] < MUTATIONS / 10 and outcomes["refused"] > MUTATIONS / 2
