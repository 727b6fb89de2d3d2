"""The tuner and the tuned-config store (``sbbench tune``, ``sbbench export``).

* :mod:`sbbench.autotune.tuner` runs one resumable Optuna study per tuned-config key
  (``run_tuning(TuneSettings(...))``), timing and checking every trial through the harness in
  a worker process (:mod:`sbbench.autotune.worker`);
* :mod:`sbbench.autotune.sampler` holds the search spaces and the sampler that never runs a
  config twice (TPE, or the exhaustive grid);
* :mod:`sbbench.autotune.store` names the studies and opens the storage;
* :mod:`sbbench.autotune.export` writes the best feasible configs in the format of
  :mod:`sbbench.core.config_loader`, which the backends read.

Nothing is imported here: worker processes import :mod:`sbbench.autotune.worker` alone and
should not pay for Optuna.

Scripts that call ``run_tuning`` must guard their entry point with
``if __name__ == "__main__":``, as for any program that starts processes with ``spawn``.
"""
