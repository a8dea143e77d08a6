"""A synthetic CTR world with known true weights, for tests and for checking that each stage recovers them.

Ads are about one or two topics; a user's interest features for those topics raise the click probability,
so ads on the same topic have similar true weights (retrieval has something to find) and the text says
what the ad is about (an LLM has something to read). Images are optional: a flat-colour PNG per topic.

`unseen_topics=True` builds a world where only the text can tell: the users also have interest features
for topics in UNSEEN_TOPICS (described in words, like the others), every cold ad is about one of those
topics and no retired ad is. A cold ad's true weights load on its topic's interest feature, which no
retired ad's weights do, so neither retrieval nor a prior learned from retired ads can know them; reading
the ad ("for people into gardening") against the feature definitions can. The default world is unchanged.
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
UNSEEN_TOPICS = {
    "gardening": ("seed collection", "pruning shears", "raised garden bed", "watering can", "compost bin"),
    "pets": ("dog bed", "cat scratching post", "aquarium kit", "pet carrier", "bird feeder"),
    "music": ("acoustic guitar", "digital piano", "studio headphones", "concert tickets", "vinyl records"),
}
COLOURS = {
    "sports": (220, 40, 40),
    "cooking": (240, 160, 30),
    "travel": (30, 120, 220),
    "tech": (90, 90, 90),
    "fashion": (200, 60, 180),
    "gardening": (40, 160, 60),
    "pets": (150, 100, 50),
    "music": (60, 40, 160),
}


@dataclass
class Synthetic:
    data: CTRData
    truth: WeightTable  # the true weights of every ad (warm and cold)


def feature_specs(unseen_topics: bool = False) -> list[FeatureSpec]:
    topics = list(TOPICS) + (list(UNSEEN_TOPICS) if unseen_topics else [])
    specs = [
        FeatureSpec(
            name=f"interest_{t}", description=f"how strongly the user engages with {t} content (standardised)"
        )
        for t in topics
    ]
    specs += [
        FeatureSpec(name="age", description="the user's age (standardised)"),
        FeatureSpec(name="activity", description="how many ads the user clicked last month (standardised)"),
    ]
    return specs


def generate_synthetic(
    *,
    n_users: int = 400,
    n_warm: int = 60,
    n_cold: int = 12,
    seed: int = 0,
    image_dir: str | Path | None = None,
    noise: float = 0.15,
    base_ctr: float = 0.12,
    test_share: float = 0.25,
    unseen_topics: bool = False,
) -> Synthetic:
    rng = np.random.default_rng(seed)
    specs = feature_specs(unseen_topics)
    products = {**TOPICS, **(UNSEEN_TOPICS if unseen_topics else {})}
    features = list(products)  # interest features, in spec order
    d = len(specs)
    X = rng.standard_normal((n_users, d))
    ads, thetas, bs = [], [], []
    n_ads = n_warm + n_cold
    for i in range(n_ads):
        # retired ads (and, by default, cold ones too) are about the seen topics; unseen-topic cold ads
        # only about the new ones
        topics = list(UNSEEN_TOPICS) if unseen_topics and i >= n_warm else list(TOPICS)
        main = topics[i % len(topics)]
        second = topics[rng.integers(len(topics))] if rng.random() < 0.3 else None
        product = products[main][rng.integers(len(products[main]))]
        theta = noise * rng.standard_normal(d)
        theta[features.index(main)] += 1.5
        if second and second != main:
            theta[features.index(second)] += 0.6
        theta[len(features)] += {"sports": -0.4, "fashion": -0.3, "travel": 0.3}.get(main, 0.0)  # age
        theta[len(features) + 1] += 0.3  # active users click more of everything
        b = np.log(base_ctr / (1 - base_ctr)) + 0.3 * rng.standard_normal()
        image = None
        if image_dir is not None:
            image = _poster(Path(image_dir), f"ad{i}", COLOURS[main])
        about = main + (f" and {second}" if second and second != main else "")
        ads.append(
            Ad(
                id=f"ad{i}",
                title=f"{product.title()} offer #{i}",
                text=f"An ad for a {product}, for people into {about}.",
                image=image,
                launch_date=date(2024, 1, 1) + timedelta(days=i),
                metadata={"topics": [main] + ([second] if second and second != main else [])},
            )
        )
        thetas.append(theta)
        bs.append(b)
    theta = np.array(thetas)
    intercept = np.array(bs)
    P = sigmoid(X @ theta.T + intercept)
    Y = (rng.random(P.shape) < P).astype(np.uint8)
    M = np.ones_like(Y, dtype=bool)
    train, test = split_users(n_users, test_share, seed)
    ids = [a.id for a in ads]
    card = {
        "source": "synthetic",
        "users": n_users,
        "warm_ads": n_warm,
        "cold_ads": n_cold,
        "seed": seed,
        "features": d,
        "ctr": float(Y.mean()),
    }
    if unseen_topics:
        card["unseen_topics"] = list(UNSEEN_TOPICS)
    name = "synthetic-unseen" if unseen_topics else "synthetic"
    truth = WeightTable("truth", ids, [s.name for s in specs], theta, intercept)
    data = CTRData(
        name,
        ads,
        specs,
        [f"u{i}" for i in range(n_users)],
        X,
        Y,
        M,
        train,
        test,
        ids[:n_warm],
        ids[n_warm:],
        card,
        truth,
    )
    return Synthetic(data, truth)


def _poster(folder: Path, name: str, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if not path.exists():
        Image.new("RGB", (64, 96), colour).save(path)
    return str(path)
