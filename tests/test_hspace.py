"""h-space hooks on the 256 px CelebA-HQ DDPM architecture (random weights) and on tiny UNets."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from facelab.diffusion import Denoiser, Schedule, h_module, hspace

FIXTURE = Path(__file__).parent / "fixtures" / "ddpm-celebahq-256"


def no_hooks(unet):
    return all(not m._forward_hooks for m in unet.modules())


@pytest.fixture(scope="module")
def celebahq_unet():
    config = json.loads((FIXTURE / "unet" / "config.json").read_text())
    return UNet2DModel.from_config(config).eval()


def test_celebahq_h_shapes_capture_and_cleanup(celebahq_unet):
    """One 256 px forward (seconds on a CPU): h at all three locations, through an identity edit."""
    unet = celebahq_unet
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hspace(unet, "after", capture=True, edit=lambda h: h) as after, \
            hspace(unet, "before", capture=True) as before, hspace(unet, "middle", capture=True) as middle:
        out = unet(x, 500).sample
    assert no_hooks(unet)
    assert after[0].shape == before[0].shape == middle[0].shape == (1, 512, 8, 8)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[0], middle[0])
    with pytest.raises(RuntimeError, match="boom"), hspace(unet, "after", capture=True), \
            hspace(unet, "middle", edit=lambda h: h + 1):
        assert not no_hooks(unet)
        raise RuntimeError("boom")
    assert no_hooks(unet)


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unets():
    torch.manual_seed(0)
    pixel = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    conditional = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                       block_out_channels=(16, 32),
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                       norm_num_groups=8, attention_head_dim=8)
    return {"pixel": pixel.eval(), "conditional": conditional.eval()}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("kind", ["pixel", "conditional"])
@pytest.mark.parametrize("where", ["after", "before", "middle"])
def test_edit_semantics(kind, where):
    unet = tiny_unets()[kind]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = {"encoder_hidden_states": torch.randn(2, 4, 8)} if kind == "conditional" else {}

    def run():
        return unet(x, 100, **kwargs).sample

    with torch.no_grad():
        base = run()
        with hspace(unet, where, capture=True) as hs:
            assert torch.equal(run(), base)
        with hspace(unet, where, capture=True, edit=lambda h: h) as identity:
            assert torch.equal(run(), base)
        delta = torch.zeros_like(hs[0])
        delta[1] = 0.5  # shift sample 1 only
        with hspace(unet, where, capture=True, edit=lambda h: h + delta) as shifted:
            edited = run()
    assert torch.equal(identity[0], hs[0]) and torch.equal(shifted[0], hs[0])  # the recorded h is un-shifted
    assert torch.equal(edited[0], base[0]) and not torch.allclose(edited[1], base[1])
    assert no_hooks(unet)


@pytest.mark.usefixtures("single_thread")
def test_capture_without_detach_lets_gradients_flow():
    unet = tiny_unets()["pixel"]
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    with hspace(Denoiser(unet, Schedule()), "after", capture=True, detach=False) as hs:
        unet(x, 10)
    (grad,) = torch.autograd.grad(hs[0].square().sum(), x)
    assert grad.abs().sum() > 0
    with hspace(unet, "after", capture=True) as detached:
        unet(x, 10)
    assert not detached[0].requires_grad


def test_h_module_locations():
    unet = tiny_unets()["pixel"]
    assert h_module(unet) is unet.mid_block
    assert h_module(unet, "before") is unet.down_blocks[-1]
    assert h_module(unet, "middle") is unet.mid_block.resnets[1].norm2
    with pytest.raises(ValueError, match="location"):
        h_module(unet, "inside")


def test_hextract_inverts_any_labelled_source_in_batches(tiny_model_dir, tmp_path):
    """method=hextract with +source=images and a CelebA-style attribute file: the file's labels, every image inverted
    in the run's batches (load_range)."""
    from conftest import compose
    from facelab.data.hspace import HSpaceDataset
    from facelab.diffusion import ddim_invert
    from facelab.io.errors import InputError
    from facelab.io.images import save_image
    from facelab.models.pretrained import load_denoiser
    from facelab.sample import run_sample
    from facelab.sources import ImageFolderSource

    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c"):
        save_image(torch.rand(3, 16, 16, generator=gen) * 2 - 1, tmp_path / "faces" / f"{name}.png")
    (tmp_path / "attrs.txt").write_text("3\nMale Smiling\na.png 1 -1\nb.png -1 -1\nc.png 1 1\n")
    base = ["method=hextract", f"model.pretrained={tiny_model_dir}", "sampler.steps=3", "batch_size=2",
            "progress=false", "device=cpu", "+source=images", f"source.path={tmp_path / 'faces'}",
            f"source.attributes={tmp_path / 'attrs.txt'}"]
    metrics = run_sample(compose("sample", [*base, "method.attributes=[Smiling,Male]"], tmp_path / "run"))
    dataset = HSpaceDataset(tmp_path / "run" / "hspace")
    assert metrics["num_images"] == 3 and dataset.meta["attributes"] == {"Smiling": 2, "Male": 2}
    assert dataset.meta["label_source"] == "source:ImageFolderSource" and metrics["network_calls_per_image"] == 3
    assert [dataset[i]["labels"].tolist() for i in range(3)] == [[0, 1], [0, 0], [1, 1]]
    denoiser = load_denoiser(str(tiny_model_dir), "cpu")
    images = ImageFolderSource(tmp_path / "faces").load(16).images
    hs = torch.cat([ddim_invert(denoiser, denoiser.schedule, batch, metrics["grid"], capture_h="after",
                                progress=False).hs for batch in images.split(2)], 1)  # the run's batches
    for i in range(3):
        torch.testing.assert_close(dataset[i]["h"].float(), hs[:, i].flatten(1).half().float())
    with pytest.raises(InputError, match=r"method.attributes=\['Young'\]: give some of the inputs' labels Male"):
        run_sample(compose("sample", [*base, "method.attributes=[Young]"], tmp_path / "bad"))
    with pytest.raises(InputError, match="method.source=trajectory samples its own faces"):
        run_sample(compose("sample", [*base, "method.source=trajectory"], tmp_path / "bad2"))
