"""Publishing to and loading from the Hub, through huggingface_hub's real client and our test
Hub server on 127.0.0.1. Every client runs in a fresh process with its own empty cache."""

import os
import pathlib

import pytest
from hub_server import HubServer
from test_artifact import FRESH_PROCESS_CHECK, ROUND_TRIP, run_fresh

TESTS = str(pathlib.Path(__file__).parent)


def client_env(hub: HubServer, cache: pathlib.Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_CACHE": str(cache),
            "HF_TOKEN": "hf_test_token",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            **extra,
        }
    )
    return env


PUSH = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from conftest import MODELS, logits
from test_artifact import _trained
for name in {names!r}:
    model = _trained(name)
    x = MODELS[name][1]()
    with torch.no_grad():
        save_file({{"input": x, "output": logits(model(x))}}, f"{root}/{{name}}.io.safetensors")
    info = model.push_to_hub(f"me/{{name}}", private=True, commit_message=f"{{name}} mask")
    print(info.oid)
"""


@pytest.mark.parametrize("mode", ["regular", "lfs"])
def test_push_then_load_in_a_fresh_process(tmp_path, mode):
    # "regular": contents travel inline in the commit (Xet left on, never asked for);
    # "lfs": binary files go through the git-LFS batch API, with Xet disabled
    extra = {"HF_HUB_DISABLE_XET": "1"} if mode == "lfs" else {}
    with HubServer(upload_mode=mode) as hub:
        push_env = client_env(hub, tmp_path / "push-cache", **extra)
        oids = run_fresh(PUSH.format(tests=TESTS, names=ROUND_TRIP, root=tmp_path), push_env)
        assert len(oids.split()) == 3
        for name in ROUND_TRIP:
            commit = hub.state.repos[f"me/{name}"].resolve("main")
            (weights,) = [f for f in commit.files if f.endswith(".safetensors")]
            assert {"README.md", "popup_config.json", weights} == set(commit.files) - {
                ".gitattributes"
            }
            assert commit.title == f"{name} mask" and hub.state.repos[f"me/{name}"].private
            assert (weights in commit.lfs) == (mode == "lfs")
        load_env = client_env(hub, tmp_path / "load-cache", **extra)
        out = run_fresh(
            FRESH_PROCESS_CHECK.format(
                tests=TESTS, root=str(tmp_path), names=ROUND_TRIP, source='f"me/{name}"'
            ),
            load_env,
        )
    assert out.split() == [w for name in ROUND_TRIP for w in (name, "ok") * 2]
    assert (tmp_path / "load-cache" / "models--me--resnet50").is_dir()  # the Hub cache was used


REVISIONS = """
from huggingface_hub import HfApi
from popup_adapter import get_popup_model
from popup_adapter.convnets import create_conv_net
for k, revision in ((0.3, None), (0.1, "v1")):
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=k)
    model.push_to_hub("me/conv", revision=revision)
HfApi().create_tag("me/conv", tag="first", revision="main")
HfApi().create_repo("me/empty")
"""

LOAD_REVISIONS = """
from popup_adapter import ArtifactError, PopupModel
for revision in (None, "v1", "first"):
    loaded = PopupModel.from_pretrained("me/conv", revision=revision)
    print(revision, loaded.peft_config["default"].k)
for repo, revision in (("me/missing", None), ("me/conv", "v9"), ("me/empty", None)):
    try:
        PopupModel.from_pretrained(repo, revision=revision)
    except ArtifactError as error:
        print("error:", error)
"""

LOAD_OFFLINE = """
from popup_adapter import ArtifactError, PopupModel
try:
    print(PopupModel.from_pretrained("me/conv").peft_config["default"].k)
except ArtifactError as error:
    print("error:", error)
"""


def test_revisions_tags_offline_and_errors(tmp_path):
    with HubServer() as hub:
        run_fresh(REVISIONS, client_env(hub, tmp_path / "push"))
        cache = tmp_path / "cache"
        out = run_fresh(LOAD_REVISIONS, client_env(hub, cache)).splitlines()
        assert out[:3] == ["None 0.3", "v1 0.1", "first 0.3"]
        assert "'me/missing' is neither a local folder nor a Hub repo you can read" in out[3]
        assert "the Hub repo 'me/conv' has no revision 'v9'" in out[4]
        assert "me/empty@main has no popup_config.json: it is not a popup_adapter" in out[5]
        served = len(hub.state.requests)
        # offline, from the cache the previous process filled: no request reaches the server
        offline = run_fresh(LOAD_OFFLINE, client_env(hub, cache, HF_HUB_OFFLINE="1"))
        assert offline.strip() == "0.3" and len(hub.state.requests) == served
        # offline with an empty cache: a clear error, not a network attempt
        empty = run_fresh(LOAD_OFFLINE, client_env(hub, tmp_path / "empty", HF_HUB_OFFLINE="1"))
        assert "me/conv@main is not in the Hub cache and the Hub cannot be reached" in empty


REPUSH = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_artifact_safety import X_CONV, conv_model
from popup_adapter import PopupModel
for k in (0.3, 0.6):
    model = conv_model(k)
    model.push_to_hub("me/conv", metrics={{"k": k}})
loaded = PopupModel.from_pretrained("me/conv")
with torch.no_grad():
    print(torch.equal(loaded(X_CONV), model(X_CONV)))
"""


def test_a_second_push_replaces_the_artifact_in_one_commit(tmp_path):
    """The tensor file is named by its content: the second push's commit adds the new one and
    deletes the first, so each revision holds exactly one artifact."""
    with HubServer() as hub:
        out = run_fresh(REPUSH.format(tests=TESTS), client_env(hub, tmp_path / "cache"))
        repo = hub.state.repos["me/conv"]
        second = repo.resolve("main")
        first = repo.commits[second.parent]
        weights = [{f for f in c.files if f.endswith(".safetensors")} for c in (first, second)]
    assert out.split() == ["True"]
    assert len(weights[0]) == len(weights[1]) == 1 and weights[0] != weights[1]


PUSH_METHODS = """
import torch
from popup_adapter import get_popup_model
from popup_adapter.convnets import create_conv_net
methods = {{
    "biprop": dict(method="biprop", init="kaiming_normal"),
    "global": dict(selection="global", min_layer_k=0.02, ramp_steps=2),
    "iterand": dict(init="kaiming_normal", redraw_every=2, redraw_prob=0.5),
}}
x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
for name, fields in methods.items():
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.1, **fields)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(5):
        model.update_search(step)
        model(x * (step + 1)).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.update_search(None)
    model.eval()
    with torch.no_grad():
        torch.save(model(x), f"{root}/{{name}}.pt")
    model.push_to_hub(f"me/{{name}}")
"""

LOAD_METHODS = """
import torch
from popup_adapter import PopupModel
x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
for name in ("biprop", "global", "iterand"):
    model = PopupModel.from_pretrained(f"me/{{name}}")
    with torch.no_grad():
        print(name, torch.equal(model(x), torch.load(f"{root}/{{name}}.pt")))
"""


def test_every_search_method_pushes_and_loads_in_fresh_processes(tmp_path):
    with HubServer() as hub:
        run_fresh(PUSH_METHODS.format(root=tmp_path), client_env(hub, tmp_path / "push"))
        out = run_fresh(LOAD_METHODS.format(root=tmp_path), client_env(hub, tmp_path / "load"))
    assert out.split() == ["biprop", "True", "global", "True", "iterand", "True"]
