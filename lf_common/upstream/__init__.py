"""What is left of the former home of the private upstream APIs: the two Optuna adapters, which the Optuna
sweeper's replacement deletes (delete this package with them).

Every other adapter lives beside its one user, named ``<upstream>_private.py`` (e.g.
``trainer/strategies/lightning_private.py``), with the contract record of :mod:`lf_common.upstream_contract`:

* :mod:`.hydra_optuna_private`: hydra-optuna-sweeper's ``_impl`` (the sweep's steps);
* :mod:`.optuna_private`: a study's storage, to reach a trial by its number.
"""
