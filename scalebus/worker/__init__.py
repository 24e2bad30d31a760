"""The worker: receive → stage → run → publish → settle, then self-destroy when idle."""
