"""The manifest quantkit writes beside every checkpoint it makes: what it was made from and how, and the sha256 and
size of every other file in the directory (verification/integrity.py checks them)."""
from __future__ import annotations

MANIFEST_NAME = "quantkit.json"
