"""The conformance table: does popup_adapter adapt every timm and transformers architecture exactly?

    python -m popup_adapter.zoo                                # all of it (resumable)
    python -m popup_adapter.zoo --timm resnet,vit --transformers none
    python -m popup_adapter.zoo --table docs/conformance.md    # the docs table from the results

For one model of every timm family (the smallest variant by parameter count, ``pretrained=False``,
the smallest square input it accepts) and for transformers architectures built from tiny
configs (:data:`TRANSFORMERS`), :func:`check_model` adapts the model (k=0.5) and checks: a
forward and backward pass in which every score gets a finite gradient (and some a nonzero one),
exact kept counts (per expert for an expert bank), masked == merged, the same base fingerprint
and structure when the model is built again under another global seed, and the share of the
model's matrix weights that is masked; :func:`check_reload` then loads the saved artifact
without ``model=`` in a fresh process and compares the outputs. A model that popup_adapter
refuses at ``get_popup_model`` is a row "refused" with the reason; a model whose plain version
does not run here is "not run"; anything else wrong is "FAIL".

Each model runs in a process of its own (a crash or a timeout stays one row); results go to a
JSON-lines file, one row per model, and a rerun skips the models already there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

#: the square input sizes tried, smallest first, until the plain timm model accepts one
_TIMM_SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
_K = 0.5


@dataclass
class Row:
    """One model's line of the table."""

    family: str
    model: str
    library: str
    result: str = "FAIL"
    note: str = ""
    masked_share: float | None = None
    masked_tensors: int | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# -- the models


def _text(**kwargs) -> dict[str, Any]:
    base = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return {**base, **kwargs}


def _decoder(**kwargs) -> dict[str, Any]:
    return _text(num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)


def _seq2seq(**kwargs) -> dict[str, Any]:
    base = dict(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return {**base, **kwargs}


def _vit(**kwargs) -> dict[str, Any]:
    base = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    return {**base, **kwargs}


def _speech(**kwargs) -> dict[str, Any]:
    return _text(
        vocab_size=32,
        conv_dim=(8, 8),
        conv_stride=(4, 4),
        conv_kernel=(8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        layerdrop=0.0,
        **kwargs,
    )


#: expert sizes whose strides the grouped matrix products accept (multiples of 16 bytes)
_MOE = dict(num_experts_per_tok=2, intermediate_size=32)

#: ``name: (model class, config class, config kwargs, input kind)``: tiny configs of
#: encoders, decoders (mixtures of experts among them), encoder-decoders, vision and speech
TRANSFORMERS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", _text(num_labels=3), "text"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", _text(), "text"),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig", _text(), "text"),
    "albert": (
        "AlbertForSequenceClassification",
        "AlbertConfig",
        _text(embedding_size=16),
        "text",
    ),
    "deberta-v2": (
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        _text(relative_attention=True, pos_att_type=["p2c", "c2p"]),
        "text",
    ),
    "electra": (
        "ElectraForSequenceClassification",
        "ElectraConfig",
        _text(embedding_size=16),
        "text",
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
        "text",
    ),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", _text(), "text"),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "text",
    ),
    "gpt-neo": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=99,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=37,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
        ),
        "text",
    ),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _text(), "text"),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=37,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "text",
    ),
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4),
        "text",
    ),
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "text",
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", _decoder(), "text"),
    "mistral": ("MistralForCausalLM", "MistralConfig", _decoder(sliding_window=8), "text"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _decoder(), "text"),
    "phi": ("PhiForCausalLM", "PhiConfig", _decoder(), "text"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", _decoder(head_dim=8), "text"),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        _decoder(head_dim=8, sliding_window=8),
        "text",
    ),
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        _decoder(num_local_experts=4, **_MOE),
        "text",
    ),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", _decoder(num_experts=4, **_MOE), "text"),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        _decoder(
            num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32, **_MOE
        ),
        "text",
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    "bart": ("BartForConditionalGeneration", "BartConfig", _seq2seq(), "seq2seq"),
    "pegasus": ("PegasusForConditionalGeneration", "PegasusConfig", _seq2seq(), "seq2seq"),
    "vit": ("ViTForImageClassification", "ViTConfig", _vit(num_labels=3), "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", _vit(mlp_ratio=2), "image"),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        "image",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        dict(image_size=32, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
        "image",
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        "image",
    ),
    "whisper": (
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        _seq2seq(
            num_mel_bins=8,
            encoder_layers=1,
            decoder_layers=1,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            decoder_start_token_id=1,
        ),
        "audio-features",
    ),
    "wav2vec2": ("Wav2Vec2ForCTC", "Wav2Vec2Config", _speech(), "audio-values"),
    "hubert": ("HubertForCTC", "HubertConfig", _speech(), "audio-values"),
    "clip": (
        "CLIPModel",
        "CLIPConfig",
        dict(text_config=_text(), vision_config=_vit(), projection_dim=16),
        "text-image",
    ),
    "siglip": (
        "SiglipModel",
        "SiglipConfig",
        dict(text_config=_text(), vision_config=_vit()),
        "text-image",
    ),
}


def _transformers_inputs(kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def ids(length: int) -> torch.Tensor:
        return torch.randint(3, 99, (2, length), generator=generator)

    def pixels() -> torch.Tensor:
        return torch.randn(2, 3, 32, 32, generator=generator)

    if kind == "text":
        return {"input_ids": ids(12), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    if kind == "seq2seq":
        return {"input_ids": ids(12), "decoder_input_ids": ids(5)}
    if kind == "image":
        return {"pixel_values": pixels()}
    if kind == "text-image":
        return {"input_ids": ids(7), "pixel_values": pixels()}
    if kind == "audio-features":
        return {
            "input_features": torch.randn(2, 8, 32, generator=generator),
            "decoder_input_ids": ids(5),
        }
    if kind == "audio-values":
        return {"input_values": torch.randn(2, 1000, generator=generator)}
    raise ValueError(f"unknown input kind {kind!r}")


def timm_families(cache: Path | None = None) -> dict[str, str]:
    """``{timm family (its module): smallest variant by parameter count}``, variants counted on
    the meta device (no memory, no weights); ``test_*`` models are left out. Cached in
    ``cache`` (JSON) when given, keyed by timm's version."""
    import timm

    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("timm") == timm.__version__:
            return stored["families"]
    families = {}
    for family in timm.list_modules():
        counts = {}
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                counts[name] = sum(p.numel() for p in model.parameters())
            except Exception:  # a variant that cannot be built from its config alone
                continue
        if counts:
            families[family] = min(counts, key=lambda name: (counts[name], name))
    if cache is not None:
        cache.write_text(json.dumps({"timm": timm.__version__, "families": families}, indent=1))
    return families


@dataclass
class Case:
    """A model to check: how to build it and an input for it."""

    family: str
    model: str
    library: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict[str, torch.Tensor]]


def timm_case(family: str, name: str) -> Case:
    """The timm model ``name``, fed the smallest square input its plain version accepts."""
    import timm

    def build():
        return timm.create_model(name, pretrained=False)

    def inputs(model):
        channels, *_ = model.pretrained_cfg.get("input_size", (3, 224, 224))
        configured = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        sizes = sorted({*(s for s in _TIMM_SIZES if s <= configured), configured})
        generator = torch.Generator().manual_seed(0)
        error = None
        for size in sizes:
            x = torch.randn(2, channels, size, size, generator=generator)
            try:
                with torch.no_grad():
                    model.eval()(x)
                return {"x": x}
            except Exception as failure:  # too small for this architecture: try the next
                error = failure
        raise _NotRun(f"the plain model runs on no input of {sizes}: {_first_line(error)}")

    return Case(family, name, "timm", build, inputs)


def transformers_case(name: str) -> Case:
    """The transformers architecture ``name`` of :data:`TRANSFORMERS`, from its tiny config."""
    import transformers

    model_class, config_class, kwargs, kind = TRANSFORMERS[name]

    def build():
        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config)

    def inputs(model):
        inputs = _transformers_inputs(kind, torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model.eval()(**inputs)
        except Exception as error:
            raise _NotRun(f"the plain model does not run: {_first_line(error)}") from error
        return inputs

    return Case(name, model_class, "transformers", build, inputs)


def case_by_id(case_id: str) -> Case:
    """``timm:<family>:<model>`` or ``transformers:<name>``."""
    library, name, *model = case_id.split(":")
    return timm_case(name, model[0]) if library == "timm" else transformers_case(name)


# -- the checks


class _NotRun(Exception):
    """The plain model does not run here: not a popup_adapter result."""


def output_tensor(output) -> torch.Tensor:
    """The main tensor of a model's output: itself, ``logits``, or the first tensor of a
    ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
    return next(v for v in values if isinstance(v, torch.Tensor))


def _first_line(error: BaseException | None) -> str:
    text = f"{type(error).__name__}: {error}" if error is not None else ""
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def forward_output(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The main output tensor of ``model`` on ``inputs`` (``{"x": tensor}`` for a timm model,
    keyword arguments for a transformers one)."""
    if set(inputs) == {"x"}:
        return output_tensor(model(inputs["x"]))
    return output_tensor(model(**inputs))


def check_model(case: Case, folder: Path) -> Row:
    """Adapt, train one step, count, merge, and save into ``folder`` for :func:`check_reload`."""
    from . import PopupError, get_popup_model
    from .base import structure_fingerprint

    row = Row(case.family, case.model, case.library)
    start = time.perf_counter()
    notes: list[str] = []
    try:
        torch.manual_seed(1)
        plain = case.build()
        inputs = case.inputs(plain)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = get_popup_model(plain, k=_K)
            except PopupError as refusal:
                row.result, row.note = "refused", _first_line(refusal)
                return row
        notes += sorted(
            str(w.message).splitlines()[0].split(";")[0]
            for w in caught
            if w.category is UserWarning and "matrix weights" not in str(w.message)
        )
        layers = dict(model.popup_layers())
        row.masked_tensors, row.masked_share = len(layers), model.coverage.share
        if model.coverage.unmasked:
            names = ", ".join(name for name, _ in model.coverage.unmasked[:3])
            more = len(model.coverage.unmasked) - 3
            notes.append(f"not masked: {names}{f' and {more} more' if more > 0 else ''}")

        # every score gets a finite gradient (a layer this forward does not use gets none)
        model.train()
        forward_output(model, inputs).float().square().mean().backward()
        unused = [n for n, layer in layers.items() if layer.popup_scores["default"].grad is None]
        grads = [layer.popup_scores["default"].grad for layer in layers.values()]
        grads = [g for g in grads if g is not None]
        if not grads or not all(torch.isfinite(g).all() for g in grads):
            raise AssertionError("a score gradient is missing or not finite")
        if not any(g.abs().sum() > 0 for g in grads):
            raise AssertionError("every score gradient is zero")
        if unused:
            notes.append(f"{len(unused)} masked tensors unused by this forward ({unused[0]}...)")
        model.zero_grad(set_to_none=True)

        # exact kept counts, per expert for an expert bank
        for name, mask in model.get_masks().items():
            layer = layers[name]
            parts = mask.unbind(0) if layer.per_expert else (mask,)
            counts = {int(part.sum()) for part in parts}
            if counts != {layer.popup_kept["default"]}:
                raise AssertionError(f"{name} keeps {counts}, not {layer.popup_kept['default']}")

        # the base does not depend on torch's global RNG
        torch.manual_seed(12345)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = get_popup_model(case.build(), k=_K)
        if again.base_fingerprint != model.base_fingerprint:
            raise AssertionError("another build gives another base fingerprint")
        if structure_fingerprint(again.base_structure) != structure_fingerprint(
            model.base_structure
        ):
            raise AssertionError("another build gives another structure")
        del again

        # save, then masked == merged
        model.eval()
        with torch.no_grad():
            masked = forward_output(model, inputs)
        model.save_pretrained(folder / "artifact")
        from safetensors.torch import save_file

        save_file(
            {**{f"input.{k}": v for k, v in inputs.items()}, "output": masked.contiguous()},
            folder / "io.safetensors",
        )
        merged = model.merge_and_unload()
        with torch.no_grad():
            merged_output = forward_output(merged, inputs).float()
        difference = (merged_output - masked.float()).abs().max().item()
        row.details["merged_max_abs_diff"] = difference
        if not difference <= 1e-5:
            raise AssertionError(f"masked and merged outputs differ by {difference:.3g}")
        if difference:
            notes.append(f"merged differs by {difference:.1e}")
        row.result = "reload pending"
    except _NotRun as reason:
        row.result, notes = "not run", [str(reason)]
    except Exception as error:  # a failure of ours: its traceback goes into the details
        row.result = "FAIL"
        notes.insert(0, _first_line(error))
        row.details["traceback"] = traceback.format_exc()[-3000:]
    finally:
        row.note = "; ".join(notes)
        row.seconds = round(time.perf_counter() - start, 1)
    return row


def reload_artifacts(folders: list[Path]) -> dict[str, str]:
    """In this process: load each saved artifact without ``model=`` and compare its output on
    the saved input; ``{folder: "ok" or what went wrong}``."""
    from safetensors.torch import load_file

    from . import PopupModel

    results = {}
    for folder in folders:
        try:
            io = load_file(folder / "io.safetensors")
            inputs = {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = PopupModel.from_pretrained(folder / "artifact")
            with torch.no_grad():
                out = forward_output(loaded, inputs)
            same = torch.equal(out, io["output"])
            results[str(folder)] = "ok" if same else "reloaded outputs differ"
        except Exception as error:
            results[str(folder)] = f"reload failed: {_first_line(error)}"
    return results


def check_reload(folders: list[Path], timeout: float = 1800) -> dict[str, str]:
    """:func:`reload_artifacts` in a fresh Python process (nothing cached from the save)."""
    if not folders:
        return {}
    command = [sys.executable, "-m", "popup_adapter.zoo", "--reload", *map(str, folders)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = _first_line(RuntimeError((done.stderr or "no output").strip().splitlines()[-1]))
        return {str(folder): f"reload process failed: {reason}" for folder in folders}
    return json.loads(lines[-1])


def finish(row: Row, reload_result: str | None) -> Row:
    """Fold the fresh-process reload into a row that passed the in-process checks."""
    if row.result != "reload pending":
        return row
    if reload_result == "ok":
        row.result = "pass"
    else:
        row.result = "FAIL"
        row.note = "; ".join(filter(None, [reload_result or "not reloaded", row.note]))
    return row


# -- the command line


def _run_one(case_id: str, root: Path, timeout: float) -> Row:
    """Check one model in a process of its own, then reload it in another."""
    folder = root / case_id.split(":")[1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "popup_adapter.zoo", "--worker", case_id, str(folder)]
    library, name, *_ = case_id.split(":")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        row = Row(**json.loads((folder / "row.json").read_text()))
    except subprocess.TimeoutExpired:
        return Row(name, name, library, "FAIL", f"timed out after {timeout:.0f} s")
    except FileNotFoundError:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return Row(name, name, library, "FAIL", f"process died: {tail[0][:300]}")
    return finish(row, check_reload([folder]).get(str(folder)))


def write_table(rows: list[Row], path: Path, command: str) -> None:
    """The docs page: what ran, how many passed, and a row per model."""
    import timm
    import transformers

    passed = sum(row.result == "pass" for row in rows)
    by_library = {lib: [r for r in rows if r.library == lib] for lib in ("timm", "transformers")}
    lines = [
        "# Model zoo conformance",
        "",
        "Every row is one model adapted with `get_popup_model(model, k=0.5)` and checked by",
        "`popup_adapter.zoo`: a training step in which every score gets a finite gradient, exact",
        "kept counts (per expert for mixture-of-experts banks), masked == merged (max abs",
        "difference <= 1e-5, float32), the same base fingerprint and structure when built again",
        "under another global seed, and the saved artifact loaded without `model=` in a fresh",
        "process giving identical outputs. *masked* is the share of the model's matrix weights",
        "(rank >= 2, outside embeddings, norms, position tables and biases) that the masks cover.",
        "",
        f"**{passed} of {len(rows)} passed**, measured on {datetime.date.today().isoformat()} with "
        f"timm {timm.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}, on CPU:",
        "",
        "```bash",
        command,
        "```",
        "",
        "A *refused* row is a model `get_popup_model` declines with the reason given; *not run*",
        "means the plain model itself does not run on this machine.",
    ]
    for library, part in by_library.items():
        if not part:
            continue
        ok = sum(row.result == "pass" for row in part)
        title = "timm: one model per family" if library == "timm" else "transformers"
        lines += ["", f"## {title} ({ok} of {len(part)} passed)", ""]
        lines += ["| family | model | result | masked | note |", "|---|---|---|---|---|"]
        for row in sorted(part, key=lambda r: r.family):
            share = "" if row.masked_share is None else f"{100 * row.masked_share:.1f}%"
            note = "see [notes](#notes)" if row.note else ""
            lines.append(f"| {row.family} | `{row.model}` | {row.result} | {share} | {note} |")
    noted = [row for row in rows if row.note]
    if noted:
        lines += ["", "## Notes", ""]
        lines += [f"- **{r.library} {r.family}**: {' '.join(r.note.split())}" for r in noted]
    path.write_text("\n".join(lines) + "\n")


def _selected(spec: str, everything: list[str]) -> list[str]:
    if spec == "all":
        return everything
    if spec == "none":
        return []
    chosen = spec.split(",")
    unknown = sorted(set(chosen) - set(everything))
    if unknown:
        raise SystemExit(f"unknown: {unknown}; known: {', '.join(everything)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m popup_adapter.zoo``."""
    parser = argparse.ArgumentParser(prog="python -m popup_adapter.zoo", description=__doc__)
    parser.add_argument("--timm", default="all", help="families, comma-separated, all or none")
    parser.add_argument("--transformers", default="all", help="names, all or none")
    parser.add_argument("--results", default="out/zoo/results.jsonl", type=Path)
    parser.add_argument("--table", default=None, type=Path, help="write the Markdown table here")
    parser.add_argument("--timeout", default=900, type=float, help="seconds per model")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--reload", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    if args.reload:
        print(json.dumps(reload_artifacts(args.reload)))
        return 0
    if args.worker:
        case_id, folder = args.worker
        row = check_model(case_by_id(case_id), Path(folder))
        Path(folder, "row.json").write_text(json.dumps(asdict(row)))
        return 0

    root = args.results.parent
    root.mkdir(parents=True, exist_ok=True)
    families = timm_families(root / "timm_families.json") if args.timm != "none" else {}
    case_ids = [f"timm:{f}:{families[f]}" for f in _selected(args.timm, sorted(families))]
    case_ids += [f"transformers:{n}" for n in _selected(args.transformers, list(TRANSFORMERS))]
    done = {}
    if args.results.is_file():
        for line in args.results.read_text().splitlines():
            row = Row(**json.loads(line))
            done[f"{row.library}:{row.family}"] = row
    with args.results.open("a") as results:
        for number, case_id in enumerate(case_ids, 1):
            key = ":".join(case_id.split(":")[:2])
            if key in done:
                continue
            with tempfile.TemporaryDirectory(dir=root) as scratch:
                row = _run_one(case_id, Path(scratch), args.timeout)
            done[key] = row
            results.write(json.dumps(asdict(row)) + "\n")
            results.flush()
            print(
                f"[{number}/{len(case_ids)}] {case_id}: {row.result} ({row.seconds} s) {row.note}"[
                    :400
                ]
            )
    rows = [done[key] for key in (":".join(c.split(":")[:2]) for c in case_ids) if key in done]
    passed = sum(row.result == "pass" for row in rows)
    print(f"{passed} of {len(rows)} passed")
    if args.table:
        command = "python -m popup_adapter.zoo " + " ".join(argv or sys.argv[1:])
        write_table(rows, args.table, command.strip())
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0 if all(row.result in ("pass", "refused", "not run") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
