"""Suite-wide settings: no test may reach a model hub; torch stays on the CPU threads we have."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
