"""Faults a long run meets, handled below the Lightning layer: preemption signals, what each rank is
doing (the phase board that single-rank work and the hang watchdog use) and the hang watchdog.

The callbacks that put them into a training run are :mod:`trainer.callbacks.preemption` and
:mod:`trainer.callbacks.hangs`.
"""
