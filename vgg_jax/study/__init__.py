"""The paper's experiments in miniature (``--mode=study``): plan, run, judge, report."""
