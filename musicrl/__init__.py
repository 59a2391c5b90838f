"""musicrl: the shared library of the MusicRL serving and online-RLHF system.

Holds what several services use: the audio token codec and synthesizer, the
models (generator and reward models), event and record schemas, object-store,
buffer and registry helpers, settings mixins, logging and metrics helpers, and
the local stack of real servers.
"""

__version__ = "0.1.0"
