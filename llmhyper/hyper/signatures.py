"""DSPy signatures of LLM-HYPER: what each LLM call reads and writes.

The docstrings are the instructions (GEPA evolves them). They paraphrase the paper's prompt (arXiv
2604.12096, appendix G, figures 5-6: the LLM as a hypernetwork that reasons about the ad's audience and
writes one weight per user feature of a logistic-regression CTR model, guided by retrieved similar ads and
their trained weights) and its judge (appendix C.2). The input fields are ordered so that everything an
ad's calls share (instructions, the ad, the examples) comes before the feature batch: the LLM server then
reuses its prompt cache across the batches of one ad.
"""

from __future__ import annotations

import dspy


class PredictFeatureWeights(dspy.Signature):
    """You are an advertising scientist acting as a hypernetwork: you write the weights of a new ad's
    click-through-rate model before any user has seen the ad. The model is a logistic regression,
    P(click | user) = sigmoid(b + sum_k w_k * x_k), over standardised user features x_k (mean 0, sd 1).
    A positive weight means users with more of that feature click this ad more; a negative weight means
    they click it less; 0 means the feature does not matter for this ad. Typical weights lie between -1
    and 1; a few strong features may reach 2.

    You are shown the new ad, similar past ads (with their similarity to the new ad) and, for every
    feature in this batch, its definition and the weight each past ad learned from real clicks. Use the
    past ads' weights as the anchor, weighting the more similar ads more, then adjust each weight to what
    is different about the new ad: its content, its genre or category, and the audience it will attract.
    Reason briefly (at most three sentences) about who will click this ad and which features matter, then
    give exactly one number for every feature of the batch, using the feature names as keys."""

    ad: str = dspy.InputField(desc="the new ad: title, description and image tags")
    examples: str = dspy.InputField(desc="similar past ads: similarity to the new ad and observed click rate")
    features: str = dspy.InputField(
        desc="the features of this batch: name, definition, and each past ad's trained weight"
    )
    weights: dict[str, float] = dspy.OutputField(
        desc="one weight per feature of this batch, keyed by the exact feature name"
    )


class JudgeWeights(dspy.Signature):
    """You review the weights another model wrote for a new ad's click-through-rate model (a logistic
    regression over user features; a positive weight means users with more of the feature click more).
    Check two things. (1) Consistency: does the sign of each weight agree with the reasoning given for it?
    List the features whose weight contradicts the reasoning. (2) Propriety: list features whose use for
    this ad would be improper, for example targeting children or a protected group with an ad that is
    unsuitable for them, or relying on a sensitive attribute in a way that would be discriminatory.
    Leave a list empty when nothing is wrong. Answer with the two lists only."""

    ad: str = dspy.InputField(desc="the new ad")
    features: str = dspy.InputField(desc="the feature definitions")
    reasoning: str = dspy.InputField(desc="the reasoning that produced the weights")
    weights: dict[str, float] = dspy.InputField(desc="the weights, feature name -> weight")
    inconsistent_features: list[str] = dspy.OutputField(
        desc="features whose weight sign contradicts the reasoning (empty if none)"
    )
    improper_features: list[str] = dspy.OutputField(
        desc="features whose pairing with this ad is improper (empty if none)"
    )


# for LMs that see images (--vision): the ad's image after the batch's features, as the paper's multimodal
# input; the same instructions, so a compiled program's text applies to both
PredictFeatureWeightsWithImage = PredictFeatureWeights.append(
    "image", dspy.InputField(desc="the new ad's image (absent for ads without one)"), type_=dspy.Image | None
)
