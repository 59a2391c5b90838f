"""Audio: the token codec and its synthesizer, log-mel features, file formats, degradations."""
