"""Checkpoints: BLIP/MISS .pth conversion, Hugging Face folders, our safetensors outputs, clear failures."""

from __future__ import annotations

import json
import pickle
import random
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import BlipForQuestionAnswering

from mile_utils import checkpoints
from mile_utils.checkpoints import (
    CheckpointError,
    convert_blip_state_dict,
    interpolate_pos_embed,
    load_weights,
    read_state_dict,
    save_trained,
    to_blip_state_dict,
)
from mile_utils.model import blip_config, build_model, build_tokenizer

TIED = {  # MISS/BLIP tie the decoder's output layer to its word embeddings, as transformers does
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


def _manifest() -> dict[str, list[int]]:
    text = resources.files("mile_utils.reference").joinpath("miss_state_dict_manifest.json").read_text()
    return json.loads(text)


def _synthetic_miss(pos_positions: int | None = None) -> dict[str, torch.Tensor]:
    """A state dict with the original MISS names and shapes; ``torch.empty`` so 385M values cost no time."""
    sd = {}
    for name, shape in _manifest().items():
        if name.endswith("position_ids"):
            sd[name] = torch.arange(shape[-1]).unsqueeze(0)
        elif name in TIED:
            continue
        else:
            sd[name] = torch.empty(shape)
    for alias, kept in TIED.items():
        sd[alias] = sd[kept]  # one tensor under two names, as torch.save stores a tied model
    sd["visual_encoder.cls_token"] = torch.randn(1, 1, 768)
    n = pos_positions or 901
    sd["visual_encoder.pos_embed"] = torch.randn(1, n, 768)
    return sd


# ---------------------------------------------------------------------------------------- paper size


def test_manifest_names_and_shapes_map_onto_the_paper_model():
    manifest = _manifest()
    assert len(manifest) == 791
    model = build_model("paper", device="meta")
    target = model.state_dict()
    fake = {k: torch.empty(v, device="meta") for k, v in manifest.items()}
    hf, report = convert_blip_state_dict(fake, image_size=480)
    # every original key is renamed or dropped with a reason: nothing unaccounted for
    assert set(report.renamed) | set(report.dropped) == set(manifest) and not report.unmapped
    assert set(report.dropped) == {
        "text_encoder.embeddings.position_ids",
        "text_decoder.bert.embeddings.position_ids",
    }
    assert set(hf) == set(target)
    assert {k: tuple(v.shape) for k, v in hf.items()} == {k: tuple(v.shape) for k, v in target.items()}
    assert report.renamed["visual_encoder.blocks.11.attn.proj.weight"] == (
        "vision_model.encoder.layers.11.self_attn.projection.weight"
    )
    # the inverse gives exactly the original layout back, buffers included
    back = to_blip_state_dict(target)
    assert {k: list(v.shape) for k, v in back.items()} == manifest


@pytest.mark.parametrize("positions", [901, 577])
def test_synthetic_miss_state_dict_loads_strictly_into_paper_model(positions):
    """480 px (MISS itself) and 384 px (public BLIP checkpoints, 577 positions) checkpoints."""
    sd = _synthetic_miss(positions)
    pos, cls = sd["visual_encoder.pos_embed"].clone(), sd["visual_encoder.cls_token"]
    model = build_model("paper", device="meta")  # meta: the checkpoint's tensors are taken, not copied
    report = load_weights(model, {"model": sd}, strict=True)
    assert report.kind == "blip" and report.loaded == 789 and not report.missing and not report.unexpected
    assert len(report.dropped) == 2
    assert not any(t.is_meta for t in model.state_dict().values())
    emb = model.vision_model.embeddings
    assert emb.position_embedding.shape == (1, 901, 768)
    assert torch.equal(emb.class_embedding, cls)
    if positions == 901:
        assert report.interpolated is None and torch.equal(emb.position_embedding, pos)
    else:
        assert report.interpolated == (576, 900)
        assert torch.equal(emb.position_embedding[:, 0], pos[:, 0])  # the cls position is kept
        grid = pos[:, 1:].reshape(1, 24, 24, 768).permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(grid, size=(30, 30), mode="bicubic", align_corners=False)
        assert torch.allclose(emb.position_embedding[:, 1:], want.permute(0, 2, 3, 1).flatten(1, 2))
    dec = model.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight  # still tied
    assert torch.equal(model.text_encoder.embeddings.position_ids, torch.arange(512).unsqueeze(0))


@pytest.mark.slow
def test_paper_checkpoint_loads_into_a_real_paper_model():
    """The copy path (a model with storage) at full size: ~2 GB and 5-10 s, mostly the model's random init."""
    sd = _synthetic_miss()
    model = build_model("paper")
    report = load_weights(model, sd)
    assert report.loaded == 789
    assert (
        model.vision_model.embeddings.position_embedding.data_ptr()
        != sd["visual_encoder.pos_embed"].data_ptr()
    )
    assert torch.equal(model.vision_model.embeddings.position_embedding, sd["visual_encoder.pos_embed"])


def test_interpolate_pos_embed_rejects_non_square_grids():
    with pytest.raises(CheckpointError, match="square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 50, 8), 64)


# ---------------------------------------------------------------------------------------- tiny round trips


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def tiny(tok):
    return build_model("tiny", tok, seed=0).eval()


def _outputs(model, tok) -> list[torch.Tensor]:
    q = tok(["is there a lesion in the left lung?"], return_tensors="pt")
    labels = tok(["yes"], return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(
            input_ids=q.input_ids, attention_mask=q.attention_mask, pixel_values=pixels, labels=labels
        )
    return [out.loss, out.image_embeds, out.last_hidden_state]


def _assert_same_outputs(a, b, tok):
    for x, y in zip(_outputs(a, tok), _outputs(b, tok), strict=True):
        assert torch.equal(x, y)


def _fresh(tok):
    return build_model("tiny", tok, seed=1)  # different random weights than ``tiny``


@pytest.mark.parametrize("wrapped", [False, True])
def test_tiny_blip_pth_round_trip(tiny, tok, tmp_path, wrapped):
    blip = to_blip_state_dict(tiny.state_dict())
    assert (
        "visual_encoder.blocks.1.attn.qkv.weight" in blip and "text_encoder.embeddings.position_ids" in blip
    )
    path = tmp_path / "tiny.pth"
    torch.save({"model": blip, "epoch": 3, "config": {"lr": 1e-5}} if wrapped else blip, path)
    other = _fresh(tok)
    report = load_weights(other, path)
    assert report.kind == "blip" and report.interpolated is None and len(report.dropped) == 2
    _assert_same_outputs(tiny, other, tok)


def test_save_trained_round_trip_is_atomic_and_a_huggingface_folder(tiny, tok, tmp_path):
    out = tmp_path / "run"
    weights = save_trained(tiny, out, metadata={"spec": "T/T/T"})
    assert weights == out / "model.safetensors" and (out / "config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    stored = checkpoints._read_safetensors(weights)[0]
    assert "text_decoder.cls.predictions.decoder.weight" not in stored  # a tied tensor is stored once
    for source in (out, weights):  # the folder and the file itself
        other = _fresh(tok)
        report = load_weights(other, source)
        assert report.kind == "safetensors" and report.loaded == len(tiny.state_dict())
        _assert_same_outputs(tiny, other, tok)
    # the folder is also a plain Hugging Face folder
    _assert_same_outputs(tiny, BlipForQuestionAnswering.from_pretrained(out), tok)


def test_save_trained_leaves_the_previous_file_when_writing_fails(tiny, tmp_path, monkeypatch):
    weights = save_trained(tiny, tmp_path)
    before = weights.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_trained(tiny, tmp_path)
    assert weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_save_trained_and_load_a_peft_wrapped_model(tiny, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    def wrap(model):
        return get_peft_model(
            model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
        )

    source = wrap(build_model("tiny", tok, seed=0))
    save_trained(source, tmp_path)
    assert not (tmp_path / "config.json").exists()  # from_pretrained must not take it for a plain model
    other = wrap(_fresh(tok))
    load_weights(other, tmp_path)
    _assert_same_outputs(source, other, tok)
    with pytest.raises(CheckpointError, match="before applying PEFT adapters"):
        load_weights(wrap(_fresh(tok)), to_blip_state_dict(tiny.state_dict()))


def test_huggingface_folder_loads_through_from_pretrained(tiny, tok, tmp_path):
    tiny.save_pretrained(tmp_path / "hf")
    other = _fresh(tok)
    report = load_weights(other, tmp_path / "hf")
    assert report.kind == "huggingface" and not report.missing
    _assert_same_outputs(tiny, other, tok)


def test_huggingface_folder_with_other_architecture_is_refused(tok, tmp_path):
    config = blip_config("tiny", tok)
    config.text_config.num_attention_heads = 8  # same shapes, different maths
    BlipForQuestionAnswering(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"text_config\.num_attention_heads: checkpoint 8, model 4"):
        load_weights(_fresh(tok), tmp_path / "hf")


def test_huggingface_folder_at_another_image_size_is_interpolated_and_eps_noted(tiny, tok, tmp_path):
    config = blip_config("tiny", tok)
    config.vision_config.image_size = 32  # 16 patches instead of 64
    config.vision_config.layer_norm_eps = 1e-5  # transformers' default (blip-vqa-base): reported, not refused
    BlipForQuestionAnswering(config).save_pretrained(tmp_path / "hf")
    report = load_weights(_fresh(tok), tmp_path / "hf")
    assert report.interpolated == (16, 64)
    assert any("vision_config.layer_norm_eps differs" in note for note in report.notes)


def test_hub_id_without_network_says_so(tok, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(BlipForQuestionAnswering, "from_pretrained", offline)
    with pytest.raises(CheckpointError, match="offline") as err:
        load_weights(_fresh(tok), "Salesforce/blip-vqa-base")
    assert "local" in str(err.value) and "hf download Salesforce/blip-vqa-base" in str(err.value)


# ---------------------------------------------------------------------------------------- failures


def test_missing_files_and_unknown_types(tok, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(_fresh(tok), tmp_path / "nope.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.npz'"):
        load_weights(_fresh(tok), tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_weights(_fresh(tok), tmp_path / "empty")


def test_corrupt_files_fail_clearly(tmp_path):
    for seed in range(8):  # random bytes break the unpickler in many different ways
        junk = random.Random(seed).randbytes(4096)
        (tmp_path / "junk.pth").write_bytes(junk)
        with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint \(corrupt"):
            read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "empty.pth")
    (tmp_path / "junk.safetensors").write_bytes(junk)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")


class _RunsCode:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(
        CheckpointError, match=r"evil\.pth: refused by torch.load\(weights_only=True\).*run code"
    ):
        read_state_dict(path)
    assert not marker.exists()
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # plain pickles (not torch.save) with code in them
        with open(tmp_path / "plain.pkl", "wb") as f:
            pickle.dump(_RunsCode(marker), f, protocol=protocol)
        # protocol 2 reaches the blocked global; newer ones already stop at an opcode torch does not allow
        with pytest.raises(CheckpointError, match=r"plain\.pkl: (refused.*run code|not a readable)"):
            read_state_dict(tmp_path / "plain.pkl")
        assert not marker.exists()


def test_files_that_are_not_state_dicts(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict.*got list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth: not a state dict.*'epoch': int"):
        read_state_dict(tmp_path / "mixed.pth")


@pytest.fixture()
def blip_tiny(tiny):
    return {k: v.clone() for k, v in to_blip_state_dict(tiny.state_dict()).items()}


def _fails(model, sd, tmp_path, *patterns: str) -> str:
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path)
    text = str(err.value)
    assert text.startswith(f"{path} does not match the model:")  # the file is named first
    for p in patterns:
        assert p in text, text
    return text


def test_wrong_shape_is_named_with_both_shapes(tok, blip_tiny, tmp_path):
    key = "visual_encoder.blocks.0.mlp.fc1.weight"
    mlp, hidden = blip_tiny[key].shape
    blip_tiny[key] = torch.zeros(7, hidden)
    _fails(
        _fresh(tok),
        blip_tiny,
        tmp_path,
        "shape mismatches (1)",
        f"vision_model.encoder.layers.0.mlp.fc1.weight: (7, {hidden}) vs ({mlp}, {hidden})",
    )


def test_missing_key_is_named(tok, blip_tiny, tmp_path):
    del blip_tiny["text_encoder.encoder.layer.1.crossattention.self.key.bias"]
    _fails(
        _fresh(tok),
        blip_tiny,
        tmp_path,
        "missing keys",
        "text_encoder.encoder.layer.1.crossattention.self.key.bias",
    )


def test_unexpected_key_is_named_and_strict_false_reports_it(tok, blip_tiny, tmp_path):
    blip_tiny["visual_encoder.blocks.0.attn.rel_pos"] = torch.zeros(3)
    blip_tiny["text_encoder.pooler.dense.weight"] = torch.zeros(128, 128)
    _fails(
        _fresh(tok),
        blip_tiny,
        tmp_path,
        "unexpected keys (2)",
        "visual_encoder.blocks.0.attn.rel_pos",
        "text_encoder.pooler.dense.weight",
    )
    report = load_weights(_fresh(tok), blip_tiny, strict=False)
    assert sorted(report.unexpected) == [
        "text_encoder.pooler.dense.weight",
        "visual_encoder.blocks.0.attn.rel_pos",
    ]


def test_long_key_lists_are_truncated(tok, tiny, tmp_path):
    sd = {k: v for k, v in to_blip_state_dict(tiny.state_dict()).items() if not k.startswith("text_decoder.")}
    text = _fails(_fresh(tok), sd, tmp_path, "missing keys", "... and")
    assert len(text.splitlines()) < 30


def test_blip_pretraining_heads_are_dropped_with_reasons(tok, blip_tiny):
    blip_tiny.update(
        {
            "itm_head.weight": torch.zeros(2, 128),
            "temp": torch.tensor(0.07),
            "visual_encoder_m.cls_token": torch.zeros(1, 1, 128),
            "image_queue": torch.zeros(4, 4),
        }
    )
    report = load_weights(_fresh(tok), blip_tiny)
    assert {"itm_head.weight", "temp", "visual_encoder_m.cls_token", "image_queue"} <= set(report.dropped)
    assert "momentum" in report.dropped["visual_encoder_m.cls_token"]


def test_tied_tensors_that_disagree_are_refused(tok, blip_tiny):
    w = "text_decoder.cls.predictions.decoder.weight"
    blip_tiny[w] = blip_tiny[w] + 1
    with pytest.raises(CheckpointError, match="ties them"):
        load_weights(_fresh(tok), blip_tiny)


def test_smaller_vocabulary_needs_resize_vocab(tok, tiny, blip_tiny):
    n = tiny.config.text_config.vocab_size
    for key in checkpoints.VOCAB_KEYS:
        blip_tiny[key] = blip_tiny[key][: n - 2].clone()  # bert-base-uncased without [DEC], [ENC]
    blip_tiny["text_decoder.cls.predictions.decoder.weight"] = blip_tiny[
        "text_decoder.bert.embeddings.word_embeddings.weight"
    ]
    with pytest.raises(
        CheckpointError, match=f"vocabulary of {n - 2} rows but the model has {n}.*resize_vocab"
    ):
        load_weights(_fresh(tok), blip_tiny)
    model = _fresh(tok)
    report = load_weights(model, blip_tiny, resize_vocab=True)
    assert report.resized_vocab == (n - 2, n)
    emb = model.text_encoder.embeddings.word_embeddings.weight
    assert torch.allclose(emb[-1], emb[:-2].mean(0)) and torch.equal(
        emb[:-2], tiny.text_encoder.embeddings.word_embeddings.weight[:-2]
    )
