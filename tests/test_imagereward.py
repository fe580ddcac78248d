"""ImageReward on transformers BLIP: parity with a plain-torch model written from the released architecture
(THUDM/ImageReward models/BLIP/vit.py, med.py, ImageReward.py), pixel gradients, PIL preprocessing, loader errors."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reward_forcing.errors import CheckpointError, UserError
from reward_forcing.rewards import imagereward as ir
from reward_forcing.testing.imagereward import write_tiny_imagereward

PROMPTS = ["a cat walks slowly across the green grass", "waves crash on a rocky beach at sunset, 4k"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_imagereward(tmp_path_factory.mktemp("ckpt"), seed=3)


@pytest.fixture(scope="module")
def model(folder):
    return ir.ImageReward.from_checkpoint(folder)


@pytest.fixture(scope="module")
def released(folder):
    return torch.load(folder / ir.CHECKPOINT_FILE, weights_only=True)


# ---- an independent reference, reading the released keys directly ----
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _attend(q, k, v, heads, bias=None):
    b, n, d = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def reference_vit(sd, pixels):
    """timm ViT as in BLIP's vit.py: pre-norm blocks (eps 1e-6), 64-wide heads, final norm."""
    p = "blip.visual_encoder."
    weight = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, sd[p + "patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[p + "pos_embed"]
    width, depth = x.shape[-1], len({k for k in sd if k.startswith(p + "blocks.") and k.endswith("norm1.weight")})
    for i in range(depth):
        b = f"{p}blocks.{i}."
        qkv = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attend(*qkv, heads=width // 64), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, p + "norm", 1e-6)


def reference_text(sd, med, ids, mask, image):
    """med.py BertModel in multimodal mode: post-norm self-attention (additive -10000 padding mask), unmasked
    cross-attention to every image token, GELU feed-forward."""
    p, eps, heads = "blip.text_encoder.", med["layer_norm_eps"], med["num_attention_heads"]
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = _ln(x, sd, p + "embeddings.LayerNorm", eps)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        l = f"{p}encoder.layer.{i}."
        a = l + "attention."
        h = _attend(_lin(x, sd, a + "self.query"), _lin(x, sd, a + "self.key"), _lin(x, sd, a + "self.value"), heads, bias)
        x = _ln(_lin(h, sd, a + "output.dense") + x, sd, a + "output.LayerNorm", eps)
        c = l + "crossattention."
        h = _attend(_lin(x, sd, c + "self.query"), _lin(image, sd, c + "self.key"), _lin(image, sd, c + "self.value"),
                    heads)
        x = _ln(_lin(h, sd, c + "output.dense") + x, sd, c + "output.LayerNorm", eps)
        f = _lin(F.gelu(_lin(x, sd, l + "intermediate.dense")), sd, l + "output.dense")
        x = _ln(f + x, sd, l + "output.LayerNorm", eps)
    return x


def reference_score(sd, med, pixels, ids, mask):
    out = reference_text(sd, med, ids, mask, reference_vit(sd, pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):  # ImageReward.py MLP: five linears, dropouts between, no activations
        out = _lin(out, sd, f"mlp.layers.{index}")
    return (out[:, 0] - 0.16717362830052426) / 1.0333394966054072


# ---- parity ----
def test_scores_match_the_reference_implementation(model, released, folder):
    med = json.loads((folder / ir.MED_CONFIG_FILE).read_text())
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=gen)
    ids, mask = model.tokenize(PROMPTS)
    assert mask[0].sum() < mask.shape[1] and ids.shape[1] == 35  # padded to the released length
    with torch.no_grad():
        ours = model(pixels, ids, mask)
        ref = reference_score(released, med, pixels, ids, mask)
    assert ours.shape == (2,) and ref.std() > 1e-3  # distinct scores for distinct inputs
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_tokenizer_follows_imagereward(model):
    tok = model.tokenizer
    base = len(tok) - 2
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1] and tok.bos_token == "[DEC]"
    ids, mask = model.tokenize(["a cat " * 40])  # truncated to 35 with [CLS] ... [SEP]
    assert ids.shape == (1, 35) and mask.all()
    assert ids[0, 0] == tok.convert_tokens_to_ids("[CLS]") and ids[0, -1] == tok.convert_tokens_to_ids("[SEP]")


def test_pixel_gradients_match_finite_differences(folder):
    double = ir.ImageReward.from_checkpoint(folder).double()
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(1, 3, 40, 72, generator=gen, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    double.score(images, PROMPTS[:1]).sum().backward()
    eps = 1e-4
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            plus = double.score(images + eps * v, PROMPTS[:1])
            minus = double.score(images - eps * v, PROMPTS[:1])
        numeric = ((plus - minus) / (2 * eps)).item()
        analytic = (images.grad * v).sum().item()
        assert abs(numeric) > 1e-6
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


# ---- preprocessing against the released PIL transform ----
def photo_like(h=480, w=832, seed=0):
    """A synthetic outdoor scene: sky gradient, textured ground with a wavy horizon, a sun, a house with a striped
    facade, sensor noise; hard edges and fine texture where resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([0.35 + 0.4 * (1 - y), 0.55 + 0.3 * (1 - y), 0.9 - 0.2 * y], -1)
    ground = y > 0.6 + 0.05 * np.sin(9 * x)
    texture = np.kron(rng.normal(size=(h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w]
    img[ground] = np.stack([0.25 + 0.08 * texture, 0.45 + 0.1 * texture, 0.15 + 0.05 * texture], -1)[ground]
    img[(x - 0.75) ** 2 * (w / h) ** 2 + (y - 0.2) ** 2 < 0.006] = [1.0, 0.95, 0.7]
    house = (x > 0.2) & (x < 0.38) & (y > 0.45) & (y < 0.75)
    img[house] = [0.6, 0.2, 0.15]
    img[house & (np.floor(x * 200) % 6 == 0)] = [0.2, 0.1, 0.05]
    img += rng.normal(scale=0.02, size=img.shape)
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def released_transform(array, size=224):
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, written with PIL calls only."""
    from PIL import Image

    h, w = array.shape[:2]
    long = int(size * max(h, w) / min(h, w))
    resized = np.asarray(Image.fromarray(array).resize((long, size) if h <= w else (size, long), Image.BICUBIC))
    top, left = round((resized.shape[0] - size) / 2), round((resized.shape[1] - size) / 2)
    return resized[top:top + size, left:left + size].astype(np.float64) / 255.0


@pytest.mark.parametrize("transpose", [False, True])
def test_preprocessing_matches_pil_bicubic(transpose):
    array = photo_like()
    if transpose:  # portrait: the long side is the height
        array = np.ascontiguousarray(array.transpose(1, 0, 2))
    expected = released_transform(array)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].double()
    ours = ir.preprocess(pixels, 224, "[0,255]")
    mean = torch.tensor(ir.CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(ir.CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    ours = (ours[0] * std + mean).permute(1, 2, 0).numpy()
    diff = np.abs(ours - expected) * 255  # in uint8 levels
    # PIL rounds (and clips) to uint8 after each 1-D pass; the torch path keeps floats. Bound: under one rounding
    # step on average, under two rounding steps times the kernel's gain almost everywhere. Measured: mean 0.28,
    # p99.9 0.89, max 3.8 (landscape) / 4.5 (portrait) levels, the max at saturated hard edges.
    assert ours.shape == (224, 224, 3)
    assert diff.mean() <= 0.5 and np.percentile(diff, 99.9) <= 1.5


def test_preprocessing_is_differentiable_and_sized():
    images = torch.zeros(2, 3, 480, 832, requires_grad=True)
    out = ir.preprocess(images, 224)
    assert out.shape == (2, 3, 224, 224)
    out.sum().backward()
    # The crop keeps resized columns 82..305 of 388, i.e. input columns ~176..655 of 832 (plus the kernel's reach).
    assert images.grad[:, :, :, 190:640].abs().min() > 0
    assert images.grad[:, :, :, :150].abs().max() == 0 and images.grad[:, :, :, 690:].abs().max() == 0


# ---- errors ----
def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "ImageReward"
    shutil.copytree(folder, target)
    return target


def test_missing_and_wrong_files_are_one_line_errors(folder, released, tmp_path):
    with pytest.raises(CheckpointError, match="no ImageReward.pt in"):
        ir.ImageReward.from_checkpoint(tmp_path)
    broken = _copy(folder, tmp_path)
    (broken / ir.MED_CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="med_config.json not found"):
        ir.ImageReward.from_checkpoint(tmp_path)  # the parent folder is accepted too
    (broken / ir.MED_CONFIG_FILE).write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="add_cross_attention"):
        ir.ImageReward.from_checkpoint(broken)
    (broken / ir.MED_CONFIG_FILE).write_bytes((folder / ir.MED_CONFIG_FILE).read_bytes())
    state = dict(released)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, broken / ir.CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=r"1 missing \(text.encoder.layer.1.crossattention.self.key.weight\)"):
        ir.ImageReward.from_checkpoint(broken)
    (broken / ir.CHECKPOINT_FILE).write_bytes((folder / ir.CHECKPOINT_FILE).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a torch.save file"):
        ir.ImageReward.from_checkpoint(broken)


def test_vocabulary_mismatch_is_reported(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    med = json.loads((broken / ir.MED_CONFIG_FILE).read_text())
    (broken / ir.MED_CONFIG_FILE).write_text(json.dumps(dict(med, vocab_size=med["vocab_size"] + 5)))
    with pytest.raises(CheckpointError, match="the tokenizer has .* tokens with \\[DEC\\] and \\[ENC\\]"):
        ir.ImageReward.from_checkpoint(broken)


# ---- CLI ----
def test_cli_scores_an_image_and_a_chosen_video_frame(model, folder, tmp_path, capsys):
    import imageio.v2 as imageio
    from PIL import Image

    from reward_forcing.errors import run_cli
    from reward_forcing.rewards.videoalign import read_video

    frames = [photo_like(64, 96, seed=s) for s in range(3)]
    Image.fromarray(frames[0]).save(tmp_path / "image.png")
    imageio.mimwrite(tmp_path / "video.mp4", frames, fps=8, macro_block_size=1)
    video = read_video(tmp_path / "video.mp4")[0]
    with torch.no_grad():
        expected = [model.score(released_pixels(tmp_path / "image.png", model.image_size), PROMPTS[:1], "[0,255]"),
                    model.score(video[:, :, 1], PROMPTS[:1], "[0,255]"),
                    model.score(video[:, :, 2], PROMPTS[:1], "[0,255]")]
    for args, want in ((["image.png"], expected[0]), (["video.mp4", "--frame", "1"], expected[1]),
                       (["video.mp4"], expected[2])):
        argv = ["--checkpoint_dir", str(folder), str(tmp_path / args[0]), PROMPTS[0], *args[1:]]
        assert run_cli(ir.main, argv) == 0
        assert capsys.readouterr().out.strip() == f"ImageReward: {want[0].item():.4f}"
    assert run_cli(ir.main, ["--checkpoint_dir", str(folder), str(tmp_path / "video.mp4"), "p", "--frame", "7"]) == 2
    assert capsys.readouterr().err.strip() == "error: --frame 7 is out of range for a video of 3 frames"
    assert run_cli(ir.main, ["--checkpoint_dir", str(tmp_path), str(tmp_path / "image.png"), "p"]) == 2
    assert capsys.readouterr().err.startswith("error: no ImageReward.pt in ")
    assert issubclass(ir.VideoInputError, UserError)


def released_pixels(path, size):
    """THUDM/ImageReward ImageReward.py `_transform` on Image.open(path) up to ToTensor, written with PIL calls:
    Resize(size, bicubic) of the image in its own mode, CenterCrop(size), then convert("RGB"); [1, 3, size, size]
    in 0..255."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        long = int(size * max(height, width) / min(height, width))
        image = image.resize((long, size) if height <= width else (size, long), Image.BICUBIC)
        left, top = int(round((image.width - size) / 2.0)), int(round((image.height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float()


def _palette_and_transparent_images(folder):
    from PIL import Image

    photo = photo_like(72, 104, seed=5)
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    alpha = (np.linspace(0, 255, 104)[None, :].repeat(72, 0)).astype(np.uint8)  # transparent left, opaque right
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(folder / "transparent.png")
    return {"palette.png": "P", "transparent.png": "RGBA"}


def test_cli_scores_palette_and_transparent_images_as_the_released_package(model, folder, tmp_path, capsys):
    """The released preprocess resizes before converting to RGB: PIL resizes a palette image by nearest neighbour
    and an RGBA one with premultiplied alpha, so converting first (as this CLI once did) scores otherwise."""
    from PIL import Image

    from reward_forcing.errors import run_cli

    for name, mode in _palette_and_transparent_images(tmp_path).items():
        path = tmp_path / name
        with Image.open(path) as image:
            assert image.mode == mode
            converted_first = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = model.score(released_pixels(path, model.image_size), PROMPTS[:1], "[0,255]")[0].item()
            other_order = model.score(converted_first.float(), PROMPTS[:1], "[0,255]")[0].item()
        assert abs(expected - other_order) > 1e-3  # the order matters for this image
        assert run_cli(ir.main, ["--checkpoint_dir", str(folder), str(path), PROMPTS[0]]) == 0
        assert capsys.readouterr().out.strip() == f"ImageReward: {expected:.4f}"


def test_released_sizes_build_vit_large_and_bert_base_of_the_published_file_size(folder, monkeypatch):
    """The released architecture on the meta device (no memory): ViT-L/16 at 224 px (24 layers, 16 heads) and
    BERT-base with 1024-wide cross-attention; fp32 parameters fill the published ~1.79 GB ImageReward.pt."""
    from reward_forcing.testing import imagereward as tiny_imagereward

    monkeypatch.setattr(tiny_imagereward._Random, "normal", lambda self, *shape, **_: torch.empty(shape, device="meta"))
    med = dict(json.loads((folder / ir.MED_CONFIG_FILE).read_text()), hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512, vocab_size=30524)
    state = tiny_imagereward.released_state_dict(med, vision=dict(width=1024, depth=24, patch=16, image_size=224,
                                                                  mlp=4096), head=(1024, 128, 64, 16, 1), proj_dim=256)

    class BertSizedTokenizer:  # bert-base-uncased (30522) + [DEC] + [ENC]
        def __len__(self):
            return 30524

    model = ir.ImageReward.from_state_dict(state, med, BertSizedTokenizer())
    vision = model.vision.config
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.image_size, vision.patch_size) == (24, 16, 224, 16)
    assert model.text.encoder.layer[0].crossattention.self.key.in_features == 1024
    size_gb = sum(v.numel() for v in state.values() if v.is_floating_point()) * 4 / 1e9
    assert size_gb == pytest.approx(1.79, abs=0.01)
