"""Console scripts: sida-convert, sida-export, sida-sample, sida-eval, sida-ref-stats (entry points in setup.cfg)."""
