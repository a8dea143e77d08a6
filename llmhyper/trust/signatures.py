"""DSPy signatures of the trust studies: a judge that reads the weight program's reasoning, and an editor that
rewrites an ad for a counterfactual. Their docstrings are the instructions (paraphrasing the paper's appendix
C-E: Consistency Rate, and the enhanced / diminished / neutralised rewrites of figure 7)."""

from __future__ import annotations

import dspy


class JudgeReasoningStance(dspy.Signature):
    """You read the short reasoning another model wrote before it set the weights of a new ad's
    click-through-rate model (a logistic regression over user features). For every listed feature, say what
    the reasoning implies about it: "positive" if the reasoning says users with more of that feature are
    more likely to click this ad, "negative" if it says they are less likely to click, "neutral" if it says
    the feature does not matter for this ad, and "not_mentioned" if the reasoning says nothing about it
    (neither by name nor by what the feature measures). Judge the reasoning text only. Answer with one label
    per feature, keyed by the exact feature name."""

    ad: str = dspy.InputField(desc="the ad the reasoning is about")
    features: str = dspy.InputField(desc="the features to label: name and what it measures")
    reasoning: str = dspy.InputField(desc="the reasoning to read")
    stances: dict[str, str] = dspy.OutputField(
        desc="feature name -> one of positive, neutral, negative, not_mentioned"
    )


class RewriteAd(dspy.Signature):
    """You edit ad copy for a controlled experiment on how an ad's audience changes. Rewrite the ad's title
    and description as the change asks, for the target audience: the users who score high on the target
    feature. "enhanced": make the ad appeal MORE to them (stress what they like). "diminished": make it
    appeal LESS to them (remove or turn away from what they like, while staying a real ad). "neutralised":
    make it neither attract nor repel them (remove every cue aimed at them or against them). Keep everything
    else as it is: the same product (for a movie, the same film and release date), similar length and
    style, no mention of the experiment."""

    ad: str = dspy.InputField(desc="the ad: title and description")
    target: str = dspy.InputField(desc="the target feature: name and what it measures")
    change: str = dspy.InputField(desc="enhanced, diminished or neutralised, with what that means here")
    rewritten_title: str = dspy.OutputField(desc="the new title")
    rewritten_text: str = dspy.OutputField(desc="the new description")
