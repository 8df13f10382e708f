"""The experiment harness behind the ``kfe`` command: configs, training, ablations.

Modules: :mod:`~kfe.experiment.config` (the YAML schema), :mod:`~kfe.experiment.setup`
(config to live objects), :mod:`~kfe.experiment.train` (the loop, checkpoints),
:mod:`~kfe.experiment.ablate` (grids), :mod:`~kfe.experiment.report` (plots).
"""
