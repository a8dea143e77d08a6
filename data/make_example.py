"""Write data/example/: a small data set in the llmhyper contract, drawn from the synthetic generator.

    python data/make_example.py     # rewrites data/example/ (deterministic, seed 0)

400 users, 30 warm ads and 6 cold ads (marked `{"cold": true}`). Each warm ad was shown to half the users,
enough clicks (at least 20 among the train users) for its warm model; each cold ad was shown to every user,
and those impressions serve only for evaluation. Big enough for `llmhyper evaluate --data data/example` and
`llmhyper generate --data data/example ...`, small enough to read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llmhyper.data.synthetic import generate_synthetic

OUT = Path(__file__).parent / "example"
N_USERS, N_WARM, N_COLD = 400, 30, 6


def main() -> None:
    syn = generate_synthetic(n_users=N_USERS, n_warm=N_WARM, n_cold=N_COLD, seed=0)
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
            for u in range(len(d.user_ids)) for a in range(len(d.ads)) if a >= N_WARM or (u + a) % 2 == 0]
    pd.DataFrame(rows).to_csv(OUT / "impressions.csv", index=False)
    print(f"wrote {OUT}: {len(d.ads)} ads, {len(d.user_ids)} users, {len(rows)} impressions")


if __name__ == "__main__":
    main()
