"""Benchmarks: scripts that measure the services and print and write their numbers (``results/*.json``), each
as ratios against a baseline measured in the same run. Kept apart from the service packages, which serve;
each is run through its service's CLI (``musicrl gateway bench``, ``musicrl reward bench``,
``musicrl consumer bench``, ``musicrl gateway bench-musicgen``, ``musicrl finetune bench-musicgen``) or
all together by ``musicrl experiment bench-all``.

- ``gateway``: batched against unbatched generation through Triton and the gateway;
- ``gateway_musicgen``: the same for a MusicGen model;
- ``reward_service``: micro-batched scoring against one clip at a time;
- ``feedback``: the consumer's throughput and ingestion latency;
- ``rl_step_musicgen``: tokens per second of one REINFORCE step on MusicGen.
"""
