"""LF-VILA long-form video-language model: configs, encoders, data, training, evaluation and the CLI."""
