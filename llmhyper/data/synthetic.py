"""A synthetic CTR world with known true weights, for tests and for checking that each stage recovers them.

Ads are about one or two topics; a user's interest features for those topics raise the click probability,
so ads on the same topic have similar true weights (retrieval has something to find) and the text says
what the ad is about (an LLM has something to read). Images are optional: a flat-colour PNG per topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from llmhyper.data.contract import Ad, CTRData, FeatureSpec, split_users
from llmhyper.weights import WeightTable, sigmoid

TOPICS = {
    "sports": ("running shoes", "football boots", "tennis racket", "yoga mat", "cycling helmet"),
    "cooking": ("chef knife", "cast iron pan", "spice set", "stand mixer", "recipe book"),
    "travel": ("beach resort", "city break", "rail pass", "travel backpack", "ski chalet"),
    "tech": ("laptop", "wireless earbuds", "smart watch", "gaming console", "4k monitor"),
    "fashion": ("summer dress", "leather jacket", "silk scarf", "sneakers", "wool coat"),
}
COLOURS = {"sports": (220, 40, 40), "cooking": (240, 160, 30), "travel": (30, 120, 220),
           "tech": (90, 90, 90), "fashion": (200, 60, 180)}


@dataclass
class Synthetic:
    data: CTRData
    truth: WeightTable  # the true weights of every ad (warm and cold)


def feature_specs() -> list[FeatureSpec]:
    specs = [FeatureSpec(name=f"interest_{t}", description=f"how strongly the user engages with {t} content "
                                                            f"(standardised)") for t in TOPICS]
    specs += [FeatureSpec(name="age", description="the user's age (standardised)"),
              FeatureSpec(name="activity", description="how many ads the user clicked last month (standardised)")]
    return specs


def generate_synthetic(*, n_users: int = 400, n_warm: int = 60, n_cold: int = 12, seed: int = 0,
                       image_dir: str | Path | None = None, noise: float = 0.15, base_ctr: float = 0.12,
                       test_share: float = 0.25) -> Synthetic:
    rng = np.random.default_rng(seed)
    specs = feature_specs()
    topics = list(TOPICS)
    d = len(specs)
    X = rng.standard_normal((n_users, d))
    ads, thetas, bs = [], [], []
    n_ads = n_warm + n_cold
    for i in range(n_ads):
        main = topics[i % len(topics)]
        second = topics[rng.integers(len(topics))] if rng.random() < 0.3 else None
        product = TOPICS[main][rng.integers(len(TOPICS[main]))]
        theta = noise * rng.standard_normal(d)
        theta[topics.index(main)] += 1.5
        if second and second != main:
            theta[topics.index(second)] += 0.6
        theta[len(topics)] += {"sports": -0.4, "fashion": -0.3, "travel": 0.3}.get(main, 0.0)  # age
        theta[len(topics) + 1] += 0.3  # active users click more of everything
        b = np.log(base_ctr / (1 - base_ctr)) + 0.3 * rng.standard_normal()
        image = None
        if image_dir is not None:
            image = _poster(Path(image_dir), f"ad{i}", COLOURS[main])
        about = main + (f" and {second}" if second and second != main else "")
        ads.append(Ad(id=f"ad{i}", title=f"{product.title()} offer #{i}",
                      text=f"An ad for a {product}, for people into {about}.", image=image,
                      launch_date=date(2024, 1, 1) + timedelta(days=i),
                      metadata={"topics": [main] + ([second] if second and second != main else [])}))
        thetas.append(theta)
        bs.append(b)
    theta = np.array(thetas)
    intercept = np.array(bs)
    P = sigmoid(X @ theta.T + intercept)
    Y = (rng.random(P.shape) < P).astype(np.uint8)
    M = np.ones_like(Y, dtype=bool)
    train, test = split_users(n_users, test_share, seed)
    ids = [a.id for a in ads]
    card = {"source": "synthetic", "users": n_users, "warm_ads": n_warm, "cold_ads": n_cold, "seed": seed,
            "features": d, "ctr": float(Y.mean())}
    data = CTRData("synthetic", ads, specs, [f"u{i}" for i in range(n_users)], X, Y, M, train, test,
                   ids[:n_warm], ids[n_warm:], card)
    truth = WeightTable("truth", ids, [s.name for s in specs], theta, intercept)
    return Synthetic(data, truth)


def _poster(folder: Path, name: str, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if not path.exists():
        Image.new("RGB", (64, 96), colour).save(path)
    return str(path)
