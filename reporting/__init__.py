"""Multi-seed reproduction of the paper's tables and figures from run folders (issue 5).

runs.py      find, validate and read run folders; per-seed numbers
tables.py    statistics over seeds (mean, std, Student-t 95% CI), headline comparisons, Markdown/CSV
figures.py   the paper's Fig. 2-5 and compute-normalised Fig. 2/4 (matplotlib, Agg)
predictions.py  Fig. 3 data: one question, two evaluation groups, truth vs both methods
report.py    docs/results/<name>.md written from the numbers
pipeline.py  train every (method, seed) into its own folder (reuse / resume / refuse), then report
"""
