"""The experiment harness behind the ``kfe`` command: configs, training, ablations.

Modules: :mod:`~kfe.experiment.config` (the YAML schema), :mod:`~kfe.experiment.setup`
(config to live objects), :mod:`~kfe.experiment.train` (the loop),
:mod:`~kfe.experiment.run_dir` (the run folder: claim, resume, checkpoint, metrics),
:mod:`~kfe.experiment.ablate` (grids); ``kfe report`` is :mod:`~kfe.experiment.report`,
which reads runs with :mod:`~kfe.experiment.runs`, selects configurations with
:mod:`~kfe.experiment.selection` and writes :mod:`~kfe.experiment.plots` and
:mod:`~kfe.experiment.summary`.
"""
