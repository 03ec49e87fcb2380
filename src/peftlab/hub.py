"""Is the Hugging Face hub reachable? Asked once per process, so offline runs fail (or use the local
cache) at once instead of after the libraries' ~25-60 s of retries."""
from __future__ import annotations

import functools
import urllib.error
import urllib.request


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 5.0) -> bool:
    """True when the hub does not answer. In offline mode (HF_HUB_OFFLINE=1) the libraries read their cache: go ahead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return False  # an HTTP error status is still an answer
    except (OSError, ValueError):
        return True
    return False
