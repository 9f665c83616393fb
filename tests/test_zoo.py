"""A fixed sample of the conformance table (``python -m popup_adapter.zoo``), mixing timm families
and transformers architectures: each adapted, trained a step, merged, saved, and reloaded without
``model=`` in one fresh process."""

import pytest

from popup_adapter import zoo

#: ``(timm family, its smallest variant)``, as ``zoo.timm_families()`` picks them
TIMM_SAMPLE = [
    ("byobnet", "mobileone_s1"),
    ("convnext", "convnext_zepto_rms"),
    ("edgenext", "edgenext_xx_small"),
    ("efficientnet", "mobilenetv2_035"),
    ("efficientvit_msra", "efficientvit_m0"),
    ("ghostnet", "ghostnet_050"),
    ("levit", "levit_128s"),
    ("mobilenetv3", "mobilenetv3_small_050"),
    ("mobilevit", "mobilevit_xxs"),
    ("nfnet", "nf_regnet_b0"),
    ("pvt_v2", "pvt_v2_b0"),
    ("regnet", "regnetx_002"),
    ("repghost", "repghostnet_050"),
    ("resnet", "resnet10t"),
    ("resnetv2", "resnetv2_18"),
    ("vision_transformer", "vit_tiny_patch16_224"),
]
TRANSFORMERS_SAMPLE = [
    "albert",
    "bart",
    "bert",
    "clip",
    "deberta-v2",
    "distilbert",
    "gemma2",
    "gpt2",
    "llama",
    "mixtral",
    "olmoe",
    "qwen2-moe",
    "swin",
    "t5",
    "vit",
    "wav2vec2",
    "whisper",
]
CASES = [f"timm:{family}:{model}" for family, model in TIMM_SAMPLE] + [
    f"transformers:{name}" for name in TRANSFORMERS_SAMPLE
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every sampled model checked here, then all reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("zoo")
    checked = {}
    for case_id in CASES:
        folder = root / case_id.replace(":", "__")
        folder.mkdir()
        checked[case_id] = (zoo.check_model(zoo.case_by_id(case_id), folder), folder)
    reloads = zoo.check_reload(
        [folder for row, folder in checked.values() if row.result == "reload pending"]
    )
    return {
        case_id: zoo.finish(row, reloads.get(str(folder)))
        for case_id, (row, folder) in checked.items()
    }


def test_the_sample_mixes_at_least_30_models_of_both_libraries():
    assert len(CASES) >= 30 and len(TIMM_SAMPLE) >= 15 and len(TRANSFORMERS_SAMPLE) >= 15


@pytest.mark.parametrize("case_id", CASES)
def test_model_conforms(rows, case_id):
    row = rows[case_id]
    assert row.result == "pass", f"{row.note}\n{row.details.get('traceback', '')}"
    assert row.masked_tensors > 0 and row.masked_share > 0.5


def test_what_stays_unmasked_is_reported(rows):
    """Wav2Vec2's positional convolution is weight-normalised: not masked, and said so."""
    row = rows["transformers:wav2vec2"]
    assert "not masked: wav2vec2.encoder.pos_conv_embed.conv" in row.note
    assert row.masked_share < 1


def test_the_table_counts_every_row_and_spells_out_each_note(rows, tmp_path):
    page = tmp_path / "conformance.md"
    zoo.write_table(list(rows.values()), page, "python -m popup_adapter.zoo")
    text = page.read_text()
    assert f"**{len(rows)} of {len(rows)} passed**" in text
    assert f"timm: one model per family ({len(TIMM_SAMPLE)} of {len(TIMM_SAMPLE)} passed)" in text
    assert "| resnet | `resnet10t` | pass | 100.0% |  |" in text
    assert "| wav2vec2 | `Wav2Vec2ForCTC` | pass |" in text
    notes = text.split("## Notes", 1)[1]
    note = " ".join(rows["transformers:wav2vec2"].note.split())
    assert f"**transformers wav2vec2**: {note}" in notes


def test_the_architectures_page_lists_what_passed_and_what_is_refused(rows, tmp_path):
    page = tmp_path / "architectures.md"
    command = "python -m popup_adapter.zoo --results out/zoo/results.jsonl --table x.md " * 2
    zoo.write_architectures(list(rows.values()), page, command.strip())
    text = page.read_text()
    assert f"## {len(TIMM_SAMPLE)} timm families" in text
    assert "`resnet`" in text and "`Wav2Vec2ForCTC (wav2vec2)`" in text
    assert "| a model with unmerged PEFT adapters (LoRA, IA3, ...) | `AdapterError`" in text
    assert "- **transformers wav2vec2**: " in text  # partly unmasked, said so
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(block) > 1 and all(len(line) <= 88 for line in block)
    assert " ".join(line.rstrip(" \\").strip() for line in block) == command.strip()
