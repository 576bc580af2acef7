"""Pathology patch encoders: every registry entry built with random weights (real ones are gated and cannot be
downloaded here), saved as a local checkpoint, loaded through the registry, and checked for its embedding width
and preprocessing; the real ImageNet tf_efficientnet_lite0 from ../shared through ``timm:``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from medvision.models.encoders import (
    ENCODERS,
    IN_FLIGHT,
    EncoderError,
    PatchEncoder,
    build_network,
    checkpoint_sha256,
    encoder_spec,
    load_encoder,
)
from medvision.models.heads import feature_width

#: Slow on a CPU (random init, save and load of 0.3-1.1 B parameters, up to 4.5 GB each): run with -m slow.
#: UNI (ViT-L, 0.3 B) stays in the default run as the representative ViT entry.
GIANT = {"uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "phikon-v2"}


def _save_random(name: str, tmp_path: Path) -> Path:
    """The entry's architecture with random weights, written as its card's checkpoint would be."""
    spec = encoder_spec(name)
    torch.manual_seed(0)
    if spec.library == "transformers":
        from transformers import Dinov2Config, Dinov2Model

        # phikon-v2 is a DINOv2 ViT-L/16 at 224 px (its card); config.json travels with the weights
        net = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096, patch_size=16, image_size=224))  # fmt: skip
        net.save_pretrained(tmp_path / name)
        return tmp_path / name
    net = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in GIANT else n for n in ENCODERS]
)  # fmt: skip
def test_every_entry_loads_from_a_local_checkpoint(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = encoder_spec(name)
    if spec.library == "transformers":
        pytest.importorskip("transformers")
    checkpoint = _save_random(name, tmp_path)
    monkeypatch.setenv(spec.env, str(checkpoint))  # the offline path: an environment variable per encoder
    encoder, sha = load_encoder(name)
    assert len(sha) == 64 and not any(p.requires_grad for p in encoder.parameters())
    tiles = torch.randint(0, 256, (2, 3, spec.tile_size, spec.tile_size), dtype=torch.uint8)
    with torch.inference_mode():
        out = encoder(tiles)
    assert out.shape == (2, spec.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    x = encoder.preprocess(tiles)
    assert x.shape == (2, 3, spec.input_size, spec.input_size)
    flat = encoder.preprocess(torch.full((1, 3, spec.tile_size, spec.tile_size), 200, dtype=torch.uint8))
    expected = (200 / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(flat[0, :, 5, 5], expected, atol=1e-5)  # the card's normalisation, per channel


def test_registry_entries_say_where_they_come_from() -> None:
    for name in ENCODERS:
        spec = encoder_spec(name)
        assert spec.dim > 0 and spec.source.startswith("https://huggingface.co/") and spec.mpp == 0.5
        assert spec.env.startswith("MEDVISION_ENCODER_") and spec.env.replace("_", "").isalnum()
    assert encoder_spec("virchow2").pooling == "cls+mean" and encoder_spec("virchow2").prefix_tokens == 5
    assert encoder_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)


def test_timm_encoder_with_the_real_imagenet_weights(shared: Path) -> None:
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    encoder, sha = load_encoder("timm:tf_efficientnet_lite0", weights)
    assert encoder.dim == 1280 and encoder.spec.mean == (0.5, 0.5, 0.5) and len(sha) == 64
    tiles = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(weights)}).eval()  # fmt: skip
    with torch.inference_mode():
        ours = encoder(tiles)
        theirs = reference((tiles.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(ours, theirs, atol=1e-5)  # the real weights, the head dropped, pooled 1280-d
    # embed takes the batches as the readers stack them, (B, H, W, 3), and gives the same embeddings in their order,
    # with more batches than it keeps in flight (IN_FLIGHT) and batches of any size
    stacked = tiles.permute(0, 2, 3, 1).contiguous().numpy()
    as_read = [stacked[:2], stacked[2:3], stacked[3:4], stacked[4:]]
    embedded = encoder.embed(as_read, torch.device("cpu"))
    assert len(as_read) > IN_FLIGHT and embedded.shape == (5, 1280) and np.allclose(embedded, ours.numpy(), atol=1e-5)
    assert encoder.embed([], torch.device("cpu")).shape == (0, 1280)
    with pytest.raises(ValueError, match=r"tile batch of shape \(5, 3, 224, 224\): expected uint8 \(B, H, W, 3\)"):
        encoder.embed([tiles.numpy()], torch.device("cpu"))


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EncoderError, match="unknown encoder 'unii'; known: uni, uni2-h"):
        encoder_spec("unii")
    monkeypatch.delenv("MEDVISION_ENCODER_UNI", raising=False)
    with pytest.raises(EncoderError, match=r"MEDVISION_ENCODER_UNI=/path/to/weights.*huggingface\.co/MahmoodLab/UNI"):
        load_encoder("uni")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("uni", tmp_path / "nope.bin")
    wrong = tmp_path / "lite0.safetensors"
    save_file(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), str(wrong))
    with pytest.raises(EncoderError, match="does not fit vit_large_patch16_224"):
        build_network(encoder_spec("uni"), wrong)
    with pytest.raises(EncoderError, match="timm has no model"):
        encoder_spec("timm:no_such_net")
    assert isinstance(load_encoder("timm:resnet18", _resnet(tmp_path))[0], PatchEncoder)


def _resnet(tmp_path: Path) -> Path:
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)  # a classifier checkpoint, head included
    return path


#: Parameters of each entry built as its card says (timm 1.0.31; the cards give 0.3 B for UNI, 0.68 B for UNI2-h,
#: 0.63 B for Virchow2 and 1.1 B for H-optimus-0 and Prov-GigaPath): a changed construction argument changes them.
PARAMETERS = {"uni": 303_350_784, "uni2-h": 681_394_176, "virchow2": 631_239_424, "h-optimus-0": 1_134_774_272,
              "prov-gigapath": 1_134_953_984}  # fmt: skip


def test_every_timm_entry_has_its_cards_size() -> None:
    assert set(PARAMETERS) == {n for n in ENCODERS if encoder_spec(n).library == "timm"}
    for name, count in PARAMETERS.items():
        spec = encoder_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            net = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
        assert sum(p.numel() for p in net.parameters()) == count, name
        assert feature_width(net) == (spec.dim if spec.pooling != "cls+mean" else spec.dim // 2), name


@pytest.mark.parametrize(("name", "shape"), [("prov-gigapath", (224, 224)), ("uni", (224, 301)), ("uni", (256, 256)),
                                             ("prov-gigapath", (300, 257))])  # fmt: skip
def test_resize_and_crop_are_torchvisions(name: str, shape: tuple[int, int]) -> None:
    """Resize(shorter side) then CenterCrop, as the cards compose them: Prov-GigaPath upsamples a 224 px tile to 256
    and crops 224 (not a no-op), the longer side is truncated, the crop offset rounded."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    spec = encoder_spec(name)
    encoder = PatchEncoder(spec, torch.nn.Identity())  # preprocessing only: the network is not involved
    tiles = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8)
    mode = tvf.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else tvf.InterpolationMode.BILINEAR
    assert spec.resize is not None
    ref = tvf.center_crop(tvf.resize(tiles.float() / 255, spec.resize, mode, antialias=True), [spec.input_size] * 2)
    ours = encoder.preprocess(tiles) * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(
        1, 3, 1, 1
    )
    assert ours.shape == ref.shape and torch.allclose(ours, ref.clamp(0, 1), atol=1e-5)


def test_hub_path_records_the_cached_weights_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--checkpoint hub`` through timm's real hub loader, offline: a hub cache holding a snapshot (random weights;
    no network here). The recorded SHA-256 is the cached file's, so these features and those embedded from a local
    copy of the same file are one feature space; the width is timm's pooled one (MobileNetV3: 1024, not 288)."""
    from huggingface_hub import constants

    arch = "mobilenetv3_small_050"
    cfg = timm.get_pretrained_cfg(arch)
    assert cfg is not None and cfg.hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    save_file(timm.create_model(arch).state_dict(), str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 1000,
                                                      "pretrained_cfg": cfg.to_dict()}))  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub, hub_sha = load_encoder(f"timm:{arch}", "hub")
    local, local_sha = load_encoder(f"timm:{arch}", snapshot / "model.safetensors")
    assert hub_sha == local_sha == checkpoint_sha256(snapshot) and len(hub_sha) == 64
    tiles = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        assert hub.dim == local.dim == 1024 and torch.equal(hub(tiles), local(tiles))
    assert hub.spec.interpolation == "bicubic"  # timm's own for this model


def test_the_hub_hash_finds_the_cache_of_either_spelling_of_the_hub_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prov-GigaPath's card writes ``hf_hub:``, timm's configs ``hf-hub:``: both name the same cached snapshot,
    whose weights' hash is recorded, not the ``hub:`` placeholder."""
    from huggingface_hub import constants

    from medvision.models.encoders import hub_sha256

    spec = encoder_spec("prov-gigapath")
    assert spec.hub.startswith("hf_hub:")
    snapshot = tmp_path / "hub" / "models--prov-gigapath--prov-gigapath" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("1" * 40)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "pytorch_model.bin").write_bytes(b"weights")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_sha256(spec) == checkpoint_sha256(snapshot) == hashlib.sha256(b"weights").hexdigest()


def test_folder_hash_covers_every_shard(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"first shard")
    (tmp_path / "b.safetensors").write_bytes(b"second shard")
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(b"first shardsecond shard").hexdigest()
    (tmp_path / "b.safetensors").write_bytes(b"another second shard")
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(b"first shardanother second shard").hexdigest()
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(EncoderError, match=r"b\.safetensors: weight shard named by .* index is missing"):
        checkpoint_sha256(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(EncoderError, match=r"empty: no weights in the folder \(expected model\.safetensors"):
        checkpoint_sha256(empty)


def test_the_hashed_weights_are_those_the_loader_reads(tmp_path: Path) -> None:
    """transformers loads model.safetensors, then its sharded index, before pytorch_model.bin: a folder with sharded
    safetensors and a stale .bin is hashed by its safetensors shards."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"stale torch file")
    (tmp_path / "s1.safetensors").write_bytes(b"shard one")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "s1.safetensors"}}))
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(b"shard one").hexdigest()
    (tmp_path / "model.safetensors").write_bytes(b"one file")
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(b"one file").hexdigest()


def _tiny_transformers(tmp_path: Path) -> Path:
    """A tiny DINOv2 folder (64-d) whose second block's weights are missing from the checkpoint."""
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   patch_size=16, image_size=224))  # fmt: skip
    net.save_pretrained(tmp_path / "partial")
    weights = tmp_path / "partial" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if "encoder.layer.1." not in k}, str(weights), metadata={"format": "pt"})
    return tmp_path / "partial"


def test_a_transformers_checkpoint_is_loaded_strictly_and_its_width_checked(tmp_path: Path) -> None:
    """AutoModel fills missing parameters with random values and only logs it: that is an error here, naming the
    folder and the keys. A complete folder of another ViT loads, but its 48-d embedding is not phikon-v2's 1024."""
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTModel

    partial = _tiny_transformers(tmp_path)
    with pytest.raises(EncoderError, match=rf"'phikon-v2': the weights in {partial} do not fit its Dinov2Model "
                                           r"\(config.json\): 18 missing keys \(encoder\.layer\.1\."):  # fmt: skip
        load_encoder("phikon-v2", partial)
    ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                       image_size=224, patch_size=16)).save_pretrained(tmp_path / "vit")  # fmt: skip
    with pytest.raises(EncoderError, match=r"gives embeddings of shape \(48,\), expected \(1024,\).*"
                                           "MEDVISION_ENCODER_PHIKON_V2=PATH"):  # fmt: skip
        load_encoder("phikon-v2", tmp_path / "vit")


def test_every_encoders_width_is_checked_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry entry whose network gives another width than its ``dim`` would write files that say one width
    and hold another: refused when the encoder is loaded, before any slide."""
    from medvision.models import encoders

    spec = encoders.EncoderSpec("tiny", "resnet18", {"num_classes": 0}, dim=1024, source="https://huggingface.co/x")
    monkeypatch.setitem(encoders._ENTRIES, "tiny", lambda: spec)
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    with pytest.raises(EncoderError, match=rf"'tiny': {path} gives embeddings of shape \(512,\), expected \(1024,\)"):
        load_encoder("tiny", path)
    monkeypatch.setitem(encoders._ENTRIES, "tiny", lambda: replace(spec, dim=512))
    assert load_encoder("tiny", path)[0].dim == 512


def test_checkpoints_that_cannot_be_loaded_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder given to a timm entry, a truncated file and an offline hub download are EncoderErrors (exit 2) that
    name the encoder, the path and the environment variable, not internal errors."""
    from huggingface_hub import constants

    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(folder / "model.safetensors"))
    with pytest.raises(EncoderError, match=rf"'timm:resnet18': checkpoint {folder} is a folder \(the weights in it: "
                                           r".*safetensors\).*MEDVISION_ENCODER_TIMM_RESNET18=PATH"):  # fmt: skip
        load_encoder("timm:resnet18", folder)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(EncoderError, match=rf"'timm:resnet18': {cut} cannot be read as weights \(SafetensorError"):
        load_encoder("timm:resnet18", cut)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, env in [
        ("timm:resnet18", "MEDVISION_ENCODER_TIMM_RESNET18"),
        ("phikon-v2", "MEDVISION_ENCODER_PHIKON_V2"),
    ]:
        if name == "phikon-v2":
            pytest.importorskip("transformers")
        with pytest.raises(EncoderError, match=rf"'{name}': the hub download of .* failed .*{env}=PATH"):
            load_encoder(name, "hub")
