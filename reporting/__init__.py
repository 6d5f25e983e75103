"""Multi-seed reproduction of the paper's tables and figures from run folders (issues 5, 13).

runs.py         find, validate and read run folders; a run's method (fedavg, centralized, centralized_matched)
tables.py       statistics over seeds (mean, std, Student-t 95% CI), headline comparisons per pair, Markdown/CSV
convergence.py  the convergence round under several definitions (loss progress 0.90/0.95/0.99, alignment gain)
verdicts.py     which of the paper's claims hold against each baseline; whether a definition flips a verdict
figures.py      the paper's Fig. 2-5, compute-normalised Fig. 2/4 and worst-group alignment (matplotlib, Agg)
predictions.py  Fig. 3 data: one question, two evaluation groups, truth vs both methods
sections.py     the report's text sections; report.py assembles docs/results/<name>.md from them
pipeline.py     train every (method, seed) into its own folder (reuse / resume / refuse), then report
compare.py      variants (strategies, DP noise levels) against a baseline, paired by seed
paths.py        paths as committed files show them (relative to the repository)
"""
