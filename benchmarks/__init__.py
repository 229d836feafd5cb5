"""fundl's benchmarks: ``python -m benchmarks [--suite mlp ...]`` (see ``__main__.py``).

The kit, which imports no benchmark: ``timing.py`` (interleaved rounds), ``costs.py``
(memory, FLOPs, MFU), ``report.py`` (table, JSON, plot), ``steps.py`` (train steps and
their measurement) and ``peers.py`` (the peer libraries, imported in one place). The cases:
``mlp_step``, ``cnn_step``, ``rnn_step``, ``attention_step``, ``transformer_step``,
``fit_bench`` and ``gpt2``; ``keras_peer`` holds Keras 3's two idioms of a train step.
"""
