"""Pathology patch encoders: every registry entry built with random weights (real ones are gated and cannot be
downloaded here), saved as a local checkpoint, loaded through the registry, and checked for its embedding width
and preprocessing; the real ImageNet tf_efficientnet_lite0 from ../shared through ``timm:``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from medvision.models.encoders import (
    ENCODERS,
    EncoderError,
    PatchEncoder,
    build_network,
    encoder_spec,
    load_encoder,
)

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
    tiles = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(weights)}).eval()  # fmt: skip
    with torch.inference_mode():
        ours = encoder(tiles)
        theirs = reference((tiles.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(ours, theirs, atol=1e-5)  # the real weights, the head dropped, pooled 1280-d
    # embed takes the batches as the readers stack them, (B, H, W, 3), and gives the same embeddings
    as_read = [tiles.permute(0, 2, 3, 1).contiguous().numpy()[:1], tiles.permute(0, 2, 3, 1).contiguous().numpy()[1:]]
    embedded = encoder.embed(as_read, torch.device("cpu"))
    assert embedded.shape == (2, 1280) and np.allclose(embedded, ours.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"tile batch of shape \(2, 3, 224, 224\): expected uint8 \(B, H, W, 3\)"):
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
