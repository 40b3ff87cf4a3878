"""Checkpoints: BLIP/MISS .pth conversion, MILE's train_MILE.py files, Hugging Face folders, clear failures."""

from __future__ import annotations

import json
import pickle
import random
import re
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import BlipForQuestionAnswering

from mile_utils.checkpoints import CheckpointError, load_weights
from mile_utils.model import build_model, build_tokenizer

TIED = {  # MISS/BLIP tie the decoder's output layer to its word embeddings, as transformers does
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
# transformers' ViT names -> BLIP's timm names, written out independently of the converter's table
HF_TO_BLIP = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"post_layernorm\.", "norm."),
]


def _manifest() -> dict[str, list[int]]:
    text = resources.files("mile_utils.reference").joinpath("miss_state_dict_manifest.json").read_text()
    return json.loads(text)


def _to_blip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict under the original BLIP/MISS names, position_ids buffers included."""
    out = {}
    for name, t in hf.items():
        if name.startswith("vision_model."):
            name = name[len("vision_model."):]
            for pattern, repl in HF_TO_BLIP:
                name = re.sub("^" + pattern, repl, name)
            name = "visual_encoder." + name
        out[name] = t.clone()
    for prefix in ("text_encoder", "text_decoder.bert"):
        n = hf[f"{prefix}.embeddings.position_embeddings.weight"].shape[0]
        out[f"{prefix}.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    for alias, kept in TIED.items():
        out[alias] = out[kept]  # one tensor under two names, as torch.save stores a tied model
    return out


# ---------------------------------------------------------------------------------------- paper size


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_manifest_names_and_shapes_map_onto_the_paper_model():
    manifest = _manifest()
    assert len(manifest) == 791
    model = build_model("paper", device="meta")
    target = model.state_dict()
    # every original key is renamed onto a model key (same shape) or dropped with a reason: nothing unaccounted
    # for (stride-0 zeros give the manifest's shapes without the memory)
    report = load_weights(model, {k: torch.zeros(()).expand(v) for k, v in manifest.items()})
    assert (report["kind"], report["loaded"], report["interpolated"]) == ("blip", len(target), None)
    assert set(report["dropped"]) == {f"{p}.embeddings.position_ids" for p in ("text_encoder", "text_decoder.bert")}
    # the test's independent inverse table gives exactly the original layout back
    assert {k: list(v.shape) for k, v in _to_blip(target).items()} == manifest


@pytest.mark.slow
def test_paper_checkpoint_loads_into_a_real_paper_model(tmp_path):
    """A MILE-style file at full size (784 MB of weights), 384 px positions interpolated to 480 px."""
    model = build_model("paper")
    sd = _to_blip(model.state_dict())
    sd["visual_encoder.pos_embed"] = torch.randn(1, 577, 768)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "miss.pth")
    report = load_weights(model, tmp_path / "miss.pth")
    assert (report["kind"], report["loaded"], report["interpolated"]) == ("blip", 789, (576, 900))
    assert len(report["dropped"]) == 2


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


def test_positions_are_interpolated_bicubically_keeping_cls(tiny, tok):
    sd = tiny.state_dict()
    key = "vision_model.embeddings.position_embedding"
    pos = sd[key] = torch.randn(1, 1 + 16, sd[key].shape[-1])  # a 4x4 grid for the tiny model's 8x8
    model = _fresh(tok)
    assert load_weights(model, sd)["interpolated"] == (16, 64)
    out = model.vision_model.embeddings.position_embedding.detach()
    want = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(8, 8),
                                           mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 0], pos[:, 0]) and torch.allclose(out[:, 1:], want.permute(0, 2, 3, 1).flatten(1, 2))
    sd[key] = torch.zeros(1, 1 + 50, pos.shape[-1])
    with pytest.raises(CheckpointError, match="square grid"):
        load_weights(_fresh(tok), sd)


@pytest.mark.parametrize("wrapped", [False, True])
def test_tiny_blip_pth_round_trip(tiny, tok, tmp_path, wrapped):
    blip = _to_blip(tiny.state_dict())
    path = tmp_path / "tiny.pth"
    torch.save({"model": blip, "epoch": 3, "config": {"lr": 1e-5}} if wrapped else blip, path)
    other = _fresh(tok)
    report = load_weights(other, path)
    assert report["kind"] == "blip" and report["interpolated"] is None and len(report["dropped"]) == 2
    assert report["loaded"] == len(tiny.state_dict())
    _assert_same_outputs(tiny, other, tok)
    dec = other.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight  # still tied


def test_a_train_mile_checkpoint_loads_without_running_its_code(tiny, tok, tmp_path):
    """As train_MILE.py saves: model, AdamW state, the ruamel round-trip config (comments and all), epoch."""
    yaml = pytest.importorskip("ruamel.yaml")
    config = yaml.YAML(typ="rt").load("# set pretrained as a file path or an url\npretrained: 'x.pth'\n"
                                      "vit: 'base'\ninit_lr: 1e-5\ntrain_files: ['vqa_train','vqa_val']\n")
    model = build_model("tiny", tok, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["init_lr"])
    path = tmp_path / "checkpoint_02.pth"
    torch.save({"model": _to_blip(model.state_dict()), "optimizer": optimizer.state_dict(), "config": config,
                "epoch": 2}, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe reader refuses the file outright
        torch.load(path, weights_only=True)
    other = _fresh(tok)
    assert load_weights(other, path)["kind"] == "blip"
    _assert_same_outputs(tiny, other, tok)


class _RunsCode:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_in_a_checkpoint_is_never_run(tok, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCode(marker), "os": __import__("os").system}, path)
    with pytest.raises(CheckpointError, match="does not match the model"):  # read, code inert, then checked
        load_weights(_fresh(tok), path)
    assert not marker.exists()
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # plain pickles (not torch.save): torch's weights_only reader
        with open(tmp_path / "plain.pkl", "wb") as f:
            pickle.dump(_RunsCode(marker), f, protocol=protocol)
        with pytest.raises(CheckpointError, match="UnpicklingError"):
            load_weights(_fresh(tok), tmp_path / "plain.pkl")
        assert not marker.exists()


def test_a_pickle_cannot_set_attributes_of_what_it_names(tok, tmp_path):
    """BUILD with slot state on a class torch allows (Parameter) would patch it for the whole process."""
    path = tmp_path / "patch.pth"
    with zipfile.ZipFile(path, "w") as archive:  # torch.save's layout, written by hand
        archive.writestr("archive/version", "3\n")
        # GLOBAL Parameter, (None, {"x": 1}), BUILD: pickle would run setattr(Parameter, "x", 1)
        archive.writestr("archive/data.pkl",
                         b"\x80\x02ctorch.nn.parameter\nParameter\nN}X\x01\x00\x00\x00xK\x01s\x86b.")
    with pytest.raises(CheckpointError, match="BUILD of a _ParameterMeta refused"):
        load_weights(_fresh(tok), path)
    assert not hasattr(torch.nn.Parameter, "x")


def test_saved_pretrained_folder_loads_and_a_folder_missing_files_fails(tiny, tok, tmp_path):
    tiny.save_pretrained(tmp_path / "hf")  # how a trained model is exported: config.json + model.safetensors
    other = _fresh(tok)
    report = load_weights(other, tmp_path / "hf")
    assert report["kind"] == "huggingface" and report["loaded"] == len(tiny.state_dict())
    _assert_same_outputs(tiny, other, tok)
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"hf: not a loadable Hugging Face BLIP VQA folder"):
        load_weights(_fresh(tok), tmp_path / "hf")
    other = _fresh(tok)  # a bare safetensors file (tied names stored once) is read directly
    assert load_weights(other, tmp_path / "model.safetensors")["kind"] == "safetensors"
    _assert_same_outputs(tiny, other, tok)


def test_huggingface_folder_with_other_architecture_is_refused(tok, tmp_path):
    config = build_model("tiny", tok).config
    config.text_config.num_attention_heads = 8  # same shapes, different maths
    BlipForQuestionAnswering(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"text_config\.num_attention_heads: checkpoint 8, model 4"):
        load_weights(_fresh(tok), tmp_path / "hf")


def test_huggingface_folder_at_another_image_size_is_interpolated_and_eps_noted(tok, tmp_path):
    config = build_model("tiny", tok).config
    config.vision_config.image_size = 32  # 16 patches instead of 64
    config.vision_config.layer_norm_eps = 1e-5  # transformers' default (blip-vqa-base): reported, not refused
    BlipForQuestionAnswering(config).save_pretrained(tmp_path / "hf")
    report = load_weights(_fresh(tok), tmp_path / "hf")
    assert report["interpolated"] == (16, 64)
    assert any("vision_config.layer_norm_eps differs" in note for note in report["notes"])


def test_hub_id_offline_fails_at_once_naming_what_was_tried(tok, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as err:
        load_weights(_fresh(tok), "mile-tests/blip-vqa-not-cached")
    text = str(err.value)
    assert "Hugging Face cache" in text and "HF_HUB_OFFLINE" in text and "hf download mile-tests/blip-vqa-not" in text


# ---------------------------------------------------------------------------------------- failures


def test_missing_files_and_unknown_types(tok, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(_fresh(tok), tmp_path / "nope.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")  # any file but .safetensors is read as a pickle
    with pytest.raises(CheckpointError, match=r"weights\.npz: not a readable PyTorch checkpoint"):
        load_weights(_fresh(tok), tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: not a loadable Hugging Face BLIP VQA folder"):
        load_weights(_fresh(tok), tmp_path / "empty")


def test_corrupt_files_fail_clearly(tok, tmp_path):
    model = _fresh(tok)
    for seed in range(8):  # random bytes break the unpickler in many different ways
        junk = random.Random(seed).randbytes(4096)
        (tmp_path / "junk.pth").write_bytes(junk)
        with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint \(corrupt"):
            load_weights(model, tmp_path / "junk.pth")
    zipped = tmp_path / "cut.pth"  # a zip archive cut short
    torch.save({"w": torch.zeros(1000)}, zipped)
    zipped.write_bytes(zipped.read_bytes()[:-300])
    (tmp_path / "empty.pth").write_bytes(b"")
    for bad in (zipped, tmp_path / "empty.pth"):
        with pytest.raises(CheckpointError, match=rf"{bad.name}: not a readable PyTorch checkpoint"):
            load_weights(model, bad)
    (tmp_path / "junk.safetensors").write_bytes(junk)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_weights(model, tmp_path / "junk.safetensors")


def test_files_that_are_not_state_dicts(tok, tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict.*got a list"):
        load_weights(_fresh(tok), tmp_path / "list.pth")
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth: expected a state dict.*got 'epoch': int"):
        load_weights(_fresh(tok), tmp_path / "mixed.pth")


@pytest.fixture()
def blip_tiny(tiny):
    return _to_blip(tiny.state_dict())


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
    _fails(_fresh(tok), blip_tiny, tmp_path, "shape mismatches, checkpoint vs model (1)",
           f"vision_model.encoder.layers.0.mlp.fc1.weight: (7, {hidden}) vs ({mlp}, {hidden})")


def test_missing_key_is_named(tok, blip_tiny, tmp_path):
    del blip_tiny["text_encoder.encoder.layer.1.crossattention.self.key.bias"]
    _fails(_fresh(tok), blip_tiny, tmp_path, "missing keys",
           "text_encoder.encoder.layer.1.crossattention.self.key.bias")


def test_unexpected_key_is_named(tok, blip_tiny, tmp_path):
    blip_tiny["visual_encoder.blocks.0.attn.rel_pos"] = torch.zeros(3)
    blip_tiny["text_encoder.pooler.dense.weight"] = torch.zeros(128, 128)
    _fails(_fresh(tok), blip_tiny, tmp_path, "unexpected keys, in the checkpoint but not in the model (2)",
           "visual_encoder.blocks.0.attn.rel_pos", "text_encoder.pooler.dense.weight")


def test_long_key_lists_are_truncated(tok, blip_tiny, tmp_path):
    sd = {k: v for k, v in blip_tiny.items() if not k.startswith("text_decoder.")}
    text = _fails(_fresh(tok), sd, tmp_path, "missing keys", "... and")
    assert len(text.splitlines()) < 30


def test_blip_pretraining_heads_are_dropped_with_reasons(tok, blip_tiny):
    blip_tiny.update({"itm_head.weight": torch.zeros(2, 128), "temp": torch.tensor(0.07),
                      "visual_encoder_m.cls_token": torch.zeros(1, 1, 128), "image_queue": torch.zeros(4, 4)})
    report = load_weights(_fresh(tok), blip_tiny)
    assert {"itm_head.weight", "temp", "visual_encoder_m.cls_token", "image_queue"} <= set(report["dropped"])
    assert "momentum" in report["dropped"]["visual_encoder_m.cls_token"]


def test_tied_tensors_that_disagree_are_refused(tok, blip_tiny):
    w = "text_decoder.cls.predictions.decoder.weight"
    blip_tiny[w] = blip_tiny[w] + 1
    with pytest.raises(CheckpointError, match="ties them"):
        load_weights(_fresh(tok), blip_tiny)


def test_another_vocabulary_is_refused_naming_the_shapes(tok, tiny, blip_tiny, tmp_path):
    n, width = tiny.text_encoder.embeddings.word_embeddings.weight.shape
    key = "text_encoder.embeddings.word_embeddings.weight"
    blip_tiny[key] = blip_tiny[key][: n - 2].clone()  # bert-base-uncased without [DEC], [ENC]
    _fails(_fresh(tok), blip_tiny, tmp_path, f"{key}: ({n - 2}, {width}) vs ({n}, {width})")
