"""The README's default job: a 4-layer GPT (about 4M parameters) on Shakespeare, on a 2x2x2 mesh of
8 simulated CPU devices (data, fsdp and tensor parallelism at once), for a few minutes."""
from configs.base import base_config


def get_config():
    return base_config()
