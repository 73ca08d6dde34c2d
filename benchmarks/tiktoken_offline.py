"""Make tiktoken's cl100k_base loadable without a network, for the benchmarks.

tiktoken downloads its encodings on first use; this machine has no internet. The PyPI package
bpe-openai (a development dependency only) ships the same cl100k_base file, so we place it where
tiktoken looks for its cache (TIKTOKEN_CACHE_DIR, file named by the SHA-1 of the download URL), which is
exactly what a user of an air-gapped machine would do with a copied cache.
"""

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def prime_cl100k_cache(folder: Path | None = None) -> Path | None:
    """Write cl100k_base into a tiktoken cache folder and point TIKTOKEN_CACHE_DIR at it; None if unavailable."""
    try:
        import importlib.resources

        packed = (importlib.resources.files("bpe_openai") / "data" / "cl100k_base.tiktoken.gz").read_bytes()
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return None
    folder = Path(folder or tempfile.mkdtemp(prefix="tiktoken-cache-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(gzip.decompress(packed))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    return folder
