"""deqkern's benchmarks: ``python -m bench`` runs the suites (see ``bench/__main__.py``);
each ``bench/bench_<suite>.py`` also runs alone, and ``python bench/plot.py DIR`` draws
the plots from a results folder."""
