"""Write data/example/: a tiny data set in the llmhyper contract, drawn from the synthetic generator.

    python data/make_example.py     # rewrites data/example/ (deterministic, seed 0)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llmhyper.data.synthetic import generate_synthetic

OUT = Path(__file__).parent / "example"


def main() -> None:
    syn = generate_synthetic(n_users=60, n_warm=10, n_cold=2, seed=0)
    d = syn.data
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "ads.jsonl", "w") as f:
        for ad in d.ads:
            rec = ad.model_dump(mode="json", exclude_none=True)
            if ad.id in d.cold_ads:
                rec["metadata"]["cold"] = True  # its impressions then serve only for evaluation
            f.write(json.dumps(rec) + "\n")
    pd.DataFrame([f.model_dump() for f in d.features]).to_csv(OUT / "features.csv", index=False)
    users = pd.DataFrame(d.X.round(4), columns=d.feature_names)
    users.insert(0, "user", d.user_ids)
    users.to_csv(OUT / "users.csv", index=False)
    rows = [{"user": d.user_ids[u], "ad": d.ads[a].id, "clicked": int(d.Y[u, a]),
             "time": f"2024-02-{1 + (u + a) % 28:02d}T12:00:00"}
            for u in range(len(d.user_ids)) for a in range(len(d.ads)) if (u + a) % 3 == 0]
    pd.DataFrame(rows).to_csv(OUT / "impressions.csv", index=False)
    print(f"wrote {OUT}: {len(d.ads)} ads, {len(d.user_ids)} users, {len(rows)} impressions")


if __name__ == "__main__":
    main()
