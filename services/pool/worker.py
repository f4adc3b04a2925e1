"""`python -m services.pool.worker`: pool's handlers, loops and outbox relay."""

from services.pool.service import build
from shared.process import worker_main

if __name__ == "__main__":
    worker_main(build)
