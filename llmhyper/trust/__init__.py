"""Trust studies of generated weights (paper appendix B-E and section 4.4), each resumable and LLM-agnostic:

- `explain`: HitRate@5 / Coverage@5 of the top-weighted features against each ad's ground-truth features,
  for a generate run and any WeightTable; Consistency Rate of reasoning vs weight signs (an LLM judge);
- `robustness`: counterfactual rewrites (enhanced / diminished / neutralised) and direction accuracy;
- `ablation`: 0/3/5 shots, no image caption, hidden titles, as generate runs scored in one table;
- `costs`: what each study costs in LLM calls and hours;
- `settings`: what a study takes over from the generate run it checks (typed settings, the LMs).

Command line: `llmhyper trust explain | robustness | ablate | estimate` (`llmhyper.cli.trust`);
`llmhyper report` (`llmhyper.report`) puts everything in one self-contained HTML page.
"""
