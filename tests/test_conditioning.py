"""Text conditioning that can bind, and absolute position: padding masks, refiner layers, layer mixes and
coordinate channels, in the models, the pipelines and training (U-Net and DiT, DDPM and flow, DDP)."""

from __future__ import annotations

import pytest
import torch
from test_training import EXACT_FLAGS, TINY_FLAGS, cli, final_weights, metrics, run_cli, write_folder

from cyclediffusion import Text2ImagePipeline, TextEncoder, TextEncoderConfig, Tokenizer
from cyclediffusion.models.unet import SpatialTransformer, with_coordinates
from cyclediffusion.training.options import ModelOptions

from helpers import randomise_zeros, tiny_denoiser, tiny_tokenizer, train


def encoder(**options) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(vocab_size=50, max_length=8, width=32, layers=2, heads=2, **options)).eval()


IDS = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0]])  # bos, three words, eos, padding


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_padding_mask_changes_nothing_without_padding_and_removes_its_influence(backbone):
    torch.manual_seed(0)
    net = tiny_denoiser(backbone, 3, 8).eval()
    randomise_zeros(net)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    context, pooled = torch.randn(2, 6, 32), torch.randn(2, 32)
    with torch.no_grad():
        plain = net(x, t, context, pooled)
        all_real = net(x, t, context, pooled, torch.ones(2, 6, dtype=torch.bool))
        torch.testing.assert_close(all_real, plain, atol=1e-6, rtol=1e-5)
        mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
        other = context.clone()
        other[0, 4:], other[1, 3:] = torch.randn(2, 32), torch.randn(3, 32)  # new padding states
        torch.testing.assert_close(net(x, t, other, pooled, mask), net(x, t, context, pooled, mask))
        assert not torch.allclose(net(x, t, other, pooled), plain)  # unmasked, the padding does matter


def test_mm_dit_blocks_let_the_words_read_the_image_and_never_the_padding():
    """DiTConfig.joint_text: the text tokens are updated from the image tokens in every block but the last, which
    returns them untouched; masked (padding) tokens change nothing of either stream's real tokens."""
    from cyclediffusion.models.dit import JointDiTBlock

    torch.manual_seed(0)
    block, last = JointDiTBlock(32, 2), JointDiTBlock(32, 2, last=True)
    randomise_zeros(block), randomise_zeros(last)
    x, c, text = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    padded = text.clone()
    padded[0, 4:], padded[1, 3:] = torch.randn(2, 32), torch.randn(3, 32)
    with torch.no_grad():
        x_out, text_out = block(x, c, text, mask)
        text_moved = block(x + torch.randn_like(x), c, text, mask)[1]
        assert not torch.allclose(text_moved[mask], text_out[mask])  # the words read the image
        x_pad, text_pad = block(x, c, padded, mask)
        torch.testing.assert_close(x_pad, x_out)
        torch.testing.assert_close(text_pad[mask], text_out[mask])
        assert not torch.allclose(block(x, c, padded)[0], block(x, c, text)[0])  # unmasked, padding matters
        last_x, last_text = last(x, c, text, mask)
        assert last_text is text and not torch.allclose(last_x, x)
        assert not hasattr(last, "text_mlp")  # the last block's text stream ends at its keys and values


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_without_pooled_text_the_caption_acts_through_cross_attention_only(backbone):
    tok = tiny_tokenizer()
    options = {
        pooled: ModelOptions(backbone=backbone, model_size="tiny", text_width=32, pooled_text=pooled)
        for pooled in (True, False)
    }
    built = {pooled: o.build(tok, None, 8) for pooled, o in options.items()}
    assert built[True]["denoiser"].config.pooled_dim == 32 and built[False]["denoiser"].config.pooled_dim is None
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 12, 32)
    outputs = {}
    for pooled, parts in built.items():
        net = parts["denoiser"].eval()
        randomise_zeros(net)
        with torch.no_grad():
            outputs[pooled] = [net(x, t, context, torch.randn(2, 32)) for _ in range(2)]  # two pooled vectors
    assert not torch.allclose(*outputs[True])  # with it, the pooled state changes the output
    torch.testing.assert_close(*outputs[False], rtol=0, atol=0)  # without it, nothing but the context does


def test_refiner_layers_let_a_word_see_the_words_after_it_but_never_the_padding():
    later = IDS.clone()
    later[0, 3] = 9  # change the third word
    padded = IDS.clone()
    padded[0, 6] = 11  # change a padding token
    for refiner, sees_later in ((0, False), (1, True)):
        enc = encoder(refiner_layers=refiner)
        with torch.no_grad():
            a, b, c = enc(IDS), enc(later), enc(padded)
        assert torch.allclose(a.hidden_states[0, 1], b.hidden_states[0, 1]) != sees_later  # the first word
        torch.testing.assert_close(c.hidden_states[0, :5], a.hidden_states[0, :5])  # real tokens ignore padding
        torch.testing.assert_close(c.pooled, a.pooled)


def test_layer_mix_learns_a_weight_per_block_and_mask_padding_reports_the_real_tokens():
    enc = encoder(layer_mix=True, refiner_layers=1, mask_padding=True)
    assert enc.layer_weights.shape == (3,)
    out = enc(IDS)
    out.hidden_states.square().sum().backward()
    assert enc.layer_weights.grad is not None and enc.layer_weights.grad.abs().sum() > 0
    assert out.mask.tolist() == [[True] * 5 + [False] * 3]
    assert encoder().forward(IDS).mask is None  # off by default: old models attend to every position
    with torch.no_grad():  # a mix that puts all its weight on the last block is the plain encoder
        enc.layer_weights.copy_(torch.tensor([-1e9, -1e9, 0.0]))
        plain = encoder(refiner_layers=1)
        plain.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "layer_weights"})
        torch.testing.assert_close(enc(IDS).hidden_states, plain(IDS).hidden_states)


def test_coordinate_channels_hold_each_cells_row_and_column():
    x = torch.zeros(2, 4, 3, 5)
    out = with_coordinates(x)
    assert out.shape == (2, 6, 3, 5) and torch.equal(out[:, :4], x)
    assert out[0, 4, 0, 0] == -1 and out[0, 4, 2, 0] == 1 and torch.equal(out[0, 4, :, 0], out[0, 4, :, 4])  # rows
    assert out[0, 5, 0, 0] == -1 and out[0, 5, 0, 4] == 1 and torch.equal(out[1, 5, 0], out[1, 5, 2])  # columns
    tok = tiny_tokenizer()
    net = ModelOptions(model_size="tiny", coord_channels=True).build(tok, None, 8)["denoiser"]
    assert net.conv_in.in_channels == 5 and net.in_channels == 3
    randomise_zeros(net)
    image = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():  # the same flat input gets a position-dependent prediction
        out = net(image, torch.tensor([500.0]), torch.zeros(1, 4, 128), torch.zeros(1, 128))
    assert not torch.allclose(out[..., 1:3, 1:3], out[..., 5:7, 5:7])
    with pytest.raises(ValueError, match="U-Net option"):
        ModelOptions(backbone="dit", coord_channels=True).build(tok, None, 8)


def test_attention_positions_start_as_the_plain_model_and_tell_cells_apart():
    tok = tiny_tokenizer()
    plain = ModelOptions(model_size="tiny").build(tok, None, 8)["denoiser"]
    net = ModelOptions(model_size="tiny", attention_positions=True).build(tok, None, 8)["denoiser"]
    transformers = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    assert net.config.attention_positions and transformers and all(m.pos_proj is not None for m in transformers)
    assert all(m.pos_proj.weight.abs().sum() == 0 for m in transformers)  # zero-initialised
    net.load_state_dict(plain.state_dict(), strict=False)
    x, t, context, pooled = (
        torch.randn(2, 3, 8, 8),
        torch.tensor([300.0, 700.0]),
        torch.randn(2, 4, 128),
        torch.randn(2, 128),
    )
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context, pooled), plain(x, t, context, pooled))
    block = transformers[0]
    torch.nn.init.normal_(block.pos_proj.weight)
    torch.nn.init.normal_(block.proj_out.weight)
    flat = torch.ones(1, block.proj_in.in_features, 4, 4)  # the same features in every cell
    with torch.no_grad():
        out = block(flat, torch.zeros(1, 4, 128))
        block.pos_proj = None  # without it every cell gets the same output
        same = block(flat, torch.zeros(1, 4, 128))
    assert torch.allclose(same, same[..., :1, :1].expand_as(same))
    assert not torch.allclose(out[..., 0, 0], out[..., 3, 3], atol=1e-3)  # positions told apart
    with pytest.raises(ValueError, match="U-Net option"):
        ModelOptions(backbone="dit", attention_positions=True).build(tok, None, 8)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_pipelines_pass_the_padding_mask_to_every_branch(backbone):
    tok = tiny_tokenizer()
    parts = ModelOptions(backbone=backbone, model_size="tiny", text_width=32, mask_padding=True, text_refiner_layers=1)
    pipe = Text2ImagePipeline(tok, vae=None, **parts.build(tok, None, 8)).eval()
    seen = []
    forward = pipe.denoiser.forward
    pipe.denoiser.forward = lambda *a: seen.append(a[4]) or forward(*a)
    pipe(["a red square", "two yellow circles"], num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=2)
    mask = seen[0]
    lengths = tok(["", "a red square", "two yellow circles"]).attention_mask.sum(1)
    assert mask.shape == (8, tok.max_length)  # uncond and cond rows of 2 prompts x 2 images
    assert mask.sum(1).tolist() == [lengths[0]] * 4 + [lengths[1]] * 2 + [lengths[2]] * 2


def test_loss_is_logged_per_tenth_of_the_noise_scale(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", n=8)
    args = ["train", "--data", str(data), "--out", "run", "--steps", "3", "--batch-size", "8", *TINY_FLAGS]
    assert run_cli(*args, "--no-progress", cwd=tmp_path, monkeypatch=monkeypatch) == 0
    bins = {k for row in metrics(tmp_path / "run") for k in row if k.startswith("loss_by_noise/")}
    assert bins <= {f"loss_by_noise/bin{i}" for i in range(10)} and len(bins) > 4


def test_conditioning_options_train_the_dit_with_flow_under_ddp_as_in_one_process(tmp_path):
    data = write_folder(tmp_path / "data")
    new = ["--mask-padding", "--text-refiner-layers", "1", "--text-layer-mix"]
    common = ["--data", str(data), "--steps", "1", *TINY_FLAGS, "--accelerator", "cpu", "--ema-decay", "0", *new]
    common += ["--backbone", "dit", "--scheduler", "flow", *EXACT_FLAGS]
    cli("train", "--out", "single", "--batch-size", "8", *common, cwd=tmp_path)
    cli("train", "--out", "ddp", "--batch-size", "4", "--devices", "2", "--strategy", "ddp", *common, cwd=tmp_path)
    single = float(metrics(tmp_path / "single")[0]["train/loss"])
    assert abs(single - float(metrics(tmp_path / "ddp")[0]["train/loss"])) < 1e-5
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert any("layer_weights" in k for k in a) and any("refiner" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "single")
    assert pipe.text_encoder.config.mask_padding and pipe.text_encoder.config.refiner_layers == 1


def test_coordinate_channels_train_the_unet_with_ddpm(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", n=4)
    args = ["train", "--data", str(data), "--out", "run", "--steps", "2", "--batch-size", "4", *TINY_FLAGS]
    assert (
        run_cli(*args, "--coord-channels", "--mask-padding", "--no-progress", cwd=tmp_path, monkeypatch=monkeypatch)
        == 0
    )
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "run")
    assert pipe.denoiser.config.coord_channels and pipe("a red square", num_inference_steps=2).images[0].size == (
        16,
        16,
    )


def left_right_world(n: int = 32, size: int = 8) -> tuple[torch.Tensor, list[str]]:
    """``n`` images in [-1, 1]: a bright 3x3 square in the left or the right half (rows jittered), captioned so."""
    g = torch.Generator().manual_seed(0)
    images, captions = torch.full((n, 3, size, size), -0.6), []
    for i in range(n):
        side = "left" if i % 2 == 0 else "right"
        x = int(torch.randint(0, 2, (1,), generator=g)) + (0 if side == "left" else size - 4)
        y = int(torch.randint(0, size - 2, (1,), generator=g))
        images[i, :, y : y + 3, x : x + 3] = 0.9
        captions.append(f"a square on the {side}")
    return images, captions


def test_the_dit_learns_where_the_caption_puts_the_object():
    """The words that name a place move the drawn object there (the demo's DiT recipe with a padding mask).

    A net that cannot tell left from right (every convolution sees the left and the right border alike) learns
    "somewhere on the horizontal axis" and draws both sides alike: the centres below would then be equal."""
    images, captions = left_right_world()
    tok = Tokenizer.train(captions, vocab_size=280, max_length=10)
    options = ModelOptions(backbone="dit", model_size="tiny", scheduler="flow", text_width=32, mask_padding=True)
    torch.manual_seed(0)
    pipe = Text2ImagePipeline(tok, vae=None, **options.build(tok, None, 8))
    before, after = train(pipe, images, captions, steps=250, lr=2e-3)
    assert after < 0.5 * before
    pipe.eval()
    drawn = pipe(["a square on the left", "a square on the right"], num_inference_steps=10, num_images_per_prompt=8,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    brightness = drawn.mean(1)  # (16, 8, 8) in [0, 1]; the background is 0.2
    weight = (brightness - 0.3).clamp(min=0).sum(1)  # (16, 8): how much object each column holds
    centre = (weight * torch.arange(8.0)).sum(1) / weight.sum(1).clamp(min=1e-6)
    left, right = centre[:8].mean(), centre[8:].mean()
    assert right - left > 1.5, (left, right)
