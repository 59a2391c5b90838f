"""HTTP routers of the gateway.

Every module here exposes ``router`` (a FastAPI ``APIRouter``); ``serving.app``
includes all of them, in module-name order, so a new route module needs no
other edit. Routers stay thin: parse, call a service, shape the answer.
"""
