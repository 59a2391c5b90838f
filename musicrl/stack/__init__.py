"""The local stack of real servers (SeaweedFS, Tansu, Triton) used by ``musicrl stack`` and the tests."""

from musicrl.stack.binaries import StackError
from musicrl.stack.processes import ManagedProcess
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import COMPONENTS, Component, Stack, StackInfo, free_port_settings

__all__ = [
    "COMPONENTS",
    "Component",
    "ManagedProcess",
    "Stack",
    "StackError",
    "StackInfo",
    "StackSettings",
    "free_port_settings",
]
