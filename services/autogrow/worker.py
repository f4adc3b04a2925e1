"""`python -m services.autogrow.worker`: autogrow's handlers, loops and outbox relay."""

from services.autogrow.service import build
from shared.process import worker_main

if __name__ == "__main__":
    worker_main(build)
