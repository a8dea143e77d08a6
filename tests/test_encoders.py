"""Encoders: the real offline MiniLM + EfficientNet-Lite0 (ConSE) encoder, the ad-embedding cache, errors.

Tests marked `slow` load the real models (MiniLM ~5 s, EfficientNet <1 s; the 1000-class ConSE table is
built once into the user cache, cache_dir()/encoders/, and reused by later runs). They run by default.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest

import llmhyper.retrieval.encoders as enc_mod
from llmhyper import _lazy
from llmhyper.retrieval.encoders import (
    DEFAULT_ENCODER,
    EmbeddingCache,
    Encoder,
    MiniLMEffNetEncoder,
    OpenClipEncoder,
    UnknownEncoder,
    ad_key,
    embed_ads,
    get_encoder,
    l2_normalize,
)
from llmhyper.errors import DataError, MissingDependency
from llmhyper.retrieval.imagenet_classes import IMAGENET_CLASSNAMES

POSTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml100k-posters" / "images"
POSTER_IDS = ("1", "2", "82")  # Toy Story, GoldenEye, Jurassic Park


def _unit(x: np.ndarray, dim: int) -> None:
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == dim
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# a tiny fake encoder: the generic rules (encode_ads, cache) without loading any model
# ------------------------------------------------------------------------------------------------
class CountingEncoder(Encoder):
    name = "fake-counting"
    dim = 8

    def __init__(self):
        self.text_calls = self.image_calls = 0
        self.texts_seen: list[str] = []

    @staticmethod
    def _vec(s: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).normal(size=8)

    def encode_texts(self, texts):
        self.text_calls += 1
        self.texts_seen += list(texts)
        return l2_normalize(np.array([self._vec("t:" + t) for t in texts]).reshape(-1, 8))

    def encode_images(self, image_paths):
        self.image_calls += 1
        return l2_normalize(np.array([self._vec("i:" + Path(p).read_bytes().hex()) for p in image_paths]))

    def caption(self, image_path, top=3):
        return "poster image tags: fake"


@pytest.fixture()
def images(tmp_path):
    """Synthetic pictures drawn with PIL: a non-square RGB scene, a small RGBA logo, a greyscale one."""
    from PIL import Image, ImageDraw

    scene = Image.new("RGB", (300, 180), (30, 90, 200))
    d = ImageDraw.Draw(scene)
    d.ellipse((40, 30, 160, 150), fill=(250, 200, 20))
    d.rectangle((180, 60, 280, 170), fill=(200, 30, 30))
    d.text((190, 20), "SALE", fill=(255, 255, 255))
    logo = Image.new("RGBA", (64, 96), (0, 0, 0, 0))
    ImageDraw.Draw(logo).polygon([(32, 5), (60, 90), (4, 90)], fill=(20, 160, 60, 255))
    grey = Image.fromarray((np.indices((120, 120)).sum(0) % 256).astype(np.uint8), mode="L")
    out = {"scene": tmp_path / "scene.jpg", "logo": tmp_path / "logo.png", "grey": tmp_path / "grey.png"}
    scene.save(out["scene"], quality=90)
    logo.save(out["logo"])
    grey.save(out["grey"])
    return {k: str(v) for k, v in out.items()}


def test_encode_ads_is_the_normalised_mean_of_text_and_image(images):
    e = CountingEncoder()
    texts = ["summer sale", "winter coats", "no picture"]
    paths = [images["scene"], images["logo"], None]
    got = e.encode_ads(texts, paths)
    t, i = e.encode_texts(texts), e.encode_images(paths[:2])
    _unit(got, 8)
    np.testing.assert_allclose(got[0], (t[0] + i[0]) / np.linalg.norm(t[0] + i[0]), atol=1e-6)
    np.testing.assert_allclose(got[1], (t[1] + i[1]) / np.linalg.norm(t[1] + i[1]), atol=1e-6)
    np.testing.assert_allclose(got[2], t[2], atol=1e-6)  # text only
    with pytest.raises(ValueError, match="2 texts but 1 image"):
        e.encode_ads(["a", "b"], [None])
    assert e.encode_ads([], []).shape == (0, 8)


def test_cache_hit_avoids_re_encoding(tmp_path, images):
    e = CountingEncoder()
    ids = ["a1", "a2", "a3", "a4"]
    texts = ["red shoes", "blue bag", "green hat", "red shoes"]  # a4 duplicates a1's content
    paths = [images["scene"], None, images["logo"], images["scene"]]
    first = embed_ads(e, ids, texts, paths, tmp_path / "emb", progress=False)
    assert e.texts_seen == ["red shoes", "blue bag", "green hat"]  # the duplicate is encoded once
    np.testing.assert_allclose(first, e.encode_ads(texts, paths), atol=1e-6)
    e.text_calls = e.image_calls = 0
    again = embed_ads(e, ids, texts, paths, tmp_path / "emb", progress=False)
    assert (e.text_calls, e.image_calls) == (0, 0)
    np.testing.assert_array_equal(again, first)
    # one changed ad (new text) is the only one re-encoded; the image bytes are part of the key too
    e.texts_seen = []
    edited = ["red shoes", "blue bag!", "green hat", "red shoes"]
    embed_ads(e, ids, edited, paths, tmp_path / "emb", progress=False)
    assert e.texts_seen == ["blue bag!"]
    Path(images["logo"]).write_bytes(Path(images["scene"]).read_bytes())
    e.texts_seen = []
    embed_ads(e, ids, texts, paths, tmp_path / "emb", progress=False)
    assert e.texts_seen == ["green hat"]
    # the on-disk form: JSON index + .npy matrix, one matrix file kept
    cache = EmbeddingCache(tmp_path / "emb", e.name, e.dim)
    assert len(cache) == 5
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 1
    assert len(list((tmp_path / "emb").glob("*.json"))) == 1
    # another encoder name does not see these vectors
    assert len(EmbeddingCache(tmp_path / "emb", "other", 8)) == 0


def test_cache_survives_a_corrupt_index(tmp_path):
    e = CountingEncoder()
    embed_ads(e, ["x"], ["hello"], None, tmp_path, progress=False)
    next(tmp_path.glob("*.json")).write_text("{not json")
    e.text_calls = 0
    out = embed_ads(e, ["x"], ["hello"], None, tmp_path, progress=False)
    assert e.text_calls == 1 and out.shape == (1, 8)


def test_ad_key_and_missing_image_in_embed_ads(tmp_path, images):
    assert ad_key("t", None) != ad_key("t", images["scene"]) != ad_key("u", images["scene"])
    with pytest.raises(DataError, match="nope.jpg") as info:
        embed_ads(CountingEncoder(), ["ad7"], ["t"], [str(tmp_path / "nope.jpg")], tmp_path, progress=False)
    assert "ad7" in str(info.value)
    with pytest.raises(ValueError, match="2 ids, 1 texts"):
        embed_ads(CountingEncoder(), ["a", "b"], ["t"], None, tmp_path)


def test_get_encoder_specs():
    with pytest.raises(UnknownEncoder, match="minilm-effnet-conse.*open_clip:ARCH"):
        get_encoder("clip-vit-b32")
    with pytest.raises(UnknownEncoder, match="open_clip:ARCH:/path"):
        get_encoder("open_clip:ViT-B-32")
    a = get_encoder()
    assert isinstance(a, MiniLMEffNetEncoder) and a.name == DEFAULT_ENCODER and a.dim == 384
    assert get_encoder(DEFAULT_ENCODER) is a  # shared per spec
    assert a._text is None and a._image is None  # nothing loaded yet: models load lazily
    assert copy.deepcopy(a) is a
    assert isinstance(get_encoder(DEFAULT_ENCODER, topk=5), MiniLMEffNetEncoder)


def test_missing_extra_names_it(monkeypatch, tmp_path):
    """Simulate uninstalled extras: `require` is asked for a module that does not exist."""
    def missing(module, extra, purpose=""):
        return _lazy.require("llmhyper_not_installed_" + module.replace(".", "_"), extra, purpose)

    monkeypatch.setattr(enc_mod, "require", missing)
    with pytest.raises(MissingDependency, match=r'\.\[encoders\]'):
        MiniLMEffNetEncoder().encode_texts(["hello"])
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(MissingDependency, match=r'\.\[clip\]'):
        get_encoder(f"open_clip:ViT-B-32:{ckpt}")


def test_open_clip_absent_names_the_clip_extra(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed here")
    with pytest.raises(MissingDependency, match=r"open_clip.*\.\[clip\]"):
        OpenClipEncoder("ViT-B-32", tmp_path / "ckpt.pt")


# ------------------------------------------------------------------------------------------------
# the real embedded encoder
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box were slower
    yield MiniLMEffNetEncoder()
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_minilm_similar_sentences_are_closer(real):
    v = real.encode_texts(["A cartoon film about toys that come alive",
                           "An animated movie where children's toys talk",
                           "Quarterly tax filing deadline for small businesses"])
    _unit(v, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


@pytest.mark.slow
def test_images_map_to_unit_vectors_in_text_space(real, images):
    paths = [images["scene"], images["logo"], images["grey"]]
    v = real.encode_images(paths)
    _unit(v, 384)
    assert real.encode_images([]).shape == (0, 384)
    # ConSE vectors are mixtures of the class-prompt embeddings, cached on disk as .npy
    table = real.class_table()
    assert table.shape == (1000, 384) and table.dtype == np.float32
    assert list((enc_mod.paths.cache_dir() / "encoders").glob("imagenet-classes-*.npy"))
    ads = real.encode_ads(["Summer sale on sunglasses", "Green tea", "Plain text ad"],
                          [paths[0], paths[1], None])
    _unit(ads, 384)
    t = real.encode_texts(["Summer sale on sunglasses", "Plain text ad"])
    np.testing.assert_allclose(ads[0], (t[0] + v[0]) / np.linalg.norm(t[0] + v[0]), atol=1e-5)
    np.testing.assert_allclose(ads[2], t[1], atol=1e-5)
    f = real.image_features(paths[:1])
    _unit(f, 1280)


@pytest.mark.slow
def test_caption_returns_imagenet_class_names(real, images):
    cap = real.caption(images["scene"], top=3)
    prefix, _, tags = cap.partition(": ")
    assert prefix == "poster image tags"
    names = tags.split(", ")
    assert len(names) == 3 and len(set(names)) == 3 and all(n in IMAGENET_CLASSNAMES for n in names)


@pytest.mark.slow
def test_real_posters(real):
    paths = [POSTERS / f"{i}.jpg" for i in POSTER_IDS]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"posters not found under {POSTERS}")
    v = real.encode_ads(["Toy Story (1995)", "GoldenEye (1995)", "Jurassic Park (1993)"], paths)
    _unit(v, 384)
    caps = real.captions(paths, top=2)
    assert all(c.startswith("poster image tags: ") for c in caps)
    assert all(n in IMAGENET_CLASSNAMES for c in caps for n in c.split(": ", 1)[1].split(", "))


@pytest.mark.slow
def test_missing_or_broken_image_raises_data_error(real, tmp_path):
    with pytest.raises(DataError, match="missing-poster.jpg.*not found"):
        real.encode_images([str(tmp_path / "missing-poster.jpg")])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg.*cannot read image"):
        real.caption(bad)


@pytest.mark.slow
def test_embed_ads_with_the_real_encoder_uses_the_cache(real, tmp_path, images, monkeypatch):
    ids, texts, paths = ["1", "2"], ["Summer sale", "Winter sale"], [images["scene"], None]
    first = embed_ads(real, ids, texts, paths, tmp_path, progress=False)
    _unit(first, 384)

    def boom(*a, **k):
        raise AssertionError("re-encoded despite the cache")

    monkeypatch.setattr(real, "encode_ads", boom)
    np.testing.assert_array_equal(embed_ads(real, ids, texts, paths, tmp_path, progress=False), first)


# ------------------------------------------------------------------------------------------------
# optional real CLIP (open_clip) with a tiny random-weights model
# ------------------------------------------------------------------------------------------------
def test_open_clip_encoder_with_a_tiny_random_checkpoint(tmp_path, images, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))  # its class table is throwaway
    import json

    import torch

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "llmhyper-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model = open_clip.create_model("llmhyper-tiny-vit")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)

    e = get_encoder(f"open_clip:llmhyper-tiny-vit:{ckpt}")
    assert isinstance(e, OpenClipEncoder) and e.dim == 32
    assert e.name.startswith("open_clip:llmhyper-tiny-vit:")
    t = e.encode_texts(["a cat", "a rocket"])
    i = e.encode_images([images["scene"], images["logo"]])
    _unit(t, 32)
    _unit(i, 32)
    _unit(e.encode_ads(["a cat", "no image"], [images["grey"], None]), 32)
    names = e.caption(images["scene"], top=2).split(": ", 1)[1].split(", ")
    assert len(names) == 2 and all(n in IMAGENET_CLASSNAMES for n in names)
    with pytest.raises(DataError, match="nope.png"):
        e.encode_images([str(tmp_path / "nope.png")])
