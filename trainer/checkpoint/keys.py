"""The keys of a latentforge training checkpoint (a Lightning ``.ckpt`` or a DeepSpeed folder's client state).

Besides Lightning's own entries (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``global_step``, ``loops``, ``callbacks``, each data module's state):

* ``state_dict``: the raw (trained) weights, ``unet.*`` (and ``text_encoder.*`` when DreamBooth
  trains it), what every strategy loads back into the model on resume;
* :data:`EMA_STATE_KEY`: the EMA of the weights that train (same names; a LoRA run's: its adapters), when the EMA
  callback is on; the frozen weights of the EMA model are those of ``state_dict``;
* :data:`CHECKPOINT_KEY`: what rebuilds the model without the training code: ``unet_config``,
  ``noise_scheduler_config``, ``lora`` / ``text_encoder_lora`` (adapter settings), :data:`TEXT_ENCODER_KEYS`, and
  the run's ``train_config``, ``latent_manifest`` and ``global_step`` (provenance).
"""

CHECKPOINT_KEY = "latentforge"
"""The project's own record in a checkpoint (configs to rebuild the model, provenance)."""

EMA_STATE_KEY = "ema_state_dict"
"""The EMA of the trained parameters (``state_dict``'s names, ``unet.*``); ``state_dict`` holds the raw weights.
Checkpoints of the earlier EMA callback hold every weight here."""

RAW_STATE_KEY = "current_model_state"
"""Where :func:`trainer.checkpoint.reading.load_checkpoint` puts the raw weights when the checkpoint has
an EMA (``state_dict`` then holds the EMA); also the on-disk key of Lightning's ``WeightAveraging``
layout (older checkpoints)."""

TEXT_ENCODER_KEYS = "text_encoder_keys"
"""In :data:`CHECKPOINT_KEY`: where a text encoder's adapters are in ``state_dict`` when the encoder is held under
another name than ``text_encoder.`` / ``text_encoder_2.`` (pivotal tuning's ``text_encoders.0.``, whose base weights
are the pretrained ones): ``{"text_encoder": "text_encoders.0.", "text_encoder_2": "text_encoders.1."}``."""
