"""A TCP port nothing listens on now, for process groups and torchrun in tests (a fixed one can collide)."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
