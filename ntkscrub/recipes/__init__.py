"""Applications built on the ntkscrub engine: data sets, models, training recipes (and, from the
next commits, the pipeline runtime and the §5 reproduction).

The engine (params, batches, operators, solvers, scrub, noise, bounds, readouts, baselines) sits in
the package root and never imports from here except for the training loop that the relearn
readout and the training baselines run.
"""
