# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 - Report
#
# Assembles `REPORT.md` in the study's results folder from the metrics and tables the earlier stages wrote: parameters, timings, the accuracy table and figure, FID/KID, filtering and guidance. No number is typed in by hand. Figure links are relative to the results folder: open `REPORT.md` there to see them.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
from IPython.display import Markdown, display

from hdlib.paths import StudyPaths
from hdlib.stages.common import setup_notebook
from hdlib.stages.report import build_report

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %%
report = build_report(cfg)
display(Markdown(report.read_text()))
