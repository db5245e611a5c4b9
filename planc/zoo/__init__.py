"""The bundled models: corpus, training, evaluation."""
