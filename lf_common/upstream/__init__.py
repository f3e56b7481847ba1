"""The one home of the private upstream APIs latentforge uses: one adapter module per upstream.

Code elsewhere in the project uses only public upstream APIs and these adapters. Each adapter's
docstring says which private names it uses, what for and why no public API does it; its
``CONTRACTS`` list them, and ``tests/unit/test_upstream_contracts.py`` checks each against the
installed versions, so an upgrade that changes one fails there with a line naming the upstream, its
version and the adapter to update.

* :mod:`.lightning_private`: ``ModelCheckpoint``, ``WeightAveraging``, ``ThroughputMonitor``,
  ``DeepSpeedStrategy``, ``FSDPStrategy`` and ``WandbLogger`` internals;
* :mod:`.deepspeed_private`: the ops DeepSpeed marks compatible, to skip its CPU shared-memory
  all-reduce op (inference only; compiling it took most of a CPU ZeRO test's time);
* :mod:`.torch_private`: ``torch._foreach_lerp_`` and a ``DataLoader``'s persistent workers;
* :mod:`.peft_integration_private`: the adapters flag of transformers' and diffusers' peft integration.

Importing one adapter imports only its own upstream.
"""
