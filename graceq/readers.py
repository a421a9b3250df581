"""Reading structure files with their text keys kept as written.

ASE's extended-XYZ reader turns values into numbers and booleans: a structure named '007' becomes
7, '1e3' becomes 1000.0 and 'T' becomes True. Structure names are text, and a pool and a replay
source must agree on them, so both read through :func:`read_structures`, which keeps the values
of the given keys as strings (ASE leaves the keys of ``ase.io.extxyz.UNPROCESSED_KEYS`` alone; ours
are added to that set while a comment line is parsed).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Sequence

_PARSER_LOCK = threading.Lock()  # UNPROCESSED_KEYS is a module global of ASE


def text_keys_parser(text_keys: Sequence[str]):
    """An extxyz comment-line parser that keeps the values of `text_keys` as strings."""
    from ase.io import extxyz

    wanted = {k.lower() for k in text_keys}
    # ASE's tokenizer glues the next pair onto an empty quoted value (name="" energy_ff=1 gives the
    # name 'energy_ff=1'): such a value is taken out before parsing and put back as ""
    empty_value = {k: re.compile(rf'(^|\s){re.escape(k)}=(""|\'\')(?=\s|$)') for k in text_keys}

    def parse(line: str) -> dict:
        empty = []
        for key, pattern in empty_value.items():
            if pattern.search(line):
                line = pattern.sub(r"\1", line)
                empty.append(key)
        with _PARSER_LOCK:
            added = wanted - set(extxyz.UNPROCESSED_KEYS)
            extxyz.UNPROCESSED_KEYS.update(added)
            try:
                info = extxyz.key_val_str_to_dict(line)
            finally:
                extxyz.UNPROCESSED_KEYS.difference_update(added)
        info.update({key: "" for key in empty})
        return info

    return parse


def read_structures(path: str | Path, text_keys: Sequence[str] = ("name",)) -> list:
    """Every frame of an ASE-readable file; in extended XYZ the `text_keys` stay strings."""
    import ase.io
    from ase.io.formats import filetype

    kwargs = {}
    try:
        if filetype(str(path), guess=False) == "extxyz":
            kwargs = {"format": "extxyz", "properties_parser": text_keys_parser(text_keys)}
    except Exception:  # an unknown type: ase.io.read says what is wrong
        pass
    frames = ase.io.read(str(path), index=":", **kwargs)
    return [frames] if not isinstance(frames, list) else frames
